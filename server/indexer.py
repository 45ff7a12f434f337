"""Keeps the index in step with files on disk: load, chunk, embed (with the cache), store.

Each document is committed in its own transaction as soon as its vectors are ready: small files are
embedded together in batches of ``EMBED_BATCH_CHUNKS`` chunks across files, a large file batch by
batch, each batch's vectors kept in the embedding cache as it is done. A kill loses at most one
batch of work, and the next run picks up where this one stopped: files already committed are
unchanged, and vectors already computed come from the cache. A file costs no embedding when its
bytes are unchanged (content hash) or when its chunks were embedded before under any name: renames,
moves and copies re-embed nothing. A file that is not indexed is recorded with its reason
(``prepare.py``) and never stops the rest.

Work comes in two priorities. Foreground work (a file just saved, ``lorekeeper add``) runs at once;
background work (the watcher's reconcile scans and large files) waits before each embedding batch
while foreground work is running (``_Gate``), so a small change is never stuck behind a large one.
Commits check that the file is still the version that was read (``files.still_same``), so two
threads indexing the same file never leave the older version in the index.

Reading one file is ``prepare.py``'s business; this module is the scheduling around it (batches,
priorities, commits, scans). It runs a little over 500 lines because those share one commit rule.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorekeeper import plugins
from lorekeeper.plugins.base import Embedder

from . import files
from .chunker import embed_text
from .ignore import IgnoreRules
from .prepare import Prepared, Preparer, loader_id
from .settings import Settings
from .store import Root
from .stores import IndexStore

log = logging.getLogger(__name__)

EMBED_BATCH_CHUNKS = 32  # chunks gathered across small files before they are embedded together
BATCH_SECONDS = 0.5  # one call to the embedder takes about this long: a query or a file just saved
# waits at most that for the embedder (calls are sized to the measured pace: 1 to EMBED_BATCH_CHUNKS)
LARGE_FILE_BYTES = 256 * 1024  # the watcher hands files above this size to its background lane
LARGE_DOC_CHUNKS = 64  # ... and files that turn out to need more new vectors than this
CACHE_KEEP_DAYS = 30  # cached vectors no chunk uses are dropped after this long
PROGRESS_SECONDS = 5.0  # a long file logs (and records for `status`) its progress this often
FULL_REINDEX_KEY = "full_reindex"  # meta: a `reindex --full` not finished yet (resumed, not restarted)
ACTIVITY_KEY = "indexing"  # meta: the large file being embedded now, for `lorekeeper status`

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
    queued: int = 0  # handed to the watcher's background lane
    embedded_chunks: int = 0
    cached_chunks: int = 0
    seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)

    def count(self, path: str, outcome: str) -> None:
        self.outcomes[path] = outcome
        if hasattr(self, outcome) and isinstance(getattr(self, outcome), int):
            setattr(self, outcome, getattr(self, outcome) + 1)

    def merge(self, other: ScanReport) -> None:
        for name in ("indexed", "unchanged", "moved", "removed", "failed", "skipped", "ignored", "queued",
                     "embedded_chunks", "cached_chunks"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outcomes.update(other.outcomes)


@dataclass
class _Scan:
    """What a walk of a folder found: files to index, what the rules leave out, every path seen."""

    files: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str, str, bool]] = field(default_factory=list)  # (path, kind, reason, is_dir)
    seen: set[str] = field(default_factory=set)


class _Pace:
    """Sizes calls to the embedder so that each takes about ``BATCH_SECONDS`` at the pace measured
    so far (on a busy two-core machine one long chunk can take a quarter of a second; on a GPU a
    thousandth). A call's cost grows with its number of texts times its longest text (the batch is
    padded to it), so the pace is kept per character of that product: a pace learned on short notes
    still gives short calls for the long chunks of a large file."""

    FIRST_CALL = 4  # texts in a call before any pace is known

    def __init__(self) -> None:
        self.per_char: float | None = None

    def take(self, texts: list[str], start: int) -> int:
        """How many of ``texts`` from ``start`` the next call embeds (at least one)."""
        limit = min(len(texts) - start, EMBED_BATCH_CHUNKS)
        if self.per_char is None:
            return max(1, min(limit, self.FIRST_CALL))
        count, longest = 1, max(1, len(texts[start]))
        while count < limit:
            longer = max(longest, len(texts[start + count]))
            if (count + 1) * longer * self.per_char > BATCH_SECONDS:
                break
            count, longest = count + 1, longer
        return count

    def record(self, batch: list[str], seconds: float) -> None:
        pace = seconds / max(1, len(batch) * max(map(len, batch), default=1))
        self.per_char = pace if self.per_char is None else 0.7 * self.per_char + 0.3 * pace


class BackgroundStopped(Exception):
    """Background indexing was asked to stop (the watcher is stopping); nothing half-done is stored."""


class _Gate:
    """Foreground indexing goes first: background work waits for it before each embedding batch,
    and stops there (``BackgroundStopped``) once the gate is closed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._foreground = 0
        self.closed = False

    def close(self, closed: bool = True) -> None:
        with self._cond:
            self.closed = closed
            self._cond.notify_all()

    @contextmanager
    def foreground(self):
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    def wait_turn(self, limit: float = 60.0) -> None:
        """Wait while foreground work runs (at most ``limit`` seconds: background work must move)."""
        with self._cond:
            self._cond.wait_for(lambda: self._foreground == 0 or self.closed, timeout=limit)
            if self.closed:
                raise BackgroundStopped()


def embedder_for(store: IndexStore, settings: Settings) -> Embedder:
    """The embedder for an index: the one it was built with, unless the ``embedder`` setting names
    another (an ``Indexer`` with that one re-embeds the index; a search alone refuses to mix them).

    This is the one rule every command and the server follow.
    """
    recorded = store.embed_model
    wanted = settings.embedder or recorded
    return plugins.get_embedder(wanted, settings)


def check_search_embedder(store: IndexStore, embedder: Embedder) -> None:
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
    commits are serialised, searches are never blocked, foreground work goes before background work.

    ``defer`` (set by the watcher) takes the path of a large file met during foreground work, to be
    indexed in the background instead.
    """

    def __init__(
        self, store: IndexStore, embedder: Embedder | None = None, *, settings: Settings | None = None
    ) -> None:
        self.store = store
        self.settings = settings or Settings.load()
        self.embedder = embedder or embedder_for(store, self.settings)
        self._lock = threading.RLock()
        self._gate = _Gate()
        self._pace = _Pace()
        self._rules: dict[str, IgnoreRules] = {}
        self.defer: Callable[[str], None] | None = None
        self.activity: dict[str, tuple[int, int]] = {}  # large file -> (chunks embedded, chunks to embed)
        self.preparer = Preparer(store, self.settings, self.embedder, self.rules_for)
        self.store.ensure_embedder(self.embedder.model_id, self.embedder.dimension)

    # -- folders -----------------------------------------------------------------------------------

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

    def reconcile(
        self, root: str | None = None, progress: Progress | None = None, *, background: bool = False
    ) -> ScanReport:
        """Bring the index in line with the disk: new and changed files indexed, missing ones removed.

        Runs at start-up and periodically, so changes made while nothing watched are caught.
        """
        started = time.monotonic()
        report = ScanReport()
        roots = [r for r in self.store.roots() if root is None or r.path == str(root)]
        report.embedded_chunks += self.fill_missing_vectors(background=background)
        for r in roots:
            report.merge(self._reconcile_folder(r, None, progress, background))
        # vectors of chunks that are gone stay cached a while (a file moved back re-embeds
        # nothing), then go: without this the cache grows for ever
        pruned = self.store.prune_cache(CACHE_KEEP_DAYS)
        if pruned:
            log.info("dropped %d cached vectors unused for %d days", pruned, CACHE_KEEP_DAYS)
        report.seconds = time.monotonic() - started
        return report

    def reconcile_dir(self, directory: str, *, background: bool = False) -> str:
        """Index what is under a folder that appeared, moved or was renamed within a root, and drop
        what is no longer there."""
        root = self.store.root_for(directory)
        if root is None or not os.path.isdir(directory):
            return "ignored"
        report = self._reconcile_folder(root, directory, None, background)
        return "indexed" if report.indexed or report.moved or report.removed else "unchanged"

    def reindex(
        self, root: str | None = None, *, full: bool = False, progress: Progress | None = None
    ) -> ScanReport:
        """Look at every file again (``full``: re-read and re-chunk every one). An interrupted full
        reindex resumes where it stopped when run again, instead of starting over."""
        if full:
            pending = self.store.get_meta(FULL_REINDEX_KEY)
            if pending is None or json.loads(pending).get("root") not in (None, root):
                self.store.forget_file_state(root, content=True)
                self.store.set_meta(FULL_REINDEX_KEY, json.dumps({"root": root, "since": time.time()}))
            else:
                log.info("resuming the full reindex started earlier")
        else:
            self.store.forget_file_state(root)
        report = self.reconcile(root, progress=progress)
        if full:
            self.store.set_meta(FULL_REINDEX_KEY, None)
        return report

    # -- files ---------------------------------------------------------------------------------------

    def index_file(self, path: Path | str) -> str:
        """Index one file now; return its outcome ("indexed", "unchanged", "moved", "removed",
        "failed", "skipped", "ignored")."""
        path = os.path.abspath(str(path))
        return self.index_files([path]).outcomes.get(path, "ignored")

    def index_files(
        self, paths: Iterable[str], progress: Progress | None = None, *, background: bool = False
    ) -> ScanReport:
        """Index these files, committing each as soon as its vectors are ready."""
        report = ScanReport()
        paths = list(paths)
        with self._gate.foreground() if not background else _nothing():
            retry = self._index_pass(paths, report, progress, background)
            if retry:  # changed while being read: once more, with the version on disk now
                self._index_pass(retry, report, None, background)
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
        if src == dst:  # moved away and back before anyone looked: only its content may have changed
            return self.index_file(dst)
        if os.path.isdir(dst):
            return self.move_dir(src, dst)
        with self._lock:
            root = self.store.root_for(dst)
            doc = self.store.get_document(src)
            if (
                root is not None
                and doc is not None
                and doc.status == "indexed"
                and not self._ignored(root, dst)
                and self._same_loader(src, dst, doc.loader)
                and self._same_size(dst, doc.size)
            ):
                self.store.move_document(src, dst, root.id, mtime=os.stat(dst).st_mtime)
                outcome = "moved"
            else:
                outcome = ""
        if not outcome:
            if not os.path.lexists(src):
                self.remove_file(src)
            outcome = self.index_file(dst)
        if os.path.lexists(src):  # a new file has the old name already (vim's save): index it as well
            self.index_file(src)
        return outcome

    def move_dir(self, src: str, dst: str) -> str:
        """A folder renamed or moved: its documents follow it at once (the caller reconciles the
        folder afterwards, to catch what changed on the way)."""
        with self._lock:
            root = self.store.root_for(dst)
            if root is None or src == dst:
                if src != dst:
                    self.store.delete_under(src)
                return "removed" if root is None else "moved"
            reason = self.rules_for(root).reason(dst, is_dir=True)
            if reason is not None:
                self.store.delete_under(src)
                self.store.record_ignored(
                    path=dst, root_id=root.id, kind="ignore rule", reason=reason, is_dir=True
                )
                return "ignored"
            self.store.move_under(src, dst, root.id)
            return "moved"

    def fill_missing_vectors(self, *, background: bool = False) -> int:
        """Embed chunks that have no vector (after an embedder change); return how many were embedded."""
        embedded = 0
        model = self.embedder.model_id
        while True:
            rows = self.store.chunks_missing_vectors(limit=EMBED_BATCH_CHUNKS * 4)
            if not rows:
                return embedded
            cached = self.store.cached_vectors(model, [r.chunk_hash for r in rows])
            todo = {
                r.chunk_hash: embed_text(r.text, r.heading_path) for r in rows if r.chunk_hash not in cached
            }
            if todo:
                cached.update(zip(todo.keys(), self._embed(list(todo.values()), background)))
                embedded += len(todo)
            self.store.set_vectors(model, [(r.id, r.chunk_hash, cached[r.chunk_hash]) for r in rows])

    def stop_background(self, stop: bool = True) -> None:
        """Make background work stop at its next batch (``stop=False`` lets it run again)."""
        self._gate.close(stop)

    def document_text(self, path: Path | str) -> str:
        """The file's text as its loader extracts it (what a document resource returns), read through
        a descriptor checked against the watched folders like every file the indexer reads."""
        return self.preparer.text_of(os.path.abspath(str(path)))

    def rules_for(self, root: Root) -> IgnoreRules:
        rules = self._rules.get(root.path)
        if rules is None:
            rules = self._rules[root.path] = IgnoreRules(root.path)
        return rules

    def is_ignored(self, path: str) -> bool:
        root = self.store.root_for(path)
        return root is None or self._ignored(root, path)

    # -- the pipeline --------------------------------------------------------------------------------

    def _ignored(self, root: Root, path: str, is_dir: bool = False) -> bool:
        return self.rules_for(root).is_ignored(path, is_dir=is_dir)

    def _same_loader(self, src: str, dst: str, recorded: str | None) -> bool:
        """Whether the new name reads the same way as the old one (so its chunks still stand)."""
        if src.lower().endswith(".gz") != dst.lower().endswith(".gz"):
            return False
        by_name = plugins.loader_for(Path(dst))
        if by_name is not None:
            return self.preparer.recipe(loader_id(by_name)) == recorded
        return plugins.loader_for(Path(src)) is None  # both read by content: the loader stays

    @staticmethod
    def _same_size(path: str, size: int | None) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return not os.path.islink(path) and st.st_size == size

    def _reconcile_folder(self, root: Root, under: str | None, progress: Progress | None,
                          background: bool) -> ScanReport:  # fmt: skip
        started = time.time()
        scan = self._walk(root, under)
        self.store.sync_ignored(root.id, scan.ignored, scan.seen, under=under)
        report = self.index_files(scan.files, progress=progress, background=background)
        report.ignored += len(scan.ignored)
        present = set(scan.files)
        docs = self.store.documents(root.path)
        prefix = None if under is None else under.rstrip(os.sep) + os.sep
        for doc in docs:
            if doc.path in present or (prefix is not None and not doc.path.startswith(prefix)):
                continue
            # a file indexed since the walk began was seen by someone else (the watcher): keep it
            if self.store.delete_document_if_older(doc.path, started):
                report.count(doc.path, "removed")
        return report

    def _walk(self, root: Root, start: str | None = None) -> _Scan:
        """Files under ``start`` (default: the root) that no rule ignores, and what the rules leave out."""
        rules = self.rules_for(root)
        scan = _Scan()
        for directory, dirnames, filenames in os.walk(start or root.path, followlinks=False):
            keep = []
            for name in sorted(dirnames):
                full = os.path.join(directory, name)
                scan.seen.add(full)
                reason = rules.reason(full, is_dir=True)
                if reason is not None:
                    scan.ignored.append((full, "ignore rule", reason, True))
                elif os.path.islink(full):
                    scan.ignored.append((full, "symlink", "a link to a folder: links to folders are not "
                                         "followed; add the folder itself to index it", True))  # fmt: skip
                else:
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                full = os.path.join(directory, name)
                scan.seen.add(full)
                reason = rules.reason(full)
                if reason is not None:
                    scan.ignored.append((full, "ignore rule", reason, False))
                else:
                    scan.files.append(full)
        return scan

    def _index_pass(self, paths: list[str], report: ScanReport, progress: Progress | None,
                    background: bool) -> list[str]:  # fmt: skip
        """One pass over ``paths``; returns those that changed between the read and the commit."""
        waiting: list[Prepared] = []  # small files whose chunks are embedded together
        changed: list[str] = []
        for done, path in enumerate(paths, 1):
            if background:
                self._gate.wait_turn()
            if self._deferred(path, report, background):
                continue
            prepared = self.preparer.prepare(path, report.count)
            if prepared is not None:
                self._from_cache(prepared, report)
                if not prepared.missing:
                    self._commit(prepared, {}, report, changed)
                elif len(prepared.missing) > LARGE_DOC_CHUNKS:
                    if not self._deferred(path, report, background, force=True):
                        self._embed_large(prepared, report, changed, background)
                else:
                    waiting.append(prepared)
                    if sum(len(p.missing) for p in waiting) >= EMBED_BATCH_CHUNKS:
                        self._embed_together(waiting, report, changed, background)
                        waiting = []
            if progress:
                progress(done, len(paths), path)
        self._embed_together(waiting, report, changed, background)
        return changed

    def _deferred(self, path: str, report: ScanReport, background: bool, force: bool = False) -> bool:
        """Hand a large file to the watcher's background lane, if there is one and this is not it."""
        if background or self.defer is None:
            return False
        if not force:
            try:
                if os.stat(path).st_size <= LARGE_FILE_BYTES:
                    return False
            except OSError:
                return False
        self.defer(path)
        report.count(path, "queued")
        return True

    def _from_cache(self, prepared: Prepared, report: ScanReport) -> None:
        vectors = self.store.cached_vectors(self.embedder.model_id, (c.chunk_hash for c in prepared.chunks))
        report.cached_chunks += sum(1 for c in prepared.chunks if c.chunk_hash in vectors)
        prepared.vectors = vectors
        prepared.missing = list(
            dict.fromkeys(c.chunk_hash for c in prepared.chunks if c.chunk_hash not in vectors)
        )

    def _embed(self, texts: list[str], background: bool) -> np.ndarray:
        """Vectors for ``texts``, a short batch at a time (``_Pace``), so a search query or a file just
        saved never waits long for the embedder; background work lets foreground work go first."""
        parts = []
        start = 0
        while start < len(texts):
            if background:
                self._gate.wait_turn()
            batch = texts[start : start + self._pace.take(texts, start)]
            start += len(batch)
            began = time.monotonic()
            vectors = self.embedder.embed(batch)
            self._pace.record(batch, time.monotonic() - began)
            if vectors.shape != (len(batch), self.embedder.dimension):
                raise RuntimeError(
                    f"embedder {self.embedder.model_id} returned shape {vectors.shape} for {len(batch)} texts; "
                    f"expected ({len(batch)}, {self.embedder.dimension})"
                )
            parts.append(vectors)
        return np.concatenate(parts) if parts else np.zeros((0, self.embedder.dimension), dtype=np.float32)

    def _embed_together(self, docs: list[Prepared], report: ScanReport, changed: list[str],
                        background: bool) -> None:  # fmt: skip
        """Embed the missing chunks of several small files in shared batches, then commit each."""
        if not docs:
            return
        todo: dict[str, str] = {}
        for prepared in docs:
            for chunk in prepared.chunks:
                if chunk.chunk_hash in prepared.missing:
                    todo.setdefault(chunk.chunk_hash, chunk.embed_text)
        vectors = dict(zip(todo, self._embed(list(todo.values()), background)))
        report.embedded_chunks += len(todo)
        for prepared in docs:
            self._commit(prepared, vectors, report, changed)

    def _embed_large(self, prepared: Prepared, report: ScanReport, changed: list[str],
                     background: bool) -> None:  # fmt: skip
        """Embed a large file batch by batch, keeping each batch in the cache (a kill loses one batch),
        reporting progress, and giving up early when the file changes under it."""
        texts = {c.chunk_hash: c.embed_text for c in prepared.chunks}
        missing, path = prepared.missing, prepared.path
        name, total, last_note = os.path.basename(path), len(missing), time.monotonic()
        log.info("embedding %s: %d new chunks", name, total)
        try:
            for start in range(0, total, EMBED_BATCH_CHUNKS):
                hashes = missing[start : start + EMBED_BATCH_CHUNKS]
                batch = self._embed([texts[h] for h in hashes], background)
                self.store.cache_vectors(self.embedder.model_id, zip(hashes, batch))
                prepared.vectors.update(zip(hashes, batch))
                report.embedded_chunks += len(hashes)
                self.activity[path] = (start + len(hashes), total)
                if time.monotonic() - last_note >= PROGRESS_SECONDS:
                    last_note = time.monotonic()
                    log.info("embedding %s: %d/%d chunks", name, start + len(hashes), total)
                    self.store.set_meta(ACTIVITY_KEY, json.dumps({"path": path, "done": start + len(hashes),
                                                                  "total": total, "at": time.time()}))  # fmt: skip
                if not files.still_same(path, prepared.identity):
                    changed.append(path)  # a newer version is on disk: that one is indexed next
                    return
            self._commit(prepared, {}, report, changed)
        finally:
            self.activity.pop(path, None)
            if self.store.get_meta(ACTIVITY_KEY) and not self.activity:
                self.store.set_meta(ACTIVITY_KEY, None)

    def _commit(self, prepared: Prepared, vectors: dict[str, np.ndarray], report: ScanReport,
                changed: list[str]) -> None:  # fmt: skip
        """Store a document, if the file on disk is still the version that was read (``vectors``: new
        ones, besides those the document holds already)."""
        vectors = prepared.vectors | vectors
        with self._lock:
            if not files.still_same(prepared.path, prepared.identity):
                changed.append(prepared.path)
                return
            self.store.replace_document(
                path=prepared.path, root_id=prepared.root.id, size=prepared.size, mtime=prepared.mtime,
                content_hash=prepared.content_hash, loader=prepared.loader_id, chunks=prepared.chunks,
                vectors=np.stack([vectors[c.chunk_hash] for c in prepared.chunks]),
                model_id=self.embedder.model_id, note=prepared.note,
            )  # fmt: skip
        report.count(prepared.path, "indexed")


@contextmanager
def _nothing():
    yield
