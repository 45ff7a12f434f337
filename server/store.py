"""The index: one SQLite file holding roots, documents, chunks, their vectors and keywords.

Vectors live in a sqlite-vec ``vec0`` table and keywords in an FTS5 table; both are written in the
same transaction as the chunks they describe, one transaction per document, so a crash at any moment
leaves every document either wholly old or wholly new. The database runs in WAL mode: each thread
reads through its own connection and never waits for the writer.

The store knows nothing of models or MCP: callers hand it chunks and vectors, and search asks it
for candidates through public query methods (``filter_documents``, ``vector_search``,
``keyword_search``, ``chunk_hits``), so the SQL of one backend stays in one class. That is why this
module is longer than most: splitting one backend's SQL over several files would scatter the
one-transaction-per-document rule it keeps.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlean
import sqlite_vec

from .keyword_index import KeywordIndex
from .migrations import migrate
from .settings import tighten
from .vector_index import RESET, VectorIndex

log = logging.getLogger(__name__)

STATUS_INDEXED = "indexed"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUS_IGNORED = "ignored"
FILE_KINDS = ("indexed", "failed", "skipped", "ignored")
PRIVATE_MODE = 0o600  # the index holds the text of private files


class StoreError(Exception):
    """The index file cannot be used; the message says what to do."""


def _read_only_folder(path: Path) -> bool:
    """Whether the index's folder is on a read-only file system or not writable by this user."""
    folder = Path(path).parent
    try:
        if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1):
            return True
    except OSError:
        return False
    return not os.access(folder, os.W_OK)


class StoreWriteError(StoreError, OSError):
    """The index could not be written: the disk is full, read-only or failing. The transaction was
    rolled back, so everything written before is intact; the message says what to do."""


def write_error(path: Path, exc: BaseException) -> StoreWriteError | None:
    """A clear ``StoreWriteError`` for SQLite's disk-full, read-only and I/O errors; None for others."""
    text = str(exc).lower()
    if "unable to open" in text and _read_only_folder(path):
        text = "readonly"
    if "full" in text:
        return StoreWriteError(
            f"the disk holding the index {path} is full: make free space there (or move the index with "
            "--db), then run the command again; everything indexed before this point is kept"
        )
    if "readonly" in text or "read-only" in text:
        return StoreWriteError(
            f"the index {path} cannot be written (a read-only file system, or no permission to write "
            "there): make it writable or point --db at a writable place"
        )
    if "disk i/o error" in text or "unable to open" in text:
        return StoreWriteError(
            f"the index {path} could not be written ({exc}): check the disk and its free space, then retry"
        )
    return None


@dataclass
class Root:
    id: int
    path: str
    added_at: float


@dataclass
class DocumentRow:
    id: int
    root_id: int
    path: str
    size: int | None
    mtime: float | None
    content_hash: str | None
    loader: str | None
    status: str
    error: str | None
    chunk_count: int
    indexed_at: float | None
    note: str | None = None


@dataclass
class ChunkRow:
    id: int
    document_id: int
    seq: int
    text: str
    char_start: int | None
    char_end: int | None
    start_line: int | None
    end_line: int | None
    page: int | None
    heading_path: list[str]
    chunk_hash: str


@dataclass
class ChunkWithPath(ChunkRow):
    path: str = ""


@dataclass
class FailedFile:
    path: str
    status: str
    error: str


@dataclass
class RootStatus:
    path: str
    documents: int
    chunks: int
    failed: int
    skipped: int
    ignored: int = 0


@dataclass
class FileEntry:
    """A file of a watched folder as ``files`` lists it: indexed, failed, skipped or ignored."""

    path: str
    status: str
    reason: str
    chunks: int = 0
    kind: str = ""
    is_dir: bool = False


@dataclass
class IndexStatus:
    db_path: str
    roots: list[RootStatus]
    documents: int
    chunks: int
    failed: list[FailedFile]
    last_change: float | None
    embed_model: str | None
    embed_dim: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    # files left out on purpose, counted by reason ("ignore rule", "binary", "symlink"...);
    # ``Store.files("ignored")`` lists them
    ignored: dict[str, int] = field(default_factory=dict)
    skipped_count: int = 0
    failed_count: int = 0


@dataclass
class ChunkHit:
    """A chunk as search returns it: its text, where it is, and what it is a part of."""

    chunk_id: int
    document_id: int
    path: str
    text: str
    start_line: int | None
    end_line: int | None
    page: int | None
    heading_path: list[str]
    mtime: float | None
    root: str | None
    chunk_hash: str
    char_start: int | None
    char_end: int | None


Listener = Callable[[str, str], None]

EXACT_SCAN_LIMIT = 20_000  # filtered vector searches over at most this many chunks are scanned exactly
VEC_K_LIMIT = 4096  # the most neighbours one vec0 query returns
ACCELERATE_FROM = 5_000  # chunk ids: below this the exact vec0 scan (~6 ms) beats building the accelerator
KEYWORD_ACCELERATE_FROM = 100_000  # chunk ids: from here Tantivy ranks keywords (FTS5 takes ~40 ms)
ACCELERATOR_RETRY_S = 60.0  # after the accelerator failed, search exactly this long before trying again
CHANGE_LOG_KEEP = 100_000  # entries of vector_changes kept for accelerators of other processes

_CHUNK_COLUMNS = (
    "c.id, c.document_id, c.seq, c.text, c.char_start, c.char_end, c.start_line, c.end_line, "
    "c.page, c.heading_path, c.chunk_hash"
)
_DOC_COLUMNS = (
    "id, root_id, path, size, mtime, content_hash, loader, status, error, chunk_count, indexed_at, note"
)


def _make_private(path: Path) -> None:
    """Create the index file with mode 0600 (and its folder 0700, when lorekeeper makes it), and take
    other users' access away from an existing index and its -wal/-shm files, with a notice."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = Path(f"{path}{suffix}")
        try:
            if tighten(part, PRIVATE_MODE):
                log.warning("%s was readable by other users; made it private (mode 0600)", part)
        except OSError as exc:
            log.warning("%s is readable by other users and cannot be made private: %s", part, exc)


def connect(path: Path) -> Any:
    """A connection with sqlite-vec loaded, WAL on and foreign keys enforced."""
    conn = sqlean.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _chunk_row(row: Sequence[Any]) -> ChunkRow:
    return ChunkRow(*row[:9], heading_path=json.loads(row[9] or "[]"), chunk_hash=row[10])


def vector_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


class Store:
    """The index file. Thread-safe: one writer at a time, any number of readers."""

    def __init__(
        self, path: Path, *, vector_index: bool | None = None, keyword_index: bool | None = None
    ) -> None:
        """``vector_index``: search vectors through the in-process accelerator (``vector_index.py``)
        always (True), never (False: the exact vec0 scan), or from ``ACCELERATE_FROM`` chunks (None).
        ``keyword_index``: rank keywords with Tantivy beside the file (``keyword_index.py``) always,
        never (FTS5 alone), or from ``KEYWORD_ACCELERATE_FROM`` chunks."""
        self.path = Path(path)
        self._accelerate = vector_index
        self._accelerator: VectorIndex | None = None
        self._accelerator_failed = -float("inf")  # when it last failed (time.monotonic())
        self._accelerate_keywords = keyword_index
        self._keywords: KeywordIndex | None = None
        self._keywords_failed = -float("inf")
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._listeners: list[Listener] = []
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        try:
            _make_private(self.path)
            self._writer = connect(self.path)
            mode = self._writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("the index %s could not switch to WAL mode (got %s)", self.path, mode)
            migrate(self._writer)
            _make_private(self.path)  # the -wal and -shm files exist now
        except sqlean.DatabaseError as exc:
            clear = write_error(self.path, exc)
            if clear is not None:
                raise clear from exc
            raise StoreError(
                f"cannot open the index {self.path}: {exc}. If the file is not a lorekeeper index, "
                "point --db (or LOREKEEPER_DB) elsewhere."
            ) from exc
        except OSError as exc:  # the folder cannot be made: read-only, or no permission
            raise StoreWriteError(f"cannot create the index {self.path}: {exc.strerror or exc}") from exc

    @classmethod
    def open(
        cls,
        path: Path | str | None = None,
        *,
        create: bool = True,
        vector_index: bool | None = None,
        keyword_index: bool | None = None,
    ) -> Store:
        """Open (or, with ``create``, make) the index at ``path`` (default: the settings' index).

        Commands that only read (search, ask, status) pass ``create=False``: a mistyped path is an
        error naming it, not a new empty index that finds nothing.
        """
        if path is None:
            from .settings import Settings

            path = Settings.load().db_path
        path = Path(path).expanduser()
        if not create and not path.is_file():
            hint = "the folder does not exist" if not path.parent.is_dir() else "there is no index file there"
            raise StoreError(
                f"no lorekeeper index at {path} ({hint}): index a folder first with `lorekeeper add FOLDER`, "
                "or point --db at an existing index"
            )
        return cls(path, vector_index=vector_index, keyword_index=keyword_index)

    def close(self) -> None:
        if self._accelerator is not None:
            self._accelerator.wait()  # a sidecar being saved
        self._accelerator = None
        if self._keywords is not None:
            self._keywords.close()  # a rebuild in progress stops; its half-made folder goes
        self._keywords = None
        with self._readers_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except Exception:  # a reader of a thread that is gone
                    pass
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------------------------

    def _read(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(event, path)`` after each committed change to a document."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, event: str, path: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(event, path)
            except Exception:
                log.exception("index listener failed on %s %s", event, path)

    # -- meta ----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) a small piece of index state."""
        with self._transaction() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._set_meta(conn, key, value)

    def _set_meta(self, conn: Any, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def schema_version(self) -> int:
        return self._read().execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    # -- embedder and vector table -------------------------------------------------------------

    @property
    def embed_model(self) -> str | None:
        return self.get_meta("embed_model")

    @property
    def embed_dim(self) -> int | None:
        value = self.get_meta("embed_dim")
        return int(value) if value else None

    def ensure_embedder(self, model_id: str, dimension: int) -> bool:
        """Make the vector table fit ``model_id``; return True when vectors must be (re)computed.

        A different embedder than the one recorded drops every vector at once (never a mix of two
        models' vectors); the chunks stay, and ``chunks_missing_vectors`` lists what to re-embed.
        """
        with self._transaction() as conn:
            known = conn.execute("SELECT value FROM meta WHERE key = 'embed_model'").fetchone()
            dim = conn.execute("SELECT value FROM meta WHERE key = 'embed_dim'").fetchone()
            has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunk_vectors'").fetchone()
            if has_table and known and known[0] == model_id and dim and int(dim[0]) == dimension:
                return False
            conn.execute("DROP TABLE IF EXISTS chunk_vectors")
            conn.execute(
                f"CREATE VIRTUAL TABLE chunk_vectors USING vec0("
                f"embedding float[{int(dimension)}] distance_metric=cosine)"
            )
            conn.execute("INSERT INTO vector_changes(chunk_id) VALUES (?)", (RESET,))
            self._set_meta(conn, "embed_model", model_id)
            self._set_meta(conn, "embed_dim", str(int(dimension)))
            changed = bool(known) and known[0] != model_id
        if changed:
            log.info("embedder changed to %s: every chunk will be re-embedded", model_id)
        return True

    def chunks_missing_vectors(self, limit: int = 1000) -> list[ChunkRow]:
        """Chunks that have no vector yet (after an embedder change, or an interrupted re-embed)."""
        rows = (
            self._read()
            .execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks c "
                "WHERE NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.rowid = c.id) LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [_chunk_row(row) for row in rows]

    def set_vectors(self, model_id: str, rows: Sequence[tuple[int, str, np.ndarray]]) -> None:
        """Store vectors for existing chunks ((chunk id, chunk hash, vector)), in one transaction."""
        now = time.time()
        with self._transaction() as conn:
            for chunk_id, chunk_hash, vector in rows:
                if not conn.execute("SELECT 1 FROM chunks WHERE id = ?", (chunk_id,)).fetchone():
                    continue  # the chunk went while it was being embedded
                blob = vector_blob(vector)
                conn.execute("DELETE FROM chunk_vectors WHERE rowid = ?", (chunk_id,))
                conn.execute("INSERT INTO chunk_vectors(rowid, embedding) VALUES (?, ?)", (chunk_id, blob))
                conn.execute("INSERT INTO vector_changes(chunk_id) VALUES (?)", (chunk_id,))
                conn.execute(
                    "INSERT OR REPLACE INTO embedding_cache(model_id, chunk_hash, vector, used_at) "
                    "VALUES (?, ?, ?, ?)",
                    (model_id, chunk_hash, blob, now),
                )

    def cache_vectors(self, model_id: str, vectors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Keep vectors of chunks not stored yet ((chunk hash, vector)), so work on a large file
        survives a kill: the next attempt finds them in the cache."""
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO embedding_cache(model_id, chunk_hash, vector, used_at) VALUES (?, ?, ?, ?)",
                [(model_id, chunk_hash, vector_blob(vector), now) for chunk_hash, vector in vectors],
            )

    def cached_vectors(self, model_id: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors already computed by ``model_id`` for these chunk hashes."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, np.ndarray] = {}
        conn = self._read()
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            for chunk_hash, blob in conn.execute(
                f"SELECT chunk_hash, vector FROM embedding_cache WHERE model_id = ? AND chunk_hash IN ({marks})",
                (model_id, *batch),
            ):
                found[chunk_hash] = np.frombuffer(blob, dtype=np.float32)
        return found

    def prune_cache(self, older_than_days: float = 30.0) -> int:
        """Drop cached vectors no chunk uses and nobody used for a while; return how many went."""
        cutoff = time.time() - older_than_days * 86400
        with self._transaction() as conn:
            cur = conn.execute(
                "DELETE FROM embedding_cache WHERE used_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM chunks c WHERE c.chunk_hash = embedding_cache.chunk_hash)",
                (cutoff,),
            )
            return cur.rowcount

    # -- roots -----------------------------------------------------------------------------------

    def roots(self) -> list[Root]:
        rows = self._read().execute("SELECT id, path, added_at FROM roots ORDER BY path").fetchall()
        return [Root(*row) for row in rows]

    def add_root(self, path: Path | str) -> Root:
        resolved = str(Path(path).expanduser().resolve())
        with self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO roots(path, added_at) VALUES (?, ?)", (resolved, time.time()))
            row = conn.execute("SELECT id, path, added_at FROM roots WHERE path = ?", (resolved,)).fetchone()
        return Root(*row)

    def remove_root(self, path: Path | str) -> bool:
        """Forget a root and everything indexed under it; return False if it was not registered."""
        resolved = str(Path(path).expanduser().resolve())
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM roots WHERE path = ?", (resolved,)).fetchone()
            if not row:
                return False
            doc_ids = [r[0] for r in conn.execute("SELECT id FROM documents WHERE root_id = ?", (row[0],))]
            for doc_id in doc_ids:
                self._delete_chunks(conn, doc_id)
            conn.execute("DELETE FROM documents WHERE root_id = ?", (row[0],))
            conn.execute("DELETE FROM ignored WHERE root_id = ?", (row[0],))
            conn.execute("DELETE FROM roots WHERE id = ?", (row[0],))
            self._touch(conn)
        self._notify("root_removed", resolved)
        return True

    def root_for(self, path: Path | str) -> Root | None:
        """The registered root that contains ``path`` (the deepest one when roots nest)."""
        target = str(path)
        best: Root | None = None
        for root in self.roots():
            if target == root.path or target.startswith(root.path.rstrip(os.sep) + os.sep):
                if best is None or len(root.path) > len(best.path):
                    best = root
        return best

    # -- documents -------------------------------------------------------------------------------

    def get_document(self, path: Path | str) -> DocumentRow | None:
        row = (
            self._read()
            .execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE path = ?", (str(path),))
            .fetchone()
        )
        return DocumentRow(*row) if row else None

    def documents(self, root: str | None = None) -> list[DocumentRow]:
        sql = f"SELECT {_DOC_COLUMNS} FROM documents"
        args: tuple = ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = ?)"
            args = (root,)
        return [DocumentRow(*row) for row in self._read().execute(sql + " ORDER BY path", args)]

    def find_by_hash(self, content_hash: str) -> list[DocumentRow]:
        rows = (
            self._read()
            .execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE content_hash = ?", (content_hash,))
            .fetchall()
        )
        return [DocumentRow(*row) for row in rows]

    def document_chunks(self, path: Path | str) -> list[ChunkRow]:
        rows = (
            self._read()
            .execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document_id "
                "WHERE d.path = ? ORDER BY c.seq",
                (str(path),),
            )
            .fetchall()
        )
        return [_chunk_row(row) for row in rows]

    def iter_chunks(self, path_glob: str | None = None, root: str | None = None) -> Iterator[ChunkWithPath]:
        """Every indexed chunk with its file path, by path then position (for fine-tuning data)."""
        sql = (
            f"SELECT {_CHUNK_COLUMNS}, d.path FROM chunks c JOIN documents d ON d.id = c.document_id "
            "JOIN roots r ON r.id = d.root_id"
        )
        args: list[Any] = []
        if root is not None:
            sql += " WHERE r.path = ?"
            args.append(str(Path(root).expanduser().resolve()))
        sql += " ORDER BY d.path, c.seq"
        root_paths = [r.path for r in self.roots()]
        for row in self._read().execute(sql, args):
            if path_glob and not path_matches(row[11], path_glob, root_paths):
                continue
            base = _chunk_row(row[:11])
            yield ChunkWithPath(**base.__dict__, path=row[11])

    def replace_document(
        self,
        *,
        path: str,
        root_id: int,
        size: int,
        mtime: float,
        content_hash: str,
        loader: str,
        chunks: Sequence[Any],
        vectors: np.ndarray,
        model_id: str,
        note: str | None = None,
    ) -> int:
        """Swap a document's chunks, vectors and keywords for new ones in one transaction.

        ``chunks`` are objects with text, char_start, char_end, start_line, end_line, page,
        heading_path and chunk_hash; ``vectors`` has one unit-length row per chunk.
        """
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors for {path}")
        now = time.time()
        with self._transaction() as conn:
            doc_id = self._upsert_document(
                conn, path, root_id, size, mtime, content_hash, loader, STATUS_INDEXED, None, note
            )
            conn.execute("DELETE FROM ignored WHERE path = ?", (path,))
            self._delete_chunks(conn, doc_id)
            for seq, (chunk, vector) in enumerate(zip(chunks, vectors)):
                headings = list(chunk.heading_path or [])
                cur = conn.execute(
                    "INSERT INTO chunks(document_id, seq, text, char_start, char_end, start_line, end_line, "
                    "page, heading_path, chunk_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        doc_id,
                        seq,
                        chunk.text,
                        chunk.char_start,
                        chunk.char_end,
                        chunk.start_line,
                        chunk.end_line,
                        chunk.page,
                        json.dumps(headings, ensure_ascii=False),
                        chunk.chunk_hash,
                    ),
                )
                chunk_id = cur.lastrowid
                conn.execute(
                    "INSERT INTO chunks_fts(rowid, text, headings) VALUES (?, ?, ?)",
                    (chunk_id, chunk.text, " / ".join(headings)),
                )
                blob = vector_blob(vector)
                conn.execute("INSERT INTO chunk_vectors(rowid, embedding) VALUES (?, ?)", (chunk_id, blob))
                conn.execute(
                    "INSERT OR REPLACE INTO embedding_cache(model_id, chunk_hash, vector, used_at) "
                    "VALUES (?, ?, ?, ?)",
                    (model_id, chunk.chunk_hash, blob, now),
                )
            conn.execute("UPDATE documents SET chunk_count = ? WHERE id = ?", (len(chunks), doc_id))
            self._touch(conn)
        self._notify("indexed", path)
        return doc_id

    def record_problem(
        self,
        *,
        path: str,
        root_id: int,
        status: str,
        error: str,
        size: int | None = None,
        mtime: float | None = None,
        loader: str | None = None,
        keep_chunks: bool = False,
    ) -> None:
        """Record that a file failed or was skipped, with the reason.

        Its earlier chunks go in the same transaction, unless ``keep_chunks`` (a transient read
        error or a bad save the next one fixes): then they stay searchable until the file loads
        again or goes away. A file that turned into a link out of the folders, grew too big or
        became binary must not keep serving its old text.
        """
        with self._transaction() as conn:
            doc_id = self._upsert_document(
                conn, path, root_id, size, mtime, None, loader, status, error, None, keep_chunks=True
            )
            if not keep_chunks:
                self._delete_chunks(conn, doc_id)
                conn.execute("UPDATE documents SET content_hash = NULL WHERE id = ?", (doc_id,))
            conn.execute("DELETE FROM ignored WHERE path = ?", (path,))
            self._touch(conn)
        self._notify(status, path)

    # -- files left out --------------------------------------------------------------------------

    def record_ignored(
        self,
        *,
        path: str,
        root_id: int,
        kind: str,
        reason: str,
        is_dir: bool = False,
        size: int | None = None,
        mtime: float | None = None,
    ) -> None:
        """Record a file (or a whole folder) left out of the index on purpose, and why; a document
        indexed at that path before goes in the same transaction."""
        with self._transaction() as conn:
            had = self._forget_document(conn, path)
            self._upsert_ignored(conn, path, root_id, kind, reason, is_dir, size, mtime)
            if had:
                self._touch(conn)
        if had:
            self._notify("removed", path)

    def sync_ignored(
        self,
        root_id: int,
        entries: Sequence[tuple[str, str, str, bool]],
        present: set[str],
        under: str | None = None,
    ) -> None:
        """After a scan of a root (or of its folder ``under``), in one transaction: record the
        ``entries`` ((path, kind, reason, is_dir)) the ignore rules left out, and forget ignored
        entries there that are no longer in ``present`` (the paths the scan saw)."""
        sql, args = "SELECT path FROM ignored WHERE root_id = ?", [root_id]
        if under is not None:
            prefix = under.rstrip(os.sep) + os.sep
            sql += " AND substr(path, 1, ?) = ?"
            args += [len(prefix), prefix]
        dropped: list[str] = []
        with self._transaction() as conn:
            known = [row[0] for row in conn.execute(sql, args)]
            for path in known:
                if path not in present:
                    conn.execute("DELETE FROM ignored WHERE path = ?", (path,))
            for path, kind, reason, is_dir in entries:
                if self._forget_document(conn, path):
                    dropped.append(path)
                self._upsert_ignored(conn, path, root_id, kind, reason, is_dir, None, None)
            if dropped:
                self._touch(conn)
        for path in dropped:
            self._notify("removed", path)

    def get_ignored(self, path: str) -> FileEntry | None:
        row = (
            self._read()
            .execute("SELECT path, kind, reason, is_dir, size, mtime FROM ignored WHERE path = ?", (path,))
            .fetchone()
        )
        if row is None:
            return None
        entry = FileEntry(row[0], STATUS_IGNORED, row[2], kind=row[1], is_dir=bool(row[3]))
        entry.size, entry.mtime = row[4], row[5]  # type: ignore[attr-defined]
        return entry

    def ignored_paths(self, root: str | None = None) -> list[str]:
        sql, args = "SELECT path FROM ignored", ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = ?)"
            args = (root,)
        return [row[0] for row in self._read().execute(sql, args)]

    def delete_ignored(self, paths: Iterable[str]) -> None:
        with self._transaction() as conn:
            for path in paths:
                conn.execute("DELETE FROM ignored WHERE path = ?", (path,))

    def files(self, which: str = "all", root: str | None = None) -> list[FileEntry]:
        """The files of the watched folders by path: ``which`` is "indexed", "failed", "skipped",
        "ignored", "problems" (failed and skipped) or "all" (every file the index knows of)."""
        wanted = {"all": FILE_KINDS, "problems": ("failed", "skipped")}.get(which, (which,))
        if not set(wanted) <= set(FILE_KINDS):
            raise ValueError(
                f"unknown file list {which!r}: use all, problems or one of {', '.join(FILE_KINDS)}"
            )
        conn = self._read()
        where, args = "", []
        if root is not None:
            where = " AND root_id = (SELECT id FROM roots WHERE path = ?)"
            args = [str(Path(root).expanduser().resolve())]
        out: list[FileEntry] = []
        doc_statuses = [w for w in wanted if w != STATUS_IGNORED]
        if doc_statuses:
            marks = ",".join("?" * len(doc_statuses))
            for path, status, error, note, chunks in conn.execute(
                f"SELECT path, status, COALESCE(error, ''), note, chunk_count FROM documents "
                f"WHERE status IN ({marks}){where}",
                (*doc_statuses, *args),
            ):
                out.append(FileEntry(path, status, error or note or "", chunks))
        if STATUS_IGNORED in wanted:
            for path, kind, reason, is_dir in conn.execute(
                f"SELECT path, kind, reason, is_dir FROM ignored WHERE 1 = 1{where}", args
            ):
                out.append(FileEntry(path, STATUS_IGNORED, reason, kind=kind, is_dir=bool(is_dir)))
        out.sort(key=lambda entry: entry.path)
        return out

    def _upsert_ignored(self, conn: Any, path: str, root_id: int, kind: str, reason: str, is_dir: bool,
                        size: int | None, mtime: float | None) -> None:  # fmt: skip
        conn.execute(
            "INSERT OR REPLACE INTO ignored(path, root_id, kind, reason, is_dir, size, mtime, seen_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (path, root_id, kind, reason, int(is_dir), size, mtime, time.time()),
        )

    def _forget_document(self, conn: Any, path: str) -> bool:
        row = conn.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
        if not row:
            return False
        self._delete_chunks(conn, row[0])
        conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        return True

    def touch_document(self, path: str, size: int, mtime: float) -> None:
        """The file's bytes are unchanged but its stat moved on (a touch, a copy-back)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE documents SET size = ?, mtime = ?, indexed_at = ? WHERE path = ?",
                (size, mtime, time.time(), path),
            )

    def forget_file_state(self, root: str | None = None, content: bool = False) -> int:
        """Make the next scan look at every file again (and re-chunk them all with ``content``)."""
        sql = "UPDATE documents SET mtime = NULL" + (", content_hash = NULL" if content else "")
        args: tuple = ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = ?)"
            args = (str(Path(root).expanduser().resolve()),)
        with self._transaction() as conn:
            return conn.execute(sql, args).rowcount

    def delete_document(self, path: str) -> bool:
        """Forget a file that went away (its chunks, or its ignored entry); False if none was known."""
        with self._transaction() as conn:
            ignored = conn.execute("DELETE FROM ignored WHERE path = ?", (path,)).rowcount
            if not self._forget_document(conn, path):
                return bool(ignored)
            self._touch(conn)
        self._notify("removed", path)
        return True

    def delete_under(self, directory: str) -> list[str]:
        """Delete every document under a directory that went away; return their paths."""
        prefix = directory.rstrip(os.sep) + os.sep
        paths = [
            row[0]
            for row in self._read().execute(
                "SELECT path FROM documents WHERE substr(path, 1, ?) = ? UNION "
                "SELECT path FROM ignored WHERE substr(path, 1, ?) = ? OR path = ?",
                (len(prefix), prefix, len(prefix), prefix, directory),
            )
        ]
        for path in paths:
            self.delete_document(path)
        return paths

    def move_document(self, src: str, dst: str, root_id: int, mtime: float | None = None) -> bool:
        """A file was renamed or moved: keep its chunks and vectors under the new path."""
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM documents WHERE path = ?", (src,)).fetchone()
            if not row:
                return False
            self._forget_document(conn, dst)
            conn.execute("DELETE FROM ignored WHERE path = ?", (dst,))
            conn.execute(
                "UPDATE documents SET path = ?, root_id = ?, mtime = COALESCE(?, mtime), indexed_at = ? WHERE id = ?",
                (dst, root_id, mtime, time.time(), row[0]),
            )
            self._touch(conn)
        self._notify("moved", dst)
        return True

    def move_under(self, src: str, dst: str, root_id: int) -> list[str]:
        """A folder was renamed or moved: every document (and ignored entry) under ``src`` moves
        under ``dst``, in one transaction; returns the new paths of the documents."""
        old, new = src.rstrip(os.sep) + os.sep, dst.rstrip(os.sep) + os.sep
        now = time.time()
        moved: list[str] = []
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, path FROM documents WHERE substr(path, 1, ?) = ?", (len(old), old)
            ).fetchall()
            for doc_id, path in rows:
                target = new + path[len(old) :]
                self._forget_document(conn, target)
                conn.execute(
                    "UPDATE documents SET path = ?, root_id = ?, indexed_at = ? WHERE id = ?",
                    (target, root_id, now, doc_id),
                )
                moved.append(target)
            for (path,) in conn.execute(
                "SELECT path FROM ignored WHERE substr(path, 1, ?) = ? OR path = ?", (len(old), old, src)
            ).fetchall():
                conn.execute("DELETE FROM ignored WHERE path = ?", (path,))
            if rows:
                self._touch(conn)
        for path in moved:
            self._notify("moved", path)
        return moved

    def delete_document_if_older(self, path: str, before: float) -> bool:
        """Forget a document no scan found, unless something indexed it after ``before`` (a scan's
        start): then whoever did has seen the file more recently than the scan."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id FROM documents WHERE path = ? AND COALESCE(indexed_at, 0) < ?", (path, before)
            ).fetchone()
            if not row:
                return False
            self._forget_document(conn, path)
            self._touch(conn)
        self._notify("removed", path)
        return True

    def _upsert_document(
        self,
        conn: Any,
        path: str,
        root_id: int,
        size: int | None,
        mtime: float | None,
        content_hash: str | None,
        loader: str | None,
        status: str,
        error: str | None,
        note: str | None,
        keep_chunks: bool = False,
    ) -> int:
        row = conn.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
        now = time.time()
        if row:
            if keep_chunks:
                # the old chunks (and the hash they were made from) stay; only the state changes
                conn.execute(
                    "UPDATE documents SET root_id = ?, status = ?, error = ?, size = ?, mtime = ?, "
                    "loader = COALESCE(?, loader), indexed_at = ? WHERE id = ?",
                    (root_id, status, error, size, mtime, loader, now, row[0]),
                )
            else:
                conn.execute(
                    "UPDATE documents SET root_id = ?, size = ?, mtime = ?, content_hash = ?, loader = ?, "
                    "status = ?, error = ?, note = ?, indexed_at = ? WHERE id = ?",
                    (root_id, size, mtime, content_hash, loader, status, error, note, now, row[0]),
                )
            return row[0]
        cur = conn.execute(
            "INSERT INTO documents(root_id, path, size, mtime, content_hash, loader, status, error, note, "
            "indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                root_id,
                path,
                size,
                mtime,
                None if keep_chunks else content_hash,
                loader,
                status,
                error,
                note,
                now,
            ),
        )
        return cur.lastrowid

    def _delete_chunks(self, conn: Any, doc_id: int) -> None:
        rows = conn.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,)).fetchall()
        for (chunk_id,) in rows:
            conn.execute("DELETE FROM chunks_fts WHERE rowid = ?", (chunk_id,))
        if rows and self._has_vectors(conn):
            ids = [r[0] for r in rows]
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                conn.execute(
                    f"DELETE FROM chunk_vectors WHERE rowid IN ({','.join('?' * len(batch))})", batch
                )
        conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
        conn.execute("UPDATE documents SET chunk_count = 0 WHERE id = ?", (doc_id,))

    @staticmethod
    def _has_vectors(conn: Any) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunk_vectors'").fetchone() is not None

    def _touch(self, conn: Any) -> None:
        self._set_meta(conn, "last_change", repr(time.time()))
        conn.execute(  # the change log only needs its recent end; an older reader rebuilds
            "DELETE FROM vector_changes WHERE seq <= "
            "(SELECT seq FROM sqlite_sequence WHERE name = 'vector_changes') - ?",
            (CHANGE_LOG_KEEP,),
        )

    # -- search queries ----------------------------------------------------------------------------

    def filter_documents(
        self,
        *,
        root: str | None = None,
        modified_after: float | None = None,
        file_types: Sequence[str] | None = None,
        loaders: Sequence[str] | None = None,
    ) -> list[tuple[int, str]]:
        """(id, path) of the indexed documents that pass these filters: file types are suffixes with
        the dot, lower case; a document passes when its suffix or its loader's name is among them."""
        sql = "SELECT id, path FROM documents WHERE status = 'indexed'"
        args: list = []
        if root:
            sql += " AND root_id = (SELECT id FROM roots WHERE path = ?)"
            args.append(str(Path(root).expanduser().resolve()))
        if modified_after is not None:
            sql += " AND mtime >= ?"
            args.append(float(modified_after))
        if file_types or loaders:
            terms = ["lower(path) LIKE ?" for _ in file_types or ()] + [
                "loader LIKE ?" for _ in loaders or ()
            ]
            sql += " AND (" + " OR ".join(terms) + ")"
            args.extend("%" + ext for ext in file_types or ())
            args.extend(name + ":%" for name in loaders or ())
        return [(doc_id, path) for doc_id, path in self._read().execute(sql, args)]

    def has_suffix(self, suffix: str) -> bool:
        """Whether an indexed document's path ends with ``suffix`` (any case)."""
        row = (
            self._read()
            .execute(
                "SELECT 1 FROM documents WHERE status = 'indexed' AND lower(path) LIKE ? LIMIT 1",
                ("%" + suffix,),
            )
            .fetchone()
        )
        return row is not None

    def vector_search(
        self, query: np.ndarray, k: int, documents: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the ``k`` chunks nearest ``query``, best first; only
        chunks of ``documents`` when given (filters apply before ranking)."""
        conn = self._read()
        if not self._has_vectors(conn):
            return []
        accelerator = self._vector_index(conn)
        if accelerator is not None:
            try:
                return accelerator.search(conn, query, k, documents)
            except Exception:  # never needed for correctness: say so, scan exactly, retry later
                log.warning("the vector accelerator failed; searching exactly", exc_info=True)
                self._accelerator = None
                self._accelerator_failed = time.monotonic()
        blob = vector_blob(query)
        if documents is None:
            rows = conn.execute(
                "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                (blob, min(k, VEC_K_LIMIT)),
            ).fetchall()
            return [(rowid, 1.0 - dist) for rowid, dist in rows]
        ids = json.dumps(sorted(documents))
        n_allowed = conn.execute(
            "SELECT COUNT(*) FROM chunks WHERE document_id IN (SELECT value FROM json_each(?))", (ids,)
        ).fetchone()[0]
        if n_allowed == 0:
            return []
        if n_allowed > EXACT_SCAN_LIMIT:
            # many matching chunks: ask the index for more neighbours than needed, keep the matching ones
            total = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            want = min(VEC_K_LIMIT, k * -(-total // n_allowed) * 2)
            rows = conn.execute(
                "SELECT v.rowid, v.distance, c.document_id FROM chunk_vectors v JOIN chunks c ON c.id = v.rowid "
                "WHERE v.embedding MATCH ? AND k = ? ORDER BY v.distance",
                (blob, want),
            ).fetchall()
            found = [(rowid, 1.0 - dist) for rowid, dist, doc in rows if doc in documents][:k]
            if len(found) >= min(k, n_allowed):
                return found
        rows = conn.execute(
            "SELECT c.id, vec_distance_cosine(v.embedding, ?) AS dist FROM chunks c "
            "JOIN chunk_vectors v ON v.rowid = c.id "
            "WHERE c.document_id IN (SELECT value FROM json_each(?)) ORDER BY dist LIMIT ?",
            (blob, ids, k),
        ).fetchall()
        return [(rowid, 1.0 - dist) for rowid, dist in rows]

    @staticmethod
    def _accelerator_wanted(
        conn: Any, setting: bool | None, existing: Any, failed_at: float, from_id: int
    ) -> bool:
        """Whether a search goes through an accelerator: always (``setting`` True), never (False),
        or (None) once chunk ids reach ``from_id``; not for ACCELERATOR_RETRY_S after it failed."""
        if setting is False or time.monotonic() - failed_at < ACCELERATOR_RETRY_S:
            return False
        if setting is None and existing is None:
            return (conn.execute("SELECT MAX(id) FROM chunks").fetchone()[0] or 0) >= from_id
        return True

    def _vector_index(self, conn: Any) -> VectorIndex | None:
        """The accelerator, when this store uses one for an index of this size."""
        if not self._accelerator_wanted(
            conn, self._accelerate, self._accelerator, self._accelerator_failed, ACCELERATE_FROM
        ):
            return None
        if self._accelerator is None:
            self._accelerator = VectorIndex(self.path)
        return self._accelerator

    def vector_index_ready(self) -> VectorIndex | None:
        """The accelerator brought up to date now (built, or loaded from its sidecar), or None when
        this store searches exactly; for benchmarks and tools that want the cost paid up front."""
        conn = self._read()
        accelerator = self._vector_index(conn) if self._has_vectors(conn) else None
        if accelerator is not None:
            accelerator.sync(conn)
        return accelerator

    def keyword_search(
        self, match: str, k: int, documents: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) for an FTS5 ``match`` expression, best first."""
        conn = self._read()
        accelerator = self._keyword_index(conn)
        if accelerator is not None:
            try:
                found = accelerator.search(conn, match, k, documents)
            except Exception:  # never needed for correctness: say so, use FTS5, retry later
                log.warning("the keyword accelerator failed; searching with FTS5", exc_info=True)
                self._keywords = None
                self._keywords_failed = time.monotonic()
                found = None
            if found is not None:
                return found
        if documents is None:
            rows = conn.execute(
                "SELECT rowid, bm25(chunks_fts, 1.0, 2.0) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                "ORDER BY s LIMIT ?",
                (match, k),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT f.rowid, bm25(chunks_fts, 1.0, 2.0) AS s FROM chunks_fts f JOIN chunks c ON c.id = f.rowid "
                "WHERE chunks_fts MATCH ? AND c.document_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY s LIMIT ?",
                (match, json.dumps(sorted(documents)), k),
            ).fetchall()
        return [(rowid, -score) for rowid, score in rows]

    def _keyword_index(self, conn: Any) -> KeywordIndex | None:
        """The keyword accelerator, when this store uses one for an index of this size."""
        if not self._accelerator_wanted(
            conn, self._accelerate_keywords, self._keywords, self._keywords_failed, KEYWORD_ACCELERATE_FROM
        ):
            return None
        if self._keywords is None:
            self._keywords = KeywordIndex(self.path, lambda: connect(self.path))
        return self._keywords

    def keyword_index_ready(self) -> KeywordIndex | None:
        """The keyword accelerator brought up to date now (built if need be), or None when this
        store ranks keywords with FTS5 alone; for benchmarks and tools that want the cost paid up front."""
        conn = self._read()
        accelerator = self._keyword_index(conn)
        if accelerator is not None and accelerator.ready(conn):
            return accelerator
        return None

    def chunk_hits(self, ids: Sequence[int]) -> dict[int, ChunkHit]:
        """The chunks with these ids, with their document's path, mtime and root."""
        if not ids:
            return {}
        rows = (
            self._read()
            .execute(
                "SELECT c.id, c.document_id, d.path, c.text, c.start_line, c.end_line, c.page, c.heading_path, "
                "d.mtime, r.path, c.chunk_hash, c.char_start, c.char_end FROM chunks c "
                "JOIN documents d ON d.id = c.document_id JOIN roots r ON r.id = d.root_id "
                "WHERE c.id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(ids)),),
            )
            .fetchall()
        )
        out = {}
        for row in rows:
            out[row[0]] = ChunkHit(
                chunk_id=row[0], document_id=row[1], path=row[2], text=row[3], start_line=row[4],
                end_line=row[5], page=row[6], heading_path=json.loads(row[7] or "[]"), mtime=row[8],
                root=row[9], chunk_hash=row[10], char_start=row[11], char_end=row[12],
            )  # fmt: skip
        return out

    def chunk_count(self) -> int:
        return self._read().execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> IndexStatus:
        conn = self._read()
        roots = []
        for root in self.roots():
            docs, chunks, failed, skipped = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0), "
                "COALESCE(SUM(status = 'failed'), 0), COALESCE(SUM(status = 'skipped'), 0) "
                "FROM documents WHERE root_id = ?",
                (root.id,),
            ).fetchone()
            ignored = conn.execute("SELECT COUNT(*) FROM ignored WHERE root_id = ?", (root.id,)).fetchone()[0]
            roots.append(RootStatus(root.path, docs - failed - skipped, chunks, failed, skipped, ignored))
        failed_rows = conn.execute(
            "SELECT path, status, COALESCE(error, '') FROM documents WHERE status != 'indexed' ORDER BY path"
        ).fetchall()
        last = self.get_meta("last_change")
        return IndexStatus(
            db_path=str(self.path),
            roots=roots,
            documents=conn.execute("SELECT COUNT(*) FROM documents WHERE status = 'indexed'").fetchone()[0],
            chunks=conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0],
            failed=[FailedFile(*row) for row in failed_rows],
            last_change=float(last) if last else None,
            embed_model=self.embed_model,
            embed_dim=self.embed_dim,
            ignored=dict(
                conn.execute("SELECT kind, COUNT(*) FROM ignored GROUP BY kind ORDER BY kind").fetchall()
            ),
            skipped_count=sum(1 for row in failed_rows if row[1] == STATUS_SKIPPED),
            failed_count=sum(1 for row in failed_rows if row[1] == STATUS_FAILED),
        )

    def check_integrity(self) -> list[str]:
        """Problems that would mean the index is inconsistent; an empty list when it is sound.

        Every chunk must have exactly one vector and one keyword row and no vector or keyword row
        may lack its chunk; a document's chunks must be one version (numbered 0..n-1, as many as
        its ``chunk_count``).

        It runs on a connection of its own: FTS5's integrity check on a long-lived connection that
        has scanned the contentless keyword table can report a "malformed inverted index" that a
        fresh connection (and every search) does not see (SQLite 3.50).
        """
        conn = connect(self.path)
        try:
            return self._integrity_problems(conn)
        finally:
            conn.close()

    def _integrity_problems(self, conn: Any) -> list[str]:
        problems = []
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            problems.append(f"sqlite integrity_check: {ok}")
        chunk_ids = {row[0] for row in conn.execute("SELECT id FROM chunks")}
        tables = [("keyword", "chunks_fts")] + (
            [("vector", "chunk_vectors")] if self._has_vectors(conn) else []
        )
        for kind, table in tables:
            ids = [row[0] for row in conn.execute(f"SELECT rowid FROM {table}")]
            have = set(ids)
            if len(ids) != len(have):
                problems.append(f"{len(ids) - len(have)} duplicate {kind} rows")
            if chunk_ids - have:
                problems.append(f"{len(chunk_ids - have)} chunks without a {kind} row")
            if have - chunk_ids:
                problems.append(f"{len(have - chunk_ids)} {kind} rows without a chunk")
        orphans = conn.execute(
            "SELECT COUNT(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunks of no document")
        return problems + document_version_problems(conn)


# Counts of documents whose chunks are not exactly one version, in SQL both backends run.
_VERSION_CHECKS = (
    ("SELECT COUNT(*) FROM documents d WHERE chunk_count != "
     "(SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id)",
     "documents whose chunk_count disagrees with their chunks"),
    ("SELECT COUNT(*) FROM (SELECT document_id FROM chunks GROUP BY document_id "
     "HAVING COUNT(DISTINCT seq) != COUNT(*) OR MIN(seq) != 0 OR MAX(seq) != COUNT(*) - 1) m",
     "documents whose chunks are not one version (seq not 0..n-1)"),
)  # fmt: skip


def document_version_problems(conn: Any) -> list[str]:
    """The integrity checks SQLite and PostgreSQL share: each document's chunks numbered 0..n-1, as
    many as its ``chunk_count``. ``conn`` is an sqlite3 or psycopg connection."""
    problems = []
    for sql, what in _VERSION_CHECKS:
        count = conn.execute(sql).fetchone()[0]
        if count:
            problems.append(f"{count} {what}")
    return problems


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT on the writer connection, ROLLBACK on any exception. A full,
    read-only or failing disk becomes a ``StoreWriteError`` that says so (after the rollback)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Any:
        self.store._write_lock.acquire()
        try:
            self.store._writer.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self.store._write_lock.release()
            raise (write_error(self.store.path, exc) or exc) from exc
        return self.store._writer

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        conn = self.store._writer
        failure = exc
        try:
            if exc is None:
                try:
                    conn.execute("COMMIT")
                except sqlean.DatabaseError as commit_error:
                    failure = commit_error
            if failure is not None and conn.in_transaction:
                conn.execute("ROLLBACK")  # SQLite may have rolled back already (a full disk does)
        finally:
            self.store._write_lock.release()
        if failure is not None and isinstance(failure, sqlean.DatabaseError):
            clear = write_error(self.store.path, failure)
            if clear is not None:
                raise clear from failure
            if exc is None:
                raise failure


def path_matches(path: str, glob: str, roots: Sequence[str] | None) -> bool:
    """Whether ``path`` matches ``glob``: against the absolute path, the path relative to any root,
    or the file name; ``**`` spans folders (``docs/**/*.md``)."""
    candidates = [path, os.path.basename(path)]
    for root in roots or ():
        prefix = root.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            candidates.append(path[len(prefix) :])
    pattern = glob
    for candidate in candidates:
        if fnmatch.fnmatchcase(candidate, pattern):
            return True
        if "**/" in pattern and fnmatch.fnmatchcase(candidate, pattern.replace("**/", "")):
            return True
    return False
