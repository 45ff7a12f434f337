"""One file to chunks ready for the embedder, or to the reason it is not indexed.

Steps, each its own function: admit the path (inside a root, no ignore rule), open it once through
a checked descriptor (``files.open_checked``), skip it when its stat or bytes are unchanged, pick a
loader (by name, by content for files no loader claims, inside a ``.gz``), extract its text within
the per-file bounds (``max_chars_per_file``, ``max_chunks_per_file``), and chunk it. A file that is
not indexed is recorded with its reason: ``ignored`` (left out on purpose: a rule, binary
content), ``skipped`` (too large, empty, a link out of the roots) or ``failed`` (an error); a
skipped file and most failed ones lose the chunks they had (``files.FileProblem.keep_chunks``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorekeeper import plugins
from lorekeeper.plugins.base import BinaryFileError, Embedder, Loader, LoaderError, TextLimitError

from . import files
from .chunker import Chunk, TooManyChunks, chunk_units
from .files import CheckedFile, FileGone, FileProblem
from .ignore import IgnoreRules
from .settings import Settings
from .store import STATUS_IGNORED, Root
from .stores import IndexStore

log = logging.getLogger(__name__)

OVERLAP_TOKENS = 32
# in a document's loader id, the chunk size when it is not the embedder's whole window
# ("text:1+chunks128"): a file chunked at another size than the settings' is re-chunked when next seen
CHUNKS_MARK = "+chunks"


@dataclass
class Prepared:
    """A file read, extracted and chunked, waiting for the vectors its chunks lack."""

    path: str
    root: Root
    size: int
    mtime: float
    identity: tuple[int, int, int, int]  # the file version read (device, inode, size, mtime)
    content_hash: str
    loader_id: str
    chunks: list[Chunk]
    note: str | None
    missing: list[str] = field(default_factory=list)  # chunk hashes with no vector yet
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # the vectors known so far, by hash


Count = Callable[[str, str], None]  # (path, outcome)


def loader_id(loader: Loader) -> str:
    return f"{loader.name}:{loader.version}"


def chunk_size(settings: Settings, embedder: Embedder) -> int:
    """The chunk size in tokens: the ``chunk_tokens`` setting within the embedder's window."""
    window = embedder.max_tokens - 2  # room for the model's [CLS] and [SEP]
    wanted = settings.chunk_tokens
    return window if wanted is None else max(16, min(int(wanted), window))


class Preparer:
    """Turns paths into ``Prepared`` files, recording every file it does not index, with why."""

    def __init__(self, store: IndexStore, settings: Settings, embedder: Embedder,
                 rules_for: Callable[[Root], IgnoreRules]) -> None:  # fmt: skip
        self.store, self.settings, self.embedder, self.rules_for = store, settings, embedder, rules_for

    @property
    def chunk_tokens(self) -> int:
        return chunk_size(self.settings, self.embedder)

    def recipe(self, lid: str | None) -> str | None:
        """A loader id as recorded with a document: with the chunk size when that is not the whole window."""
        if lid is None:
            return None
        base = lid.split(CHUNKS_MARK, 1)[0]
        size = self.chunk_tokens
        return base if size == self.embedder.max_tokens - 2 else f"{base}{CHUNKS_MARK}{size}"

    def prepare(self, path: str, count: Count) -> Prepared | None:
        path = os.path.abspath(path)
        root = self._admit(path, count)
        if root is None:
            return None
        try:
            handle = files.open_checked(path, [r.path for r in self.store.roots()])
        except FileGone:
            self.gone(path, count)
            return None
        except FileProblem as problem:
            self._problem(path, root, problem, count)
            return None
        with handle:
            try:
                return self._examine(path, root, handle, count)
            except FileGone:
                self.gone(path, count)
            except FileProblem as problem:
                self._problem(path, root, problem, count, handle.st)
            except OSError as exc:  # a read error after the open: a disk, a network share
                reason = f"cannot read the file: {exc.strerror or exc}"
                self._problem(path, root, FileProblem("failed", "read error", reason, True), count, handle.st)
        return None

    def text_of(self, path: str, expect: str | None = None) -> str:
        """A file's text as its loader extracts it, read the same checked way (``read_text``)."""
        return read_text(path, [r.path for r in self.store.roots()], max_bytes=self.settings.max_file_bytes,
                         max_chars=self.settings.max_chars_per_file, expect=expect)  # fmt: skip

    def gone(self, path: str, count: Count) -> None:
        self.store.delete_document(path)
        count(path, "removed")

    # -- the steps --------------------------------------------------------------------------------

    def _admit(self, path: str, count: Count) -> Root | None:
        root = self.store.root_for(path)
        if root is None:
            count(path, "ignored")
            return None
        found = self.rules_for(root).match(path)
        if found is not None:
            reason, folder = found
            if folder is not None:  # inside an ignored folder: the folder is what is listed, once
                if self.store.get_ignored(folder) is None and os.path.isdir(folder):
                    self.store.record_ignored(path=folder, root_id=root.id, kind="ignore rule", reason=reason,
                                              is_dir=True)  # fmt: skip
            elif os.path.lexists(path):
                self.store.record_ignored(path=path, root_id=root.id, kind="ignore rule", reason=reason)
            count(path, "ignored")
            return None
        return root

    def _examine(self, path: str, root: Root, handle: CheckedFile, count: Count) -> Prepared | None:
        st = handle.st
        by_name = plugins.loader_for(Path(path))
        doc = self.store.get_document(path)
        expected = self.recipe(loader_id(by_name) if by_name is not None else (doc.loader if doc else None))
        if doc is not None and doc.size == st.st_size and doc.mtime == st.st_mtime and doc.loader == expected:
            count(path, "unchanged")
            return None
        known = self.store.get_ignored(path)
        if known is not None and (known.size, known.mtime) == (st.st_size, st.st_mtime) and by_name is None:
            count(path, "ignored")  # the same binary file as last time
            return None
        limit = self.settings.max_file_bytes
        if by_name is None:  # decide text or binary from the first bytes before reading the rest
            _sniff_or_raise(path, handle.read(files.SNIFF_BYTES))
        if st.st_size > limit:
            raise _too_large(st.st_size, limit)
        raw = handle.read(limit)
        if len(raw) > limit:
            raise _too_large(len(raw), limit)  # it grew since it was opened
        loader, data, note = _choose_loader(path, raw, by_name, limit)
        if not data.strip():
            raise FileProblem("skipped", "empty", "empty file: nothing to index")
        content_hash = hashlib.sha256(raw).hexdigest()
        lid = self.recipe(loader_id(loader))
        if (
            doc is not None
            and doc.content_hash == content_hash
            and doc.loader == lid
            and doc.status == "indexed"
        ):
            self.store.touch_document(path, st.st_size, st.st_mtime)
            count(path, "unchanged")
            return None
        if doc is None and self._adopt_moved(path, root, content_hash, lid, st.st_mtime):
            count(path, "moved")
            return None
        chunks, warnings = self._extract(path, loader, data)
        notes = [note] if note else []
        return Prepared(path=path, root=root, size=st.st_size, mtime=st.st_mtime, identity=handle.identity,
                        content_hash=content_hash, loader_id=lid, chunks=chunks,
                        note="; ".join(notes + warnings) or None)  # fmt: skip

    def _extract(self, path: str, loader: Loader, data: bytes) -> tuple[list[Chunk], list[str]]:
        """The file's chunks within the per-file bounds, and the loader's warnings."""
        max_chars = self.settings.max_chars_per_file
        try:
            loaded = loader.load_data(Path(path), data, max_chars=max_chars)
        except TextLimitError as exc:
            raise FileProblem("failed", "too much text", str(exc)) from exc
        except BinaryFileError as exc:
            raise FileProblem("failed", "binary", str(exc)) from exc
        except LoaderError as exc:  # a bad save: the last good version stays searchable
            raise FileProblem("failed", "loader error", str(exc), keep_chunks=True) from exc
        except FileNotFoundError as exc:
            raise FileGone(path) from exc
        except Exception as exc:  # a loader bug must not stop the rest of the folder
            log.exception("loader %s failed on %s", loader.name, path)
            reason = f"{loader.name} loader error: {type(exc).__name__}: {exc}"
            raise FileProblem("failed", "loader error", reason, keep_chunks=True) from exc
        try:
            chars = sum(len(unit.text) for unit in loaded)
            if chars > max_chars:
                raise FileProblem("failed", "too much text", f"{path}: {chars:,} characters of text, over "
                                  f"the max_chars_per_file limit of {max_chars:,}; raise it to index the file")  # fmt: skip
            chunks = chunk_units(
                loaded,
                token_spans=self.embedder.token_spans,
                max_tokens=self.chunk_tokens,
                overlap_tokens=OVERLAP_TOKENS,
                max_chunks=self.settings.max_chunks_per_file,
            )
        except TooManyChunks as exc:
            raise FileProblem("failed", "too many chunks", f"{path}: {exc}") from exc
        if not chunks:
            raise FileProblem("skipped", "no text", "no text found in the file")
        return chunks, list(getattr(loaded, "warnings", []) or [])

    def _adopt_moved(self, path: str, root: Root, content_hash: str, lid: str, mtime: float) -> bool:
        """A new path whose bytes match an indexed document that no longer exists: a move."""
        for doc in self.store.find_by_hash(content_hash):
            if doc.loader == lid and doc.status == "indexed" and not os.path.exists(doc.path):
                return self.store.move_document(doc.path, path, root.id, mtime=mtime)
        return False

    def _problem(self, path: str, root: Root, problem: FileProblem, count: Count,
                 st: os.stat_result | None = None) -> None:  # fmt: skip
        size, mtime = (st.st_size, st.st_mtime) if st is not None else (None, None)
        if problem.status == STATUS_IGNORED:
            self.store.record_ignored(path=path, root_id=root.id, kind=problem.kind, reason=problem.reason,
                                      size=size, mtime=mtime)  # fmt: skip
        else:
            by_name = plugins.loader_for(Path(path))
            self.store.record_problem(path=path, root_id=root.id, status=problem.status, error=problem.reason,
                                      size=size, mtime=mtime, loader=loader_id(by_name) if by_name else None,
                                      keep_chunks=problem.keep_chunks)  # fmt: skip
        count(path, problem.status)


def read_text(path: str, roots: list[str], *, max_bytes: int, max_chars: int | None,
              expect: str | None = None) -> str:  # fmt: skip
    """The text of ``path`` as the indexer extracts it (same loader choice, ``.gz`` and sniffing),
    read once through a descriptor checked against ``roots`` (``files.open_checked``), or a
    ``LoaderError`` that says why not: outside the folders, a link out of them, too large, binary.
    ``expect`` (a real path) also requires the opened file to be that one, so a name switched to
    another file inside the folders (an ignored one, say) is refused too. This is what a document
    resource serves: the same bytes and bounds as the index, never the path opened again by name.
    """
    path = os.path.abspath(path)
    if not files.inside(path, roots):
        raise LoaderError(f"{path}: not inside a watched folder")
    try:
        with files.open_checked(path, roots) as handle:
            if expect is not None and handle.real_path != expect:
                raise LoaderError(f"{path} changed into another file while it was being opened; try again")
            by_name = plugins.loader_for(Path(path))
            if by_name is None:
                _sniff_or_raise(path, handle.read(files.SNIFF_BYTES))
            raw = handle.read(max_bytes)
            if len(raw) > max_bytes:
                raise _too_large(max(len(raw), handle.st.st_size), max_bytes)
            loader, data, _ = _choose_loader(path, raw, by_name, max_bytes)
    except FileGone as exc:
        what = "a folder, not a file" if os.path.isdir(path) else "not found (deleted or moved)"
        raise LoaderError(f"{path}: {what}") from exc
    except FileProblem as problem:
        raise LoaderError(f"{path}: {problem.reason}") from problem
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc
    units = loader.load_data(Path(path), data, max_chars=max_chars)
    return "\n\n".join(unit.text for unit in units)


def _too_large(size: int, limit: int) -> FileProblem:
    return FileProblem(
        "skipped", "too large", f"file is {size / 2**20:.1f} MB, over the {limit / 2**20:g} MB limit; "
        "raise it with `lorekeeper config set max_file_mb N` to index it"
    )  # fmt: skip


def _sniff_or_raise(path: str, head: bytes, what: str = "") -> None:
    if path.lower().endswith(".gz") and not what:
        if not head.startswith(b"\x1f\x8b"):
            raise FileProblem("failed", "corrupt", "not a gzip file, though its name ends in .gz")
        return
    binary = files.sniff(head)
    if binary is not None:
        name = Path(path).name
        suffix = Path(name).suffix.lower()
        no_loader = f"no loader handles {suffix} files" if suffix else f"no loader handles files named {name}"
        raise FileProblem("ignored", "binary", f"{binary}{what}; {no_loader} (a loader plugin can add one)")


def _choose_loader(
    path: str, raw: bytes, by_name: Loader | None, limit: int
) -> tuple[Loader, bytes, str | None]:
    """The loader for a file and the bytes it reads (decompressed for ``.gz``), with a note on how
    it was chosen when that was not by its name."""
    if by_name is not None:
        return by_name, raw, None
    if path.lower().endswith(".gz"):
        inner_name = path[:-3]
        data = files.gunzip(raw, limit)
        inner = plugins.loader_for(Path(inner_name))
        if inner is None:
            _sniff_or_raise(inner_name, data[: files.SNIFF_BYTES], " inside the .gz")
            inner = _text_loader()
        return inner, data, f"read from the gzip-compressed file ({len(raw):,} -> {len(data):,} bytes)"
    return _text_loader(), raw, None


def _text_loader() -> Loader:
    loader = plugins.loader_for(Path("x.txt"))
    if loader is None:  # pragma: no cover - the built-in text loader is always registered
        raise FileProblem("ignored", "no loader", "no loader for plain text is registered")
    return loader
