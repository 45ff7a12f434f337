"""The plugin system: built-ins, third-party entry points, the allow-list, and documented hooks."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorekeeper import plugins
from lorekeeper.plugins import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_plugins_cover_every_kind() -> None:
    names = plugins.plugin_names()
    for module in plugins.DEFAULT_PLUGINS:
        assert module in names
    for suffix in (".txt", ".md", ".py", ".html", ".pdf", ".docx"):
        assert plugins.loader_for(Path("x" + suffix)) is not None, suffix
    assert plugins.get_embedder().model_id == "all-MiniLM-L6-v2"
    assert {g.name for g in plugins.get_generators()} >= {"llamacpp"}


def test_every_hook_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    hooks = [
        name
        for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("register_")
    ]
    assert hooks, "no hooks found"
    for name in hooks:
        assert f"`{name}(register)`" in readme, f"hook {name} is not documented in README.md"


@pytest.fixture
def third_party(tmp_path: Path) -> Path:
    """An installed third-party plugin: a module plus a dist-info with a `lorekeeper` entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "recipe_loader.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            from lorekeeper.plugins.base import Loader, TextUnit
            from lorekeeper.plugins.hookspecs import hookimpl

            class RecipeLoader(Loader):
                name = "recipe"
                extensions = (".recipe", ".txt")

                def load(self, path: Path):
                    text = path.read_text().upper()
                    return [TextUnit(text=text, char_start=0, char_end=len(text), start_line=1, end_line=1)]

            @hookimpl
            def register_loaders(register):
                register(RecipeLoader())
            """
        )
    )
    dist = site / "lorekeeper_recipe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lorekeeper-recipe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lorekeeper]\nrecipe = recipe_loader\n")
    return site


def _loader_names(site: Path, allow: str | None) -> dict:
    code = (
        "import json; from pathlib import Path; from lorekeeper import plugins; "
        "print(json.dumps({s: plugins.loader_for(Path('a' + s)).name for s in ('.recipe', '.txt', '.md')} "
        "if plugins.loader_for(Path('a.recipe')) else {'.txt': plugins.loader_for(Path('a.txt')).name}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOREKEEPER_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    if allow is not None:
        env["LOREKEEPER_LOAD_PLUGINS"] = allow
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_third_party_plugin_loads_and_overrides_builtins(third_party: Path) -> None:
    names = _loader_names(third_party, allow=None)
    assert names == {".recipe": "recipe", ".txt": "recipe", ".md": "markdown"}


def test_allow_list_controls_third_party_plugins(third_party: Path) -> None:
    assert _loader_names(third_party, allow="recipe")[".recipe"] == "recipe"
    assert _loader_names(third_party, allow="lorekeeper-recipe")[".recipe"] == "recipe"
    assert _loader_names(third_party, allow="") == {".txt": "text"}
    assert _loader_names(third_party, allow="someone-else") == {".txt": "text"}


def test_plugins_command_lists_what_is_loaded() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorekeeper.server.cli", "plugins", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert "lorekeeper.plugins.loaders.pdf" in info["plugins"]
    assert {"model_id": "all-MiniLM-L6-v2", "dimension": 384} in info["embedders"]
    assert any(".md" in loader["extensions"] for loader in info["loaders"])
