"""The plugin system: built-in loaders, embedders and generators, plus third-party plugins.

Built-in features are plugins themselves (``DEFAULT_PLUGINS``). Third-party plugins register
through the ``lorekeeper`` entry-point group. ``LOREKEEPER_LOAD_PLUGINS`` is an allow-list: when set
(comma-separated distribution or module names), only those third-party plugins load; set it to an
empty string to load none. Under pytest no entry points load unless the allow-list names them, so
a plugin installed on the developer's machine cannot change test results.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
from pathlib import Path

import pluggy

from . import hookspecs
from .base import Embedder, Generator, Loader

DEFAULT_PLUGINS = (
    "lorekeeper.plugins.loaders.text",
    "lorekeeper.plugins.loaders.markdown",
    "lorekeeper.plugins.loaders.code",
    "lorekeeper.plugins.loaders.html",
    "lorekeeper.plugins.loaders.pdf",
    "lorekeeper.plugins.loaders.docx",
    "lorekeeper.plugins.embedders.minilm",
    "lorekeeper.plugins.generators.llamacpp",
    "lorekeeper.plugins.generators.openai_compat",
)

ENTRY_POINT_GROUP = "lorekeeper"
ALLOW_ENV = "LOREKEEPER_LOAD_PLUGINS"

pm = pluggy.PluginManager("lorekeeper")
pm.add_hookspecs(hookspecs)

_lock = threading.Lock()
_loaded = False


def _allowed_names() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def load_plugins() -> None:
    """Register the built-in plugins and the allowed third-party ones, once per process."""
    global _loaded
    with _lock:
        if _loaded:
            return
        for name in DEFAULT_PLUGINS:
            module = importlib.import_module(name)
            if not pm.is_registered(module):
                pm.register(module, name=name)
        allowed = _allowed_names()
        under_test = "pytest" in sys.modules and allowed is None
        if not under_test:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist.name if ep.dist else ""
                if allowed is not None and ep.name not in allowed and dist not in allowed:
                    continue
                if pm.get_plugin(ep.name) is None:
                    pm.register(ep.load(), name=ep.name)
        _loaded = True


def _collect(hook) -> list:
    load_plugins()
    items: list = []
    hook(register=items.append)
    return items


def get_loaders() -> list[Loader]:
    """Every registered loader; for each extension the last registered wins (see ``loader_for``)."""
    # pluggy calls the most recently registered plugin first; reverse so that later ones win.
    return list(reversed(_collect(pm.hook.register_loaders)))


_loader_cache: dict[str, Loader] | None = None


def loaders_by_extension() -> dict[str, Loader]:
    global _loader_cache
    if _loader_cache is None:
        table: dict[str, Loader] = {}
        for loader in get_loaders():
            for ext in loader.extensions:
                table[ext.lower()] = loader
        _loader_cache = table
    return _loader_cache


def loader_for(path: Path) -> Loader | None:
    """The loader for ``path`` by its suffix (or by its full name for files like ``Makefile``)."""
    table = loaders_by_extension()
    name = path.name.lower()
    if name in table:
        return table[name]
    return table.get(path.suffix.lower())


def get_embedders() -> list[Embedder]:
    return _collect(pm.hook.register_embedders)


def get_embedder(model_id: str | None = None) -> Embedder:
    """The embedder with ``model_id`` (or ``LOREKEEPER_EMBEDDER``), else the built-in default."""
    wanted = model_id or os.environ.get("LOREKEEPER_EMBEDDER")
    embedders = get_embedders()
    if not embedders:
        raise LookupError("no embedder plugin is registered")
    if wanted is None:
        return _shared(embedders[-1])  # the built-in one registers first, so it is called last
    for emb in embedders:
        if emb.model_id == wanted:
            return _shared(emb)
    known = ", ".join(e.model_id for e in embedders)
    raise LookupError(f"no embedder named {wanted!r}; known: {known}")


def get_generators() -> list[Generator]:
    return _collect(pm.hook.register_generators)


def get_generator(name: str | None = None) -> Generator:
    """The generator called ``name`` (or ``LOREKEEPER_GENERATOR``), else the built-in llama.cpp one."""
    wanted = name or os.environ.get("LOREKEEPER_GENERATOR") or "llamacpp"
    generators = get_generators()
    for gen in generators:
        if gen.name == wanted:
            return _shared(gen)
    known = ", ".join(g.name for g in generators)
    raise LookupError(f"no generator named {wanted!r}; known: {known}")


_instances: dict[tuple[type, str], object] = {}


def _shared(obj):
    """One instance per class and model per process, so a model is loaded once."""
    key = (type(obj), getattr(obj, "model_id", "") or getattr(obj, "name", ""))
    with _lock:
        return _instances.setdefault(key, obj)


def plugin_names() -> list[str]:
    load_plugins()
    return [name for name, _ in pm.list_name_plugin()]


__all__ = [
    "DEFAULT_PLUGINS",
    "get_embedder",
    "get_embedders",
    "get_generator",
    "get_generators",
    "get_loaders",
    "loader_for",
    "load_plugins",
    "pm",
    "plugin_names",
]
