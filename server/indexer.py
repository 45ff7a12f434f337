"""Keeps the index in step with files on disk: load, chunk, embed (with the cache), store.

Work is batched across files so the embedder sees full batches, while every document is still
written in its own transaction. A file costs no embedding when its bytes are unchanged (content hash)
or when its chunks were embedded before under any name (the embedding cache keyed by model id and
chunk hash): renames, moves and copies re-embed nothing. A file that fails is recorded with its
reason and never stops the rest.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorekeeper import plugins
from lorekeeper.plugins.base import Embedder, LoaderError

from .chunker import Chunk, chunk_units, embed_text
from .ignore import IgnoreRules
from .settings import Settings
from .store import STATUS_FAILED, STATUS_SKIPPED, Root, Store

log = logging.getLogger(__name__)

EMBED_BATCH_CHUNKS = 256  # chunks gathered across files before one call to the embedder
OVERLAP_TOKENS = 32
CACHE_KEEP_DAYS = 30  # cached vectors no chunk uses are dropped after this long

Progress = Callable[[int, int, str], None]  # (done, total, path)


@dataclass
class ScanReport:
    """What one indexing pass did."""

    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0
    ignored: int = 0
    embedded_chunks: int = 0
    cached_chunks: int = 0
    seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)

    def count(self, path: str, outcome: str) -> None:
        self.outcomes[path] = outcome
        if hasattr(self, outcome) and isinstance(getattr(self, outcome), int):
            setattr(self, outcome, getattr(self, outcome) + 1)

    def merge(self, other: ScanReport) -> None:
        for name in ("indexed", "unchanged", "moved", "removed", "failed", "skipped", "ignored",
                     "embedded_chunks", "cached_chunks"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outcomes.update(other.outcomes)


@dataclass
class _Prepared:
    path: str
    root: Root
    size: int
    mtime: float
    content_hash: str
    loader_id: str
    chunks: list[Chunk]
    note: str | None


def embedder_for(store: Store, settings: Settings) -> Embedder:
    """The embedder for an index: the one it was built with, unless the ``embedder`` setting names
    another (an ``Indexer`` with that one re-embeds the index; a search alone refuses to mix them).

    This is the one rule every command and the server follow.
    """
    recorded = store.embed_model
    wanted = settings.embedder or recorded
    return plugins.get_embedder(wanted, settings)


def check_search_embedder(store: Store, embedder: Embedder) -> None:
    """A search embeds its query with ``embedder``: refuse when the index holds another model's vectors."""
    recorded = store.embed_model
    if recorded and recorded != embedder.model_id:
        raise ValueError(
            f"the index was built with the embedder {recorded!r}, not {embedder.model_id!r}: run "
            "`lorekeeper reindex` to re-embed it with the new one, or drop the embedder setting"
        )


def warm_up(embedder: Embedder) -> threading.Thread:
    """Load ``embedder``'s model on a background thread now, so the first file saved (or the first
    query) after ``serve`` or ``watch`` starts waits for no model load. Failures are logged; the
    first real use then reports them."""

    def load() -> None:
        started = time.monotonic()
        try:
            embedder.embed(["warm up"])
            log.info("embedder %s ready in %.1f s", embedder.model_id, time.monotonic() - started)
        except Exception as exc:
            log.warning("loading the embedder %s failed: %s", embedder.model_id, exc)

    thread = threading.Thread(target=load, name="lorekeeper-embedder-load", daemon=True)
    thread.start()
    return thread


class Indexer:
    """Indexes files under the store's roots with one embedder. Safe to call from several threads:
    indexing work is serialised, searches are not blocked."""

    def __init__(
        self, store: Store, embedder: Embedder | None = None, *, settings: Settings | None = None
    ) -> None:
        self.store = store
        self.settings = settings or Settings.load()
        self.embedder = embedder or embedder_for(store, self.settings)
        self._lock = threading.RLock()
        self._rules: dict[str, IgnoreRules] = {}
        self.store.ensure_embedder(self.embedder.model_id, self.embedder.dimension)

    # -- public operations ---------------------------------------------------------------------

    def add_root(self, path: Path | str, progress: Progress | None = None) -> ScanReport:
        """Register a folder (or a single file's folder) and index everything in it now."""
        target = Path(path).expanduser()
        if not target.exists():
            raise FileNotFoundError(f"{path}: no such folder; give the path of a folder to index")
        if not target.is_dir():
            raise NotADirectoryError(f"{path} is a file; give the folder that contains it")
        root = self.store.add_root(target)
        return self.reconcile(root.path, progress=progress)

    def remove_root(self, path: Path | str) -> bool:
        with self._lock:
            resolved = str(Path(path).expanduser().resolve())
            self._rules.pop(resolved, None)
            return self.store.remove_root(resolved)

    def reconcile(self, root: str | None = None, progress: Progress | None = None) -> ScanReport:
        """Bring the index in line with the disk: new and changed files indexed, missing ones removed.

        Runs at start-up and periodically, so changes made while nothing watched are caught.
        """
        started = time.monotonic()
        report = ScanReport()
        roots = [r for r in self.store.roots() if root is None or r.path == str(root)]
        with self._lock:
            report.embedded_chunks += self.fill_missing_vectors()
            for r in roots:
                on_disk = self._walk(r)
                # index first, so a file that moved while we were away is matched by its hash
                report.merge(self.index_files(on_disk, progress=progress))
                present = set(on_disk)
                for doc in self.store.documents(r.path):
                    if doc.path not in present:
                        self.store.delete_document(doc.path)
                        report.count(doc.path, "removed")
            # vectors of chunks that are gone stay cached a while (a file moved back re-embeds
            # nothing), then go: without this the cache grows for ever
            pruned = self.store.prune_cache(CACHE_KEEP_DAYS)
            if pruned:
                log.info("dropped %d cached vectors unused for %d days", pruned, CACHE_KEEP_DAYS)
        report.seconds = time.monotonic() - started
        return report

    def index_file(self, path: Path | str) -> str:
        """Index one file now; return its outcome ("indexed", "unchanged", "moved", "removed",
        "failed", "skipped", "ignored")."""
        path = os.path.abspath(str(path))
        return self.index_files([path]).outcomes.get(path, "ignored")

    def index_files(self, paths: Iterable[str], progress: Progress | None = None) -> ScanReport:
        report = ScanReport()
        paths = list(paths)
        batch: list[_Prepared] = []
        batch_chunks = 0
        with self._lock:
            for done, path in enumerate(paths, 1):
                prepared = self._prepare(path, report)
                if prepared is not None:
                    batch.append(prepared)
                    batch_chunks += len(prepared.chunks)
                    if batch_chunks >= EMBED_BATCH_CHUNKS:
                        self._embed_and_store(batch, report)
                        batch, batch_chunks = [], 0
                if progress:
                    progress(done, len(paths), path)
            self._embed_and_store(batch, report)
        return report

    def remove_file(self, path: Path | str) -> bool:
        with self._lock:
            path = os.path.abspath(str(path))
            removed = self.store.delete_document(path)
            if not removed:
                # a folder went away: everything indexed below it goes too
                removed = bool(self.store.delete_under(path))
            return removed

    def move_file(self, src: Path | str, dst: Path | str) -> str:
        """A rename or move seen by the watcher: keep the chunks and vectors under the new name."""
        src, dst = os.path.abspath(str(src)), os.path.abspath(str(dst))
        with self._lock:
            root = self.store.root_for(dst)
            is_dir = os.path.isdir(dst)
            if root is None or self._ignored(root, dst, is_dir=is_dir):
                self.remove_file(src)
                return "removed"
            if is_dir:
                self.remove_file(src)
                return self.reconcile_dir(dst)
            doc = self.store.get_document(src)
            loader = plugins.loader_for(Path(dst))
            if (
                doc is not None
                and doc.status == "indexed"
                and loader is not None
                and self._loader_id(loader) == doc.loader
            ):
                try:
                    st = os.stat(dst)
                except OSError:
                    st = None
                if st is not None and st.st_size == doc.size:
                    self.store.move_document(src, dst, root.id, mtime=st.st_mtime)
                    return "moved"
            self.remove_file(src)
            return self.index_file(dst)

    def reconcile_dir(self, directory: str) -> str:
        """Index what is under a folder that appeared or was renamed into a root."""
        root = self.store.root_for(directory)
        if root is None:
            return "ignored"
        with self._lock:
            report = self.index_files(self._walk(root, directory))
        return "indexed" if report.indexed or report.moved else "unchanged"

    def fill_missing_vectors(self) -> int:
        """Embed chunks that have no vector (after an embedder change); return how many were embedded."""
        embedded = 0
        model = self.embedder.model_id
        with self._lock:
            while True:
                rows = self.store.chunks_missing_vectors(limit=EMBED_BATCH_CHUNKS * 4)
                if not rows:
                    return embedded
                cached = self.store.cached_vectors(model, [r.chunk_hash for r in rows])
                todo = {
                    r.chunk_hash: embed_text(r.text, r.heading_path)
                    for r in rows
                    if r.chunk_hash not in cached
                }
                if todo:
                    cached.update(zip(todo.keys(), self.embedder.embed(list(todo.values()))))
                    embedded += len(todo)
                self.store.set_vectors(model, [(r.id, r.chunk_hash, cached[r.chunk_hash]) for r in rows])

    def document_text(self, path: Path | str) -> str:
        """The file's text as its loader extracts it (what a document resource returns)."""
        loader = plugins.loader_for(Path(path))
        if loader is None:
            raise LoaderError(f"{path}: no loader handles this file type")
        units = loader.load(Path(path))
        return "\n\n".join(u.text for u in units)

    def rules_for(self, root: Root) -> IgnoreRules:
        rules = self._rules.get(root.path)
        if rules is None:
            rules = self._rules[root.path] = IgnoreRules(root.path)
        return rules

    def is_ignored(self, path: str) -> bool:
        root = self.store.root_for(path)
        return root is None or self._ignored(root, path)

    # -- the pipeline --------------------------------------------------------------------------

    def _ignored(self, root: Root, path: str, is_dir: bool = False) -> bool:
        return self.rules_for(root).is_ignored(path, is_dir=is_dir)

    def _walk(self, root: Root, start: str | None = None) -> list[str]:
        """Files under ``start`` (default: the root) that a loader handles and no rule ignores."""
        rules = self.rules_for(root)
        found: list[str] = []
        for directory, dirnames, filenames in os.walk(start or root.path, followlinks=False):
            dirnames[:] = sorted(
                d for d in dirnames if not rules.is_ignored(os.path.join(directory, d), is_dir=True)
            )
            for name in sorted(filenames):
                full = os.path.join(directory, name)
                if plugins.loader_for(Path(name)) is None or rules.is_ignored(full):
                    continue
                found.append(full)
        return found

    @staticmethod
    def _loader_id(loader: plugins.Loader) -> str:
        return f"{loader.name}:{loader.version}"

    def _prepare(self, path: str, report: ScanReport) -> _Prepared | None:
        path = os.path.abspath(path)
        root = self.store.root_for(path)
        if root is None or self._ignored(root, path):
            report.count(path, "ignored")
            return None
        loader = plugins.loader_for(Path(path))
        if loader is None:
            report.count(path, "ignored")
            return None
        loader_id = self._loader_id(loader)

        def problem(status: str, reason: str, size: int | None = None, mtime: float | None = None) -> None:
            self.store.record_problem(
                path=path,
                root_id=root.id,
                status=status,
                error=reason,
                size=size,
                mtime=mtime,
                loader=loader_id,
            )
            report.count(path, status)

        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._gone(path, report)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                problem(STATUS_FAILED, "symlink loop: the link points back at itself; remove or fix it")
            else:
                problem(STATUS_FAILED, f"cannot read file information: {exc.strerror or exc}")
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            report.count(path, "ignored")
            return None
        if os.path.islink(path):
            target = os.path.realpath(path)
            if self.store.root_for(target) is None:
                problem(
                    STATUS_SKIPPED,
                    f"symlink to {target}, outside the watched folders; add that folder to index it",
                )
                return None
        doc = self.store.get_document(path)
        if (
            doc is not None
            and doc.size == st.st_size
            and doc.mtime == st.st_mtime
            and doc.loader == loader_id
        ):
            report.count(path, "unchanged")
            return None
        limit = self.settings.max_file_bytes
        if st.st_size > limit:
            problem(
                STATUS_SKIPPED,
                f"file is {st.st_size / 2**20:.1f} MB, over the {limit / 2**20:g} MB limit; "
                "raise it with `lorekeeper config set max_file_mb N` to index it",
                st.st_size,
                st.st_mtime,
            )
            return None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self._gone(path, report)
            return None
        except PermissionError:
            problem(STATUS_FAILED, "permission denied: lorekeeper cannot read this file; fix its permissions",
                    st.st_size, st.st_mtime)  # fmt: skip
            return None
        except OSError as exc:
            problem(STATUS_FAILED, f"cannot read the file: {exc.strerror or exc}", st.st_size, st.st_mtime)
            return None
        if not data.strip():
            problem(STATUS_SKIPPED, "empty file: nothing to index", st.st_size, st.st_mtime)
            return None
        content_hash = hashlib.sha256(data).hexdigest()
        if (
            doc is not None
            and doc.content_hash == content_hash
            and doc.loader == loader_id
            and doc.status == "indexed"
        ):
            self.store.touch_document(path, st.st_size, st.st_mtime)
            report.count(path, "unchanged")
            return None
        if doc is None and self._adopt_moved(path, root, content_hash, loader_id, st):
            report.count(path, "moved")
            return None
        try:
            loaded = loader.load(Path(path))
        except FileNotFoundError:
            self._gone(path, report)
            return None
        except LoaderError as exc:
            problem(STATUS_FAILED, str(exc), st.st_size, st.st_mtime)
            return None
        except Exception as exc:  # a loader bug must not stop the rest of the folder
            log.exception("loader %s failed on %s", loader.name, path)
            problem(
                STATUS_FAILED,
                f"{loader.name} loader error: {type(exc).__name__}: {exc}",
                st.st_size,
                st.st_mtime,
            )
            return None
        warnings = list(getattr(loaded, "warnings", []) or [])
        chunks = chunk_units(
            loaded,
            token_spans=self.embedder.token_spans,
            max_tokens=self.embedder.max_tokens - 2,  # room for the model's [CLS] and [SEP]
            overlap_tokens=OVERLAP_TOKENS,
        )
        if not chunks:
            problem(STATUS_SKIPPED, "no text found in the file", st.st_size, st.st_mtime)
            return None
        return _Prepared(
            path=path,
            root=root,
            size=st.st_size,
            mtime=st.st_mtime,
            content_hash=content_hash,
            loader_id=loader_id,
            chunks=chunks,
            note="; ".join(warnings) or None,
        )

    def _adopt_moved(
        self, path: str, root: Root, content_hash: str, loader_id: str, st: os.stat_result
    ) -> bool:
        """A new path whose bytes match an indexed document that no longer exists: a move."""
        for doc in self.store.find_by_hash(content_hash):
            if doc.loader == loader_id and doc.status == "indexed" and not os.path.exists(doc.path):
                return self.store.move_document(doc.path, path, root.id, mtime=st.st_mtime)
        return False

    def _gone(self, path: str, report: ScanReport) -> None:
        self.store.delete_document(path)
        report.count(path, "removed")

    def _embed_and_store(self, batch: list[_Prepared], report: ScanReport) -> None:
        if not batch:
            return
        model = self.embedder.model_id
        vectors = self.store.cached_vectors(model, (c.chunk_hash for p in batch for c in p.chunks))
        report.cached_chunks += sum(1 for p in batch for c in p.chunks if c.chunk_hash in vectors)
        todo: dict[str, str] = {}
        for prepared in batch:
            for chunk in prepared.chunks:
                if chunk.chunk_hash not in vectors:
                    todo.setdefault(chunk.chunk_hash, chunk.embed_text)
        if todo:
            embedded = self.embedder.embed(list(todo.values()))
            if embedded.shape != (len(todo), self.embedder.dimension):
                raise RuntimeError(
                    f"embedder {model} returned shape {embedded.shape} for {len(todo)} texts; "
                    f"expected ({len(todo)}, {self.embedder.dimension})"
                )
            vectors.update(zip(todo.keys(), embedded))
            report.embedded_chunks += len(todo)
        for prepared in batch:
            matrix = np.stack([vectors[c.chunk_hash] for c in prepared.chunks])
            self.store.replace_document(
                path=prepared.path,
                root_id=prepared.root.id,
                size=prepared.size,
                mtime=prepared.mtime,
                content_hash=prepared.content_hash,
                loader=prepared.loader_id,
                chunks=prepared.chunks,
                vectors=matrix,
                model_id=model,
                note=prepared.note,
            )
            report.count(prepared.path, "indexed")
