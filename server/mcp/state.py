"""What a running MCP server holds: its options, the store, indexer, watcher and models.

The lifespan (``server.py``) builds one ``AppState`` when a client connects; every request reaches
it through its context. Models load lazily: the embedder on the first meaning-based search, the
generator on the first ``generate``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context

from lorekeeper import plugins
from lorekeeper.plugins.base import Embedder, Generator

from ..adapters import AdapterRegistry
from ..settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """How ``lorekeeper serve`` was started; every field has a CLI flag."""

    settings: Settings = field(default_factory=Settings.load)
    watch: list[Path] = field(default_factory=list)  # folders to register and watch at start
    allow_folder_tools: bool = False  # expose add_folder / remove_folder
    start_watcher: bool = True


@dataclass
class AppState:
    """What every request can reach: the store, the indexer and watcher, and lazily loaded models."""

    options: ServerOptions
    store: Any
    indexer: Any
    embedder: Embedder
    watcher: Any = None
    watcher_error: str | None = None
    _generator: Generator | None = None
    _generator_lock: threading.Lock = field(default_factory=threading.Lock)
    _base_generators: dict[str, Generator] = field(default_factory=dict)  # adapter bases, one at a time
    _starter: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def settings(self) -> Settings:
        return self.options.settings

    @property
    def adapters(self) -> AdapterRegistry:
        return AdapterRegistry(self.settings.adapters_dir)

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            with self._generator_lock:
                if self._generator is None:
                    self._generator = plugins.get_generator(None, self.settings)
        return self._generator

    def generator_for(self, adapter: str | None) -> Generator:
        """The generator that answers with ``adapter``: the server's own, unless the adapter was
        exported for another base model (its record says which) that is still on disk; then one
        running that base, loaded on first use and kept (one such base at a time) beside the
        server's own model, as Ollama loads a fine-tune's FROM model."""
        generator = self.generator
        if adapter is None or not generator.supports_adapters or generator.runs_base_of(adapter) is not False:
            return generator
        base = self.adapters.read(adapter).base_path
        if base is None or not base.is_file():
            return generator  # it says, refusing or warning, which base the adapter needs
        key = str(base.resolve())
        with self._generator_lock:
            other = self._base_generators.get(key)
            if other is None:
                for old in self._base_generators.values():
                    old.close()
                self._base_generators.clear()
                logger.info("loading %s, the base model of adapter %s", base, adapter)
                other = plugins.get_generator(generator.name, self.settings.with_flags(model=key))
                self._base_generators[key] = other
        return other

    def start_watching(self) -> None:
        """Register ``--watch`` folders and start the watcher; runs on a background thread.

        The watcher's first pass reconciles every root with the disk, so new folders are indexed
        there; without a watcher they are indexed here.
        """
        for folder in self.options.watch:
            if self._stopping.is_set():
                return
            try:
                if not Path(folder).is_dir():
                    raise NotADirectoryError(f"{folder} is not a folder")
                if self.options.start_watcher:
                    self.store.add_root(Path(folder).expanduser().resolve())
                else:
                    self.indexer.add_root(folder)
            except Exception as exc:
                logger.error("cannot watch %s: %s", folder, exc)
        if not self.options.start_watcher or self._stopping.is_set():
            return
        try:
            from ..watcher import Watcher

            watcher = Watcher(self.indexer, settings=self.settings)
            watcher.start()
            self.watcher = watcher
        except Exception as exc:  # the index still serves; status says why it is not live
            self.watcher_error = f"the watcher did not start: {exc}"
            logger.exception("the watcher did not start")

    def shutdown(self) -> None:
        self._stopping.set()
        if self._starter is not None:
            self._starter.join(timeout=60)
        if self.watcher is not None:
            try:
                self.watcher.stop()
            except Exception:
                logger.exception("stopping the watcher failed")
        self.store.close()
        with self._generator_lock:
            for other in self._base_generators.values():
                other.close()
            self._base_generators.clear()
        # the server's own generator is shared in this process (plugins.get_generator); its worker
        # stops at exit


def app_state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context
