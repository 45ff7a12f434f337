"""The hooks a lorekeeper plugin can implement.

Each hook receives a ``register`` callback and calls it once per thing it provides, so a plugin
never needs to know how lorekeeper stores or chooses among them. Hooks also receive ``settings``
(a ``lorekeeper.server.settings.Settings``: model paths, devices, endpoints); an implementation
that does not need it simply leaves the argument out of its signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("lorekeeper")
hookimpl = pluggy.HookimplMarker("lorekeeper")


@hookspec
def register_loaders(register: Callable, settings: Any) -> None:
    """Register file loaders: ``register(loader)`` with a ``lorekeeper.plugins.base.Loader``.

    A loader turns one file into text units that keep their provenance (lines, page, headings).
    Later registrations win over earlier ones for the same file extension, so a plugin can replace
    a built-in loader.
    """


@hookspec
def register_embedders(register: Callable, settings: Any) -> None:
    """Register embedders: ``register(embedder)`` with a ``lorekeeper.plugins.base.Embedder``.

    An embedder turns a batch of texts into unit-length vectors and names its model id and dimension;
    the index records both and re-embeds when they change.
    """


@hookspec
def register_generators(register: Callable, settings: Any) -> None:
    """Register text generators: ``register(generator)`` with a ``lorekeeper.plugins.base.Generator``.

    A generator answers chat messages with streamed text; the MCP ``generate`` tool and
    ``lorekeeper ask`` use it.
    """
