"""Watches the registered folders and feeds changes to the indexer within a second.

File events are coalesced per path and debounced: an editor's save (write a temporary file, rename
it over the original), a ``git checkout`` of thousands of files, or a file written in many small
pieces becomes one indexing pass per file, batched across files for the embedder. A reconcile scan
at start and every few minutes catches what changed while nothing watched (or what the OS did not
report). Where native events are unavailable (network shares, the inotify watch limit) the folder is
polled instead.

Two lanes, so a small change never waits behind a large one. The event lane indexes files just
saved, in the foreground. The background lane runs what takes long: reconcile scans, folders that
appeared or moved (each one's subtree is reconciled: a folder moved out and back, or renamed twice,
can leave the OS's watches pointing at old paths), and large files (over
``indexer.LARGE_FILE_BYTES``, or needing more than ``indexer.LARGE_DOC_CHUNKS`` new vectors), which
the indexer embeds a batch at a time, giving way to the event lane before each batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .ignore import IGNORE_FILES
from .indexer import BackgroundStopped, Indexer
from .settings import Settings
from .store import StoreError

log = logging.getLogger(__name__)
# watchdog warns when a folder that was moved out and back gets its inotify watch again; the subtree
# reconcile below is the answer to that situation, so the warning is only noise on the console
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)

NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "fuse.sshfs",
    "9p",
    "afs",
    "davfs",
    "fuse.rclone",
}
MAX_ERRORS = 50  # errors kept for status; older ones are in the log
EVENT_LANE_FILES = 100  # files the event lane indexes in one go; the rest of a burst goes to the background


@dataclass
class _Pending:
    first: float
    last: float
    moved_from: str | None = None
    is_dir: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type in ("modified", "closed"):
            return  # a folder's own "modified" only says something inside it changed
        src = os.fsdecode(event.src_path)
        if event.event_type == "moved":
            self.watcher.notify_move(src, os.fsdecode(event.dest_path), event.is_directory)
        else:
            self.watcher.notify(src, event.is_directory)


def _filesystem_type(path: str) -> str | None:
    """The mount's file system type on Linux (from /proc/mounts); None elsewhere."""
    try:
        with open("/proc/mounts", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    best, kind = "", None
    for fields in mounts:
        if len(fields) >= 3 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


class Watcher:
    """Watches every registered root (and ones added later with ``watch``) for one indexer."""

    def __init__(
        self,
        indexer: Indexer,
        debounce: float | None = None,
        max_delay: float = 2.0,
        reconcile_interval: float = 300.0,
        force_polling: bool | None = None,
        poll_interval: float = 1.0,
        settings: Settings | None = None,
    ) -> None:
        self.indexer = indexer
        settings = settings or indexer.settings
        self.debounce = settings.debounce if debounce is None else debounce
        self.max_delay = max_delay  # a file written continuously is still indexed this often
        self.reconcile_interval = reconcile_interval
        self.poll_interval = poll_interval
        self.force_polling = force_polling if force_polling is not None else settings.polling
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._busy = False
        # the background lane's jobs, in order: ("reconcile", ""), ("dir", path), ("file", path)
        self._jobs: dict[tuple[str, str], None] = {("reconcile", ""): None}  # first: catch up with the disk
        self._job: tuple[str, str] | None = None  # the one running
        self._stop = threading.Event()
        self._observers: dict[str, object] = {}
        self._threads: list[threading.Thread] = []
        self.modes: dict[str, str] = {}  # root -> "native" or "polling"
        self.errors: deque[str] = deque(maxlen=MAX_ERRORS)  # the latest few, for status

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for root in self.indexer.store.roots():
            self.watch(root.path, register=False)
        self._stop.clear()
        self.indexer.stop_background(False)
        self.indexer.defer = self._defer_large
        self._threads = [
            threading.Thread(target=self._run, name="lorekeeper-watcher", daemon=True),
            threading.Thread(target=self._run_background, name="lorekeeper-watcher-background", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.indexer.stop_background()
        with self._cond:
            self._cond.notify_all()
        for observer in list(self._observers.values()):
            observer.stop()
        for observer in list(self._observers.values()):
            observer.join(timeout=5)
        self._observers.clear()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        if self.indexer.defer == self._defer_large:
            self.indexer.defer = None

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def watch(self, path: str, register: bool = True) -> None:
        """Start watching a folder; with ``register`` it becomes a root and is indexed."""
        resolved = str(os.path.realpath(os.path.expanduser(path)))
        if register:
            self.indexer.store.add_root(resolved)
            self.request_reconcile()
        if resolved in self._observers:
            return
        observer = self._make_observer(resolved)
        self._observers[resolved] = observer

    def unwatch(self, path: str) -> None:
        resolved = str(os.path.realpath(os.path.expanduser(path)))
        observer = self._observers.pop(resolved, None)
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _make_observer(self, root: str):
        handler = _Handler(self)
        polling = self.force_polling or (_filesystem_type(root) in NETWORK_FILESYSTEMS)
        if not polling:
            try:
                observer = Observer()
                observer.schedule(handler, root, recursive=True)
                observer.start()
                self.modes[root] = "native"
                return observer
            except OSError as exc:  # inotify watch or instance limits, unsupported file systems
                log.warning("native file events unavailable for %s (%s); polling instead", root, exc)
                self.errors.append(f"{root}: native events unavailable ({exc}); polling every "
                                   f"{self.poll_interval:g} s")  # fmt: skip
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, root, recursive=True)
        observer.start()
        self.modes[root] = "polling"
        return observer

    # -- events ----------------------------------------------------------------------------------

    def notify(self, path: str, is_dir: bool = False) -> None:
        now = time.monotonic()
        with self._cond:
            entry = self._pending.get(path)
            if entry is None:
                self._pending[path] = _Pending(now, now, is_dir=is_dir)
            else:
                entry.last = now
                entry.is_dir = entry.is_dir or is_dir
            self._cond.notify_all()

    def notify_move(self, src: str, dst: str, is_dir: bool = False) -> None:
        """A rename, coalesced with what is pending: a file created (or moved in) and renamed again
        within the debounce window is one move from where it came from. A path whose indexed
        document is displaced on the way is looked at again: ``src`` when something had been moved
        onto it (an editor's save, then a rename), and what had been moved onto ``dst`` when ``dst``
        is replaced in turn (a rename, then an editor's save). Without that, the old document stays
        in the index after its file is gone."""
        now = time.monotonic()
        with self._cond:
            earlier = self._pending.pop(src, None)
            if earlier is not None and earlier.moved_from:
                moved_from = earlier.moved_from
                self._recheck(src, earlier.is_dir, now)
            else:
                moved_from = src
            displaced = self._pending.get(dst)
            if displaced is not None and displaced.moved_from not in (None, moved_from, dst):
                self._recheck(displaced.moved_from, displaced.is_dir, now)
            self._pending[dst] = _Pending(earlier.first if earlier else now, now, moved_from, is_dir)
            self._cond.notify_all()

    def _recheck(self, path: str, is_dir: bool, now: float) -> None:
        """Look at ``path`` again when events are processed (held: ``_cond``)."""
        entry = self._pending.get(path)
        if entry is None:
            self._pending[path] = _Pending(now, now, is_dir=is_dir)
        else:
            entry.last = now

    def request_reconcile(self) -> None:
        self._add_job("reconcile", "")

    def pending(self) -> int:
        """Changes waiting or being indexed: events, background jobs, and the job running."""
        with self._cond:
            return len(self._pending) + len(self._jobs) + (1 if self._busy else 0) + (1 if self._job else 0)

    def progress(self) -> dict[str, object]:
        """What is waiting and running, for status: pending events, background jobs, and the chunks
        embedded so far of each large file being indexed."""
        with self._cond:
            jobs = [f"{kind} {path}".strip() for kind, path in self._jobs]
            running = f"{self._job[0]} {self._job[1]}".strip() if self._job else None
            events = len(self._pending) + (1 if self._busy else 0)
        return {
            "events": events,
            "background": jobs,
            "running": running,
            "large_files": {
                path: {"done": d, "total": t} for path, (d, t) in dict(self.indexer.activity).items()
            },
        }

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no event is waiting or being processed; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy or self._jobs or self._job:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    # -- the worker ------------------------------------------------------------------------------

    def _add_job(self, kind: str, path: str) -> None:
        with self._cond:
            self._jobs[(kind, path)] = None
            self._cond.notify_all()

    def _defer_large(self, path: str) -> None:
        self._add_job("file", path)

    def _run(self) -> None:
        """The event lane: debounced file events, indexed in the foreground."""
        while not self._stop.is_set():
            with self._cond:
                now = time.monotonic()
                ready = {
                    path: entry
                    for path, entry in self._pending.items()
                    if now - entry.last >= self.debounce or now - entry.first >= self.max_delay
                }
                if not ready:
                    waits = [self.debounce - (now - e.last) for e in self._pending.values()]
                    self._cond.wait(max(0.01, min(waits, default=1.0)))
                    continue
                for path in ready:
                    del self._pending[path]
                self._busy = True
            try:
                self._process(ready)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run_background(self) -> None:
        """The background lane: reconciles (at start, on request, every ``reconcile_interval``),
        folders to reconcile, and large files."""
        last_reconcile = time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                if time.monotonic() - last_reconcile >= self.reconcile_interval:
                    self._jobs.setdefault(("reconcile", ""), None)
                if not self._jobs:
                    self._cond.wait(max(0.05, self.reconcile_interval - (time.monotonic() - last_reconcile)))
                    continue
                job = next(iter(self._jobs))
                del self._jobs[job]
                self._job = job
            kind, path = job
            try:
                if kind == "reconcile":
                    self._safely(self.indexer.reconcile, background=True)
                    last_reconcile = time.monotonic()
                elif kind == "dir":
                    self._safely(self.indexer.reconcile_dir, path, background=True)
                else:
                    self._safely(self.indexer.index_files, [path], background=True)
            finally:
                with self._cond:
                    self._job = None
                    self._cond.notify_all()

    def _safely(self, func, *args, **kwargs) -> object:
        try:
            return func(*args, **kwargs)
        except BackgroundStopped:
            return None
        except Exception as exc:  # one bad event must never stop the watcher
            name = getattr(func, "__name__", func)
            if isinstance(exc, StoreError):  # a full disk, a lost server: the message says what to do
                log.error("watcher: %s%s failed: %s", name, args, exc)
            else:
                log.exception("watcher: %s%s failed", name, args)
            self.errors.append(f"{name}{args}: {exc}")
            return None

    def _process(self, ready: dict[str, _Pending]) -> None:
        folders: list[str] = []  # folders that appeared or moved: their subtrees are reconciled
        files: list[tuple[float, str]] = []
        for path, entry in ready.items():
            name = os.path.basename(path)
            if name in IGNORE_FILES:
                # ignore rules changed: forget them and look at the whole root again
                root = self.indexer.store.root_for(path)
                if root is not None:
                    self.indexer.rules_for(root).invalidate(os.path.dirname(path))
                    self.request_reconcile()
                continue
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            if entry.moved_from is not None and (is_dir or entry.is_dir):
                self._safely(self.indexer.move_dir, entry.moved_from, path)
                if is_dir:
                    folders.append(path)
            elif entry.moved_from is not None:
                self._safely(self.indexer.move_file, entry.moved_from, path)
            elif is_dir:
                if not self.indexer.is_ignored(path):
                    folders.append(path)
            elif os.path.lexists(path):
                files.append((entry.last, path))
            else:
                self._safely(self.indexer.remove_file, path)
        for folder in folders:
            self._add_job("dir", folder)
        inside = tuple(folder.rstrip(os.sep) + os.sep for folder in folders)
        # files in a folder that is reconciled anyway wait for that; the newest files go first
        files = sorted((f for f in files if not f[1].startswith(inside)), reverse=True)
        for _, path in files[EVENT_LANE_FILES:]:
            self._add_job("file", path)
        if files:
            self._safely(self.indexer.index_files, [path for _, path in files[:EVENT_LANE_FILES]])
