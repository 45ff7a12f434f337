"""The plugin system: built-in loaders, embedders and generators, plus third-party plugins.

Built-in features are plugins themselves (``DEFAULT_PLUGINS``). Third-party plugins register
through the ``lorekeeper`` entry-point group. The ``load_plugins`` setting is an allow-list: when
set (comma-separated distribution or module names), only those third-party plugins load; set it
empty to load none. Under pytest no entry points load unless the allow-list names them, so a plugin
installed on the developer's machine cannot change test results.

Every ``get_*`` function takes the ``Settings`` the caller resolved (``Settings.load()`` when
omitted) and hands it to the plugins' hooks: the settings travel as an argument, never through
the environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from .base import Embedder, Generator, Loader

if TYPE_CHECKING:
    from lorekeeper.server.settings import Settings

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

pm = pluggy.PluginManager("lorekeeper")
pm.add_hookspecs(hookspecs)

_lock = threading.Lock()
_loaded = False


def _settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from lorekeeper.server.settings import Settings

    return Settings.load()


def load_plugins(settings: Settings | None = None) -> None:
    """Register the built-in plugins and the allowed third-party ones, once per process."""
    global _loaded
    with _lock:
        if _loaded:
            return
        for name in DEFAULT_PLUGINS:
            module = importlib.import_module(name)
            if not pm.is_registered(module):
                pm.register(module, name=name)
        names = _settings(settings).load_plugins
        allowed = set(names) if names is not None else None
        under_test = "pytest" in sys.modules and allowed is None
        if not under_test:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist.name if ep.dist else ""
                if allowed is not None and ep.name not in allowed and dist not in allowed:
                    continue
                if pm.get_plugin(ep.name) is None:
                    pm.register(ep.load(), name=ep.name)
        _loaded = True


def _collect(hook_name: str, settings: Settings | None) -> list:
    settings = _settings(settings)
    load_plugins(settings)
    items: list = []
    getattr(pm.hook, hook_name)(register=items.append, settings=settings)
    return items


def get_loaders(settings: Settings | None = None) -> list[Loader]:
    """Every registered loader; for each extension the last registered wins (see ``loader_for``)."""
    # pluggy calls the most recently registered plugin first; reverse so that later ones win.
    return list(reversed(_collect("register_loaders", settings)))


_loader_cache: dict[str, Loader] | None = None


def loaders_by_extension() -> dict[str, Loader]:
    global _loader_cache
    if _loader_cache is None:
        table: dict[str, Loader] = {}
        for loader in get_loaders(None):
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


def get_embedders(settings: Settings | None = None) -> list[Embedder]:
    return _collect("register_embedders", settings)


def get_embedder(model_id: str | None = None, settings: Settings | None = None) -> Embedder:
    """The embedder with ``model_id`` (or the ``embedder`` setting), else the built-in default.

    Which embedder an existing index needs is the indexer's business (``indexer.embedder_for``).
    """
    settings = _settings(settings)
    wanted = model_id or settings.embedder
    embedders = get_embedders(settings)
    if not embedders:
        raise LookupError("no embedder plugin is registered")
    if wanted is None:
        return _shared(embedders[-1])  # the built-in one registers first, so it is called last
    for emb in embedders:
        if emb.model_id == wanted:
            return _shared(emb)
    known = ", ".join(e.model_id for e in embedders)
    raise LookupError(f"no embedder named {wanted!r}; known: {known}")


def get_generators(settings: Settings | None = None) -> list[Generator]:
    return _collect("register_generators", settings)


def get_generator(name: str | None = None, settings: Settings | None = None) -> Generator:
    """The generator called ``name`` (or the ``generator`` setting: llama.cpp by default), built
    from ``settings`` (model, context window, threads, endpoint)."""
    settings = _settings(settings)
    wanted = name or settings.generator
    generators = get_generators(settings)
    for gen in generators:
        if gen.name == wanted:
            return _shared(gen)
    known = ", ".join(g.name for g in generators)
    raise LookupError(f"no generator named {wanted!r}; known: {known}")


_instances: dict[tuple[type, str], object] = {}


def _shared(obj):
    """One instance per class and configuration per process, so a model is loaded once.

    A plugin object may define ``cache_key`` (everything its construction depended on); else its
    model id (or name) tells instances apart.
    """
    key = (
        type(obj),
        getattr(obj, "cache_key", None) or getattr(obj, "model_id", "") or getattr(obj, "name", ""),
    )
    with _lock:
        return _instances.setdefault(key, obj)


def plugin_names(settings: Settings | None = None) -> list[str]:
    load_plugins(settings)
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
