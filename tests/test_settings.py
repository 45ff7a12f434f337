"""One settings object: precedence, sources, the config file, clear errors, and no environment
reads or writes anywhere else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorekeeper.server.settings import (
    CONFIG_FILE,
    Settings,
    SettingsError,
    env_name,
    read_config_file,
    setting_fields,
    write_config_value,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_spelled_once_and_reported_as_defaults(tmp_path: Path) -> None:
    s = Settings.load(environ={}, home=tmp_path)
    assert (s.k, s.max_tokens, s.temperature, s.generator, s.n_ctx) == (8, 256, 0.2, "llamacpp", 4096)
    assert all(source == "default" for source in s.sources.values())
    assert s.db_path == tmp_path / "index.db"
    assert s.adapters_dir == tmp_path / "adapters" and s.adapters_dir.is_dir()


def test_flag_beats_environment_beats_config_file_beats_default(tmp_path: Path) -> None:
    write_config_value(tmp_path, "n_ctx", "2048")
    write_config_value(tmp_path, "k", "5")
    write_config_value(tmp_path, "temperature", "0.7")
    env = {"LOREKEEPER_K": "6", "LOREKEEPER_TEMPERATURE": "0.5"}
    s = Settings.load({"temperature": 0.1, "threads": None}, environ=env, home=tmp_path)
    assert (s.n_ctx, s.k, s.temperature, s.max_tokens) == (2048, 6, 0.1, 256)
    assert s.sources["n_ctx"] == CONFIG_FILE
    assert s.sources["k"] == "env LOREKEEPER_K"
    assert s.sources["temperature"] == "flag"
    assert s.sources["max_tokens"] == s.sources["threads"] == "default"


def test_every_setting_has_an_environment_name_and_help() -> None:
    for f in setting_fields():
        assert env_name(f.name) == "LOREKEEPER_" + f.name.upper()
        assert f.metadata["help"].strip()


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("env", "n_ctx", "lots", "n_ctx='lots' (env LOREKEEPER_N_CTX): n_ctx must be a whole number"),
        ("env", "n_ctx", "32", "n_ctx=32 (env LOREKEEPER_N_CTX): must be at least 64"),
        ("env", "llama_repack", "maybe", "use one of auto, on, off"),
        ("flag", "temperature", "hot", "temperature must be a number"),
        ("flag", "polling", "perhaps", "polling must be true or false"),
        ("file", "max_file_mb", "-1", "must be at least"),
    ],
)
def test_bad_values_name_the_key_and_where_they_came_from(tmp_path, where, key, value, message) -> None:
    env: dict[str, str] = {}
    flags: dict[str, str] = {}
    if where == "env":
        env[env_name(key)] = value
    elif where == "flag":
        flags[key] = value
    else:
        (tmp_path / CONFIG_FILE).write_text(f"{key} = {value}\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.load(flags, environ=env, home=tmp_path)


def test_config_file_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    write_config_value(tmp_path, "model", "/models/a b.gguf")
    write_config_value(tmp_path, "load_plugins", "one, two")
    write_config_value(tmp_path, "polling", "yes")
    assert read_config_file(tmp_path / CONFIG_FILE) == {
        "model": "/models/a b.gguf",
        "load_plugins": ["one", "two"],
        "polling": True,
    }
    write_config_value(tmp_path, "polling", None)
    assert "polling" not in read_config_file(tmp_path / CONFIG_FILE)
    with pytest.raises(SettingsError, match="unknown setting 'modle'"):
        write_config_value(tmp_path, "modle", "x")
    (tmp_path / CONFIG_FILE).write_text('colour = "blue"\n', encoding="utf-8")
    with pytest.raises(SettingsError, match="unknown key 'colour'"):
        Settings.load(environ={}, home=tmp_path)
    (tmp_path / CONFIG_FILE).write_text("k = [unclosed\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.load(environ={}, home=tmp_path)


def test_the_data_directory_is_private(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    s = Settings.load(environ={}, home=home)
    assert (s.data_dir.stat().st_mode & 0o777) == 0o700
    write_config_value(home, "k", "3")
    assert (s.config_path.stat().st_mode & 0o777) == 0o600


def test_environment_is_read_and_written_only_by_the_settings_module() -> None:
    """`os.environ` appears in one module of the product; the plugins and fine-tuning get settings
    passed to them."""
    users = []
    for folder in ("server", "plugins", "finetune"):
        for path in (ROOT / folder).rglob("*.py"):
            if "os.environ" in path.read_text(encoding="utf-8") or "getenv(" in path.read_text(
                encoding="utf-8"
            ):
                users.append(str(path.relative_to(ROOT)))
    assert users == ["server/settings.py"]


def _lk(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LOREKEEPER_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "lorekeeper.server.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_config_commands_show_set_and_unset(tmp_path: Path) -> None:
    home = tmp_path / "home"
    set_ = _lk("config", "set", "max_tokens", "128", home=home)
    assert set_.returncode == 0, set_.stderr
    shown = _lk("config", "show", "--json", home=home)
    import json

    values = json.loads(shown.stdout)["settings"]
    assert values["max_tokens"] == {"value": 128, "source": "config.toml"}
    assert values["k"] == {"value": 8, "source": "default"}
    bad = _lk("config", "set", "max_tokens", "many", home=home)
    assert bad.returncode == 1 and "max_tokens must be a whole number" in bad.stderr
    assert "Traceback" not in bad.stderr
    unset = _lk("config", "unset", "max_tokens", home=home)
    assert unset.returncode == 0 and "default: 256" in unset.stdout


# ---------------------------------------------------------------------------- the two bugs of issue 9


def _indexed_with_fake_embedder(tmp_path: Path) -> tuple[Path, Path]:
    from fakes import HashEmbedder, register_fakes

    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    register_fakes()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "old.md").write_text("# Old\n\nThe harbour crane was painted blue.\n", encoding="utf-8")
    (docs / "new.md").write_text("# New\n\nThe harbour crane was painted green.\n", encoding="utf-8")
    db = tmp_path / "index.db"
    with Store.open(db) as store:
        Indexer(store, HashEmbedder(), settings=Settings.load({"db": db})).add_root(docs)
    return docs, db


def _cli(*args: str):
    from typer.testing import CliRunner

    from lorekeeper.server.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _retrieve(db: Path, arguments: dict) -> dict:
    import anyio
    from mcp import Client

    from lorekeeper.server.mcp import ServerOptions, create_server

    server = create_server(ServerOptions(settings=Settings.load({"db": db}), start_watcher=False))

    async def main():
        async with Client(server) as client:
            return await client.call_tool("retrieve", arguments)

    result = anyio.run(main)
    assert not result.is_error, result.content
    return result.structured_content


def test_search_and_serve_use_the_embedder_the_index_was_built_with(tmp_path: Path, monkeypatch) -> None:
    """Regression: `search` used the index's embedder, `serve` and `ask` the default one (a
    384-dimension query against 64-dimension vectors). Now all of them ask `embedder_for`."""
    docs, db = _indexed_with_fake_embedder(tmp_path)
    found = _cli("--db", str(db), "search", "green crane", "--mode", "vector", "--json", "-k", "1")
    assert found.exit_code == 0, found.output
    import json

    assert json.loads(found.stdout)[0]["path"] == str(docs / "new.md")
    served = _retrieve(db, {"query": "green crane", "mode": "vector", "k": 1})
    assert served["hits"][0]["path"] == str(docs / "new.md")
    # asking for another embedder than the index holds is refused with what to do, never mixed
    monkeypatch.setenv("LOREKEEPER_EMBEDDER", "all-MiniLM-L6-v2")
    mixed = _cli("--db", str(db), "search", "crane", "--mode", "vector")
    assert mixed.exit_code == 1 and "lorekeeper reindex" in mixed.stderr


def test_since_means_the_same_time_in_the_cli_and_over_mcp(tmp_path: Path, monkeypatch) -> None:
    """Regression: the CLI read `--since` as local time and MCP as UTC. One rule now: a time without
    a zone is local; with Z or an offset it is that zone."""
    import json
    import os
    import time
    from datetime import datetime

    from lorekeeper.server.search import parse_since

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9: a wrong rule moves the boundary by 9 hours
    time.tzset()
    try:
        docs, db = _indexed_with_fake_embedder(tmp_path)
        boundary = datetime(2026, 5, 1, 12, 0).timestamp()  # noon in Tokyo
        os.utime(docs / "old.md", (boundary - 3600, boundary - 3600))  # 11:00 Tokyo
        os.utime(docs / "new.md", (boundary + 3600, boundary + 3600))  # 13:00 Tokyo
        assert _cli("--db", str(db), "reindex").exit_code == 0
        assert parse_since("2026-05-01T12:00") == boundary
        assert parse_since("2026-05-01T03:00Z") == boundary
        for since in ("2026-05-01T12:00", "2026-05-01T03:00Z", "2026-05-01T12:00+09:00"):
            cli = _cli(
                "--db", str(db), "search", "harbour crane", "--mode", "keyword", "--since", since, "--json"
            )
            assert cli.exit_code == 0, cli.output
            mcp = _retrieve(db, {"query": "harbour crane", "mode": "keyword", "modified_after": since})
            assert [h["path"] for h in json.loads(cli.stdout)] == [str(docs / "new.md")], since
            assert [h["path"] for h in mcp["hits"]] == [str(docs / "new.md")], since
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_database_urls_are_shown_without_their_password() -> None:
    from lorekeeper.server.settings import redact_url

    assert (
        redact_url("postgresql://lore:s3cret@db.example:5432/idx")
        == "postgresql://lore:***@db.example:5432/idx"
    )
    assert redact_url("postgresql://lore@/idx?host=/run/pg&password=s3cret&sslmode=require") == (
        "postgresql://lore@/idx?host=/run/pg&password=***&sslmode=require"
    )
    assert redact_url("postgresql://db.example/idx") == "postgresql://db.example/idx"
