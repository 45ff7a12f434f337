"""The index on a PostgreSQL server with pgvector: one index shared by watchers and servers on
several machines.

The same public methods as ``store.Store`` (``stores.IndexStore`` lists them), so search, the
indexer and the MCP tools do not know which one they use. Vectors live in a ``vector(DIM)`` column
(``halfvec`` above 2,000 dimensions, pgvector's limit for indexed ``vector``) with an HNSW index on
cosine distance; keywords in a ``tsvector`` column with a GIN index, ranked by ``ts_rank`` (headings
weigh twice the text, as in the SQLite index's BM25). Every document is written in one transaction
that first takes a transaction-scoped advisory lock on its path, so two writers on two machines
never interleave one document: the second waits for the first to commit, then sees its rows.

A connection the server dropped (a restart, an idle timeout, ``pg_terminate_backend``) is replaced:
a read runs again on a new one, as does a write that had not begun; a write cut off inside its
transaction is rolled back by the server and raises ``StoreWriteError``. A write that meets a
deadlock or a serialization failure runs again a few times before it raises ``WriteConflict``.

Needs the ``postgres`` extra (``psycopg[binary]`` and ``pgvector``); the ``vector`` extension must
exist in the database or the user must be allowed to create it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .settings import redact_url
from .store import (
    FILE_KINDS,
    STATUS_IGNORED,
    STATUS_INDEXED,
    STATUS_SKIPPED,
    ChunkHit,
    ChunkRow,
    ChunkWithPath,
    DocumentRow,
    FailedFile,
    FileEntry,
    IndexStatus,
    Listener,
    Root,
    RootStatus,
    StoreError,
    StoreWriteError,
    document_version_problems,
    path_matches,
    vector_blob,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LOCK_CLASS = 0x4C4B  # first key of every advisory lock lorekeeper takes ("LK")
SCHEMA_LOCK = 0  # second key: creating or changing tables
EXACT_BELOW = 2_000  # searches over at most this many chunks scan exactly (HNSW above)
HNSW_MAX_VECTOR_DIM = 2_000  # pgvector indexes vector up to 2,000 dimensions, halfvec up to 4,000
EF_SEARCH_MIN = 400  # recall@10 0.98 at 100k chunks (100: 0.85, 200: 0.94; scripts/bench_pg.py)
EF_SEARCH_MAX = 1000  # pgvector's limit
WRITE_ATTEMPTS = 5  # a write that meets a deadlock or serialization failure runs again up to this often
CONFLICT_BACKOFF = 0.05  # seconds before the first retry of a conflicting write; doubled each time
TEXT_CONFIG = "english"
RANK_WEIGHTS = "{0.1, 0.2, 0.5, 1.0}"  # D, C, B (text), A (headings)

_DOC_COLUMNS = (
    "id, root_id, path, size, mtime, content_hash, loader, status, error, chunk_count, indexed_at, note"
)
_CHUNK_COLUMNS = (
    "c.id, c.document_id, c.seq, c.text, c.char_start, c.char_end, c.start_line, c.end_line, "
    "c.page, c.heading_path, c.chunk_hash"
)

_SCHEMA = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS roots (
        id BIGSERIAL PRIMARY KEY, path TEXT NOT NULL UNIQUE, added_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS documents (
        id BIGSERIAL PRIMARY KEY,
        root_id BIGINT NOT NULL REFERENCES roots(id) ON DELETE CASCADE,
        path TEXT NOT NULL UNIQUE, size BIGINT, mtime DOUBLE PRECISION, content_hash TEXT,
        loader TEXT, status TEXT NOT NULL, error TEXT, chunk_count INTEGER NOT NULL DEFAULT 0,
        indexed_at DOUBLE PRECISION, note TEXT)""",
    "CREATE INDEX IF NOT EXISTS documents_root ON documents(root_id)",
    "CREATE INDEX IF NOT EXISTS documents_hash ON documents(content_hash)",
    """CREATE TABLE IF NOT EXISTS chunks (
        id BIGSERIAL PRIMARY KEY,
        document_id BIGINT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL, text TEXT NOT NULL, char_start INTEGER, char_end INTEGER,
        start_line INTEGER, end_line INTEGER, page INTEGER,
        heading_path TEXT NOT NULL DEFAULT '[]', chunk_hash TEXT NOT NULL DEFAULT '',
        keywords TSVECTOR NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id, seq)",
    "CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(chunk_hash)",
    "CREATE INDEX IF NOT EXISTS chunks_keywords ON chunks USING GIN (keywords)",
    """CREATE TABLE IF NOT EXISTS embedding_cache (
        model_id TEXT NOT NULL, chunk_hash TEXT NOT NULL, vector BYTEA NOT NULL,
        used_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (model_id, chunk_hash))""",
    """CREATE TABLE IF NOT EXISTS ignored (
        path TEXT PRIMARY KEY, root_id BIGINT NOT NULL REFERENCES roots(id) ON DELETE CASCADE,
        kind TEXT NOT NULL, reason TEXT NOT NULL, is_dir BOOLEAN NOT NULL DEFAULT FALSE,
        size BIGINT, mtime DOUBLE PRECISION, seen_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ignored_root ON ignored(root_id, kind)",
]

_KEYWORDS_SQL = (
    f"setweight(to_tsvector('{TEXT_CONFIG}', %s), 'A') || setweight(to_tsvector('{TEXT_CONFIG}', %s), 'B')"
)


def _path_key(path: str) -> int:
    """A stable 32-bit signed key for an advisory lock on one document path."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=4).digest(),
                          "big", signed=True)  # fmt: skip


def _chunk_row(row: Sequence[Any]) -> ChunkRow:
    return ChunkRow(*row[:9], heading_path=json.loads(row[9] or "[]"), chunk_hash=row[10])


def _one_line(exc: BaseException) -> str:
    """A driver's message on one line (libpq's span several)."""
    return " ".join(str(exc).split())


class WriteConflict(StoreWriteError):
    """A write met a deadlock or a serialization failure with another writer and was rolled back."""


def _reading(method: Any) -> Any:
    """Run a read again, once, on a new connection when the server dropped the thread's connection
    (a restart, an idle timeout, ``pg_terminate_backend``): a read changes nothing, so running it
    again is safe. A second drop in a row, or a server that does not take the new connection, is a
    ``StoreError`` that says so."""

    @functools.wraps(method)
    def run(self: PgStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self._psycopg.OperationalError as exc:
            if not self._drop_lost_reader():
                raise
            log.info("the index database %s dropped the connection (%s): connecting again", self.path,
                     _one_line(exc))  # fmt: skip
        try:
            return method(self, *args, **kwargs)
        except self._psycopg.OperationalError as exc:
            if not self._drop_lost_reader():
                raise
            raise StoreError(
                f"the index database {self.path} dropped the connection again right after connecting "
                f"({_one_line(exc)}): is the server running? Check it and the network, then retry"
            ) from None

    return run


def _writing(method: Any) -> Any:
    """Run a write (one transaction, rolled back) again when it met a deadlock or a serialization
    failure with another writer, up to ``WRITE_ATTEMPTS`` times with a growing, jittered pause."""

    @functools.wraps(method)
    def run(self: PgStore, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return method(self, *args, **kwargs)
            except WriteConflict as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise WriteConflict(
                        f"{exc}, {WRITE_ATTEMPTS} times in a row: nothing of this write was saved and "
                        "everything committed before is intact; run the command again"
                    ) from None
                log.info("%s; trying again", exc)
                time.sleep(CONFLICT_BACKOFF * 2 ** (attempt - 1) * (1 + random.random()))
        raise AssertionError("unreachable")

    return run


def _driver() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "an index on PostgreSQL needs the postgres extra: pip install 'lorekeeper[postgres]' "
            "(psycopg and pgvector)"
        ) from None
    return psycopg


KEEPALIVE_IDLE_S = 30  # an idle connection is probed after 30 s ...
KEEPALIVE_INTERVAL_S = 10  # ... every 10 s ...
KEEPALIVE_COUNT = 3  # ... and declared dead after 3 probes go unanswered


class PgStore:
    """The index in a PostgreSQL database. Thread-safe: one writer connection at a time in this
    process, a reading connection per thread; other processes and machines write concurrently,
    serialised per document by advisory locks."""

    def __init__(
        self, url: str, *, create: bool = True, exact_below: int = EXACT_BELOW, ef_search: int = EF_SEARCH_MIN
    ) -> None:
        """``exact_below``: searches over at most this many chunks scan exactly; ``ef_search``: the
        least HNSW candidate list (pgvector's ``hnsw.ef_search``; more is slower and finds more)."""
        self.ef_search = ef_search
        self.url = url.strip()
        self.path = redact_url(self.url)  # what messages and status show; never the password
        self.exact_below = exact_below
        self._psycopg = _driver()
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._listeners: list[Listener] = []
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect(register=False)
        try:
            if create:
                self._create_schema()
            elif not self._has_schema():
                raise StoreError(
                    f"no lorekeeper index in the database {self.path}: index a folder first with "
                    "`lorekeeper --db URL add FOLDER`, or point --db at an existing index"
                )
            self._register(self._writer)
        except BaseException:
            self._writer.close()
            raise

    @classmethod
    def open(cls, url: str, *, create: bool = True, **options: Any) -> PgStore:
        return cls(url, create=create, **options)

    def _connect(self, register: bool = True) -> Any:
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, **self._connection_defaults())
        except (self._psycopg.Error, ValueError) as exc:
            raise StoreError(
                f"cannot connect to the index database {self.path} (is the server running?): "
                f"{_one_line(exc)}. Check the URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE), that "
                "the server runs and that it accepts this user"
            ) from None
        if register:
            self._register(conn)
        return conn

    def _connection_defaults(self) -> dict[str, Any]:
        """libpq settings the URL does not set itself: a 10 s connect timeout, and TCP keepalives,
        so a server that vanished (a restart, a dropped VPN, a NAT that forgot an idle watcher's
        connection) is noticed within about a minute, not after the kernel's two hours; the next
        read then connects again."""
        from psycopg.conninfo import conninfo_to_dict

        defaults = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": KEEPALIVE_IDLE_S,
            "keepalives_interval": KEEPALIVE_INTERVAL_S,
            "keepalives_count": KEEPALIVE_COUNT,
        }
        try:
            given = conninfo_to_dict(self.url)
        except Exception:  # a malformed URL: psycopg.connect reports it, as a StoreError above
            return {}
        return {k: v for k, v in defaults.items() if k not in given}

    @staticmethod
    def _register(conn: Any) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)

    def _create_schema(self) -> None:
        try:
            with self._writer.transaction():
                self._writer.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, SCHEMA_LOCK))
                for statement in _SCHEMA:
                    self._writer.execute(statement)
                self._writer.execute(
                    "INSERT INTO meta(key, value) VALUES ('pg_schema', %s), ('index_id', md5(random()::text)) "
                    "ON CONFLICT (key) DO NOTHING",
                    (str(SCHEMA_VERSION),),
                )
        except self._psycopg.Error as exc:
            hint = ""
            if "vector" in str(exc):
                hint = (" (the pgvector extension is missing or this user may not create it: have an "
                        "administrator run CREATE EXTENSION vector in this database)")  # fmt: skip
            raise StoreError(f"cannot set up the index in {self.path}: {str(exc).strip()}{hint}") from None

    def _has_schema(self) -> bool:
        row = self._writer.execute(
            "SELECT to_regclass('meta') IS NOT NULL AND to_regclass('chunks') IS NOT NULL"
        )
        return bool(row.fetchone()[0])

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except Exception:
                    pass
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------------------------

    def _read(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:  # a restarted server broke the old one
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @_reading
    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Every row of one query on this thread's reading connection."""
        return self._read().execute(sql, args).fetchall()

    def _drop_lost_reader(self) -> bool:
        """Forget this thread's reading connection if the server dropped it; whether it had."""
        conn = getattr(self._local, "conn", None)
        if conn is None or not (conn.closed or conn.broken):
            return False
        self._local.conn = None
        with self._readers_lock:
            if conn in self._readers:
                self._readers.remove(conn)
        conn.close()
        return True

    def _begin(self) -> Any:
        """BEGIN on the writer connection. One the server dropped while it was idle is only found
        out here, before anything of this write was sent: connect again and begin there."""
        for attempt in (1, 2):
            if self._writer.closed or self._writer.broken:
                self._writer = self._connect()
            try:
                self._writer.execute("BEGIN")
                return self._writer
            except self._psycopg.OperationalError as exc:
                if not (self._writer.closed or self._writer.broken):
                    raise self._write_failure(exc, lost=False) from None
                if attempt == 2:
                    raise StoreWriteError(
                        f"the index database {self.path} dropped the connection again right after "
                        f"connecting ({_one_line(exc)}): nothing was written; is the server running? "
                        "Check it and the network, then retry"
                    ) from None
                log.info("the index database %s dropped the connection (%s): connecting again",
                         self.path, _one_line(exc))  # fmt: skip
        raise AssertionError("unreachable")

    def _rollback(self) -> None:
        """End a failed transaction; a connection that cannot even roll back is closed (the server
        rolls back what it had), so the next write connects again."""
        try:
            self._writer.execute("ROLLBACK")
        except self._psycopg.Error:
            self._writer.close()

    def _write_failure(self, exc: BaseException, lost: bool) -> StoreWriteError:
        """The store's own error for a write the server or the connection stopped."""
        errors = self._psycopg.errors
        if isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure)):
            kind = "a deadlock" if isinstance(exc, errors.DeadlockDetected) else "a serialization failure"
            return WriteConflict(
                f"a write to the index database {self.path} met {kind} with another writer "
                f"({_one_line(exc)}) and was rolled back"
            )
        if lost:
            return StoreWriteError(
                f"the connection to the index database {self.path} was lost during a write "
                f"({_one_line(exc)}): the server rolled the write back (a document is never half "
                "written; one lost at its commit is either all there or not at all) and everything "
                "committed before is intact. Check that the server runs, then run the command again"
            )
        return StoreWriteError(
            f"the index database {self.path} could not be written ({_one_line(exc)}): the "
            "transaction was rolled back; check the server and retry"
        )

    @contextmanager
    def _transaction(self, *paths: str) -> Iterator[Any]:
        """One transaction on the writer connection, holding advisory locks on ``paths`` (taken in
        a fixed order, so two writers locking the same paths cannot deadlock). A connection lost
        before it began is replaced; one lost inside it, or a conflict with another writer, rolls
        it back and raises a ``StoreWriteError`` (a ``WriteConflict``, which ``_writing`` retries)."""
        with self._write_lock:
            conn = self._begin()
            try:
                for key in sorted({_path_key(p) for p in paths}):
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, key))
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                lost = conn.closed or conn.broken
                if not lost:
                    self._rollback()
                if isinstance(exc, self._psycopg.OperationalError):
                    raise self._write_failure(exc, lost) from None
                raise

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(event, path)`` after each change this process commits to a document."""
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

    @_reading
    def get_meta(self, key: str) -> str | None:
        row = self._read().execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    @_writing
    def set_meta(self, key: str, value: str | None) -> None:
        with self._transaction() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = %s", (key,))
            else:
                self._set_meta(conn, key, value)

    @staticmethod
    def _set_meta(conn: Any, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )

    def schema_version(self) -> int:
        return int(self.get_meta("pg_schema") or 0)

    # -- embedder and vectors ------------------------------------------------------------------

    @property
    def embed_model(self) -> str | None:
        return self.get_meta("embed_model")

    @property
    def embed_dim(self) -> int | None:
        value = self.get_meta("embed_dim")
        return int(value) if value else None

    @staticmethod
    def _vector_type(dimension: int) -> str:
        return "vector" if dimension <= HNSW_MAX_VECTOR_DIM else "halfvec"

    @_writing
    def ensure_embedder(self, model_id: str, dimension: int) -> bool:
        """Make the vector table fit ``model_id``; True when vectors must be (re)computed. Another
        embedder than the recorded one drops every vector at once; the chunks stay."""
        dimension = int(dimension)
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, SCHEMA_LOCK))
            known = self._meta_in(conn, "embed_model")
            dim = self._meta_in(conn, "embed_dim")
            has_table = conn.execute("SELECT to_regclass('chunk_vectors') IS NOT NULL").fetchone()[0]
            if has_table and known == model_id and dim and int(dim) == dimension:
                return False
            self._create_vector_table(conn, dimension)
            self._set_meta(conn, "embed_model", model_id)
            self._set_meta(conn, "embed_dim", str(dimension))
            changed = bool(known) and known != model_id
        if changed:
            log.info("embedder changed to %s: every chunk will be re-embedded", model_id)
        return True

    def _create_vector_table(self, conn: Any, dimension: int, index: bool = True) -> None:
        kind = self._vector_type(dimension)
        conn.execute("DROP TABLE IF EXISTS chunk_vectors")
        conn.execute(
            f"CREATE TABLE chunk_vectors (chunk_id BIGINT PRIMARY KEY REFERENCES chunks(id) "
            f"ON DELETE CASCADE, embedding {kind}({dimension}) NOT NULL)"
        )
        if index:
            self._create_vector_index(conn, dimension)

    def _create_vector_index(self, conn: Any, dimension: int) -> None:
        kind = self._vector_type(dimension)
        conn.execute(
            f"CREATE INDEX chunk_vectors_hnsw ON chunk_vectors USING hnsw (embedding {kind}_cosine_ops)"
        )

    @staticmethod
    def _meta_in(conn: Any, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def _has_vectors(self, conn: Any) -> bool:
        return bool(conn.execute("SELECT to_regclass('chunk_vectors') IS NOT NULL").fetchone()[0])

    def _cast(self) -> str:
        return self._vector_type(self.embed_dim or 0)

    @_reading
    def chunks_missing_vectors(self, limit: int = 1000) -> list[ChunkRow]:
        conn = self._read()
        if not self._has_vectors(conn):
            rows = conn.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks c ORDER BY c.id LIMIT %s", (limit,))
        else:
            rows = conn.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE NOT EXISTS "
                "(SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id) ORDER BY c.id LIMIT %s",
                (limit,),
            )
        return [_chunk_row(row) for row in rows.fetchall()]

    @_writing
    def set_vectors(self, model_id: str, rows: Sequence[tuple[int, str, np.ndarray]]) -> None:
        """Store vectors for existing chunks ((chunk id, chunk hash, vector)), in one transaction."""
        now, cast = time.time(), self._cast()
        with self._transaction() as conn:
            for chunk_id, _, vector in sorted(rows, key=lambda row: row[0]):  # row locks in one order
                conn.execute(
                    f"INSERT INTO chunk_vectors(chunk_id, embedding) SELECT id, %s::{cast} FROM chunks "
                    "WHERE id = %s ON CONFLICT (chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding",
                    (np.asarray(vector, dtype=np.float32), chunk_id),
                )
            self._cache(conn, model_id, [(chunk_hash, vector) for _, chunk_hash, vector in rows], now)

    @staticmethod
    def _cache(conn: Any, model_id: str, vectors: Iterable[tuple[str, np.ndarray]], now: float) -> None:
        """Upsert cached vectors in the order of their hashes: two writers caching the same texts
        (copies of a file on two machines) lock those rows in one order and cannot deadlock."""
        rows = {chunk_hash: vector_blob(vector) for chunk_hash, vector in vectors}
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO embedding_cache(model_id, chunk_hash, vector, used_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (model_id, chunk_hash) DO UPDATE SET vector = EXCLUDED.vector, used_at = EXCLUDED.used_at",
                [(model_id, chunk_hash, rows[chunk_hash], now) for chunk_hash in sorted(rows)],
            )

    @_writing
    def cache_vectors(self, model_id: str, vectors: Iterable[tuple[str, np.ndarray]]) -> None:
        with self._transaction() as conn:
            self._cache(conn, model_id, list(vectors), time.time())

    @_reading
    def cached_vectors(self, model_id: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return {}
        rows = self._read().execute(
            "SELECT chunk_hash, vector FROM embedding_cache WHERE model_id = %s AND chunk_hash = ANY(%s)",
            (model_id, wanted),
        )
        return {chunk_hash: np.frombuffer(blob, dtype=np.float32) for chunk_hash, blob in rows}

    @_writing
    def prune_cache(self, older_than_days: float = 30.0) -> int:
        cutoff = time.time() - older_than_days * 86400
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM embedding_cache e WHERE used_at < %s AND NOT EXISTS "
                "(SELECT 1 FROM chunks c WHERE c.chunk_hash = e.chunk_hash)",
                (cutoff,),
            ).rowcount

    # -- roots -----------------------------------------------------------------------------------

    @_reading
    def roots(self) -> list[Root]:
        return [
            Root(*row) for row in self._read().execute("SELECT id, path, added_at FROM roots ORDER BY path")
        ]

    @_writing
    def add_root(self, path: Path | str) -> Root:
        resolved = str(Path(path).expanduser().resolve())
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO roots(path, added_at) VALUES (%s, %s) ON CONFLICT (path) DO NOTHING",
                (resolved, time.time()),
            )
            row = conn.execute("SELECT id, path, added_at FROM roots WHERE path = %s", (resolved,)).fetchone()
        return Root(*row)

    @_writing
    def remove_root(self, path: Path | str) -> bool:
        """Forget a root and everything indexed under it (chunks and vectors go by cascade)."""
        resolved = str(Path(path).expanduser().resolve())
        with self._transaction(resolved) as conn:
            if not conn.execute("DELETE FROM roots WHERE path = %s", (resolved,)).rowcount:
                return False
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

    @_reading
    def get_document(self, path: Path | str) -> DocumentRow | None:
        row = self._read().execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE path = %s", (str(path),))
        found = row.fetchone()
        return DocumentRow(*found) if found else None

    @_reading
    def documents(self, root: str | None = None) -> list[DocumentRow]:
        sql, args = f"SELECT {_DOC_COLUMNS} FROM documents", ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = %s)"
            args = (root,)
        return [DocumentRow(*row) for row in self._read().execute(sql + " ORDER BY path", args)]

    @_reading
    def find_by_hash(self, content_hash: str) -> list[DocumentRow]:
        rows = self._read().execute(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE content_hash = %s", (content_hash,)
        )
        return [DocumentRow(*row) for row in rows]

    @_reading
    def document_chunks(self, path: Path | str) -> list[ChunkRow]:
        rows = self._read().execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE d.path = %s ORDER BY c.seq",
            (str(path),),
        )
        return [_chunk_row(row) for row in rows.fetchall()]

    def iter_chunks(self, path_glob: str | None = None, root: str | None = None) -> Iterator[ChunkWithPath]:
        sql = (
            f"SELECT {_CHUNK_COLUMNS}, d.path FROM chunks c JOIN documents d ON d.id = c.document_id "
            "JOIN roots r ON r.id = d.root_id"
        )
        args: list[Any] = []
        if root is not None:
            sql += " WHERE r.path = %s"
            args.append(str(Path(root).expanduser().resolve()))
        root_paths = [r.path for r in self.roots()]
        for row in self._fetch(sql + " ORDER BY d.path, c.seq", args):
            if path_glob and not path_matches(row[11], path_glob, root_paths):
                continue
            yield ChunkWithPath(**_chunk_row(row[:11]).__dict__, path=row[11])

    @_writing
    def replace_document(
        self, *, path: str, root_id: int, size: int, mtime: float, content_hash: str, loader: str,
        chunks: Sequence[Any], vectors: np.ndarray, model_id: str, note: str | None = None,
    ) -> int:  # fmt: skip
        """Swap a document's chunks, vectors and keywords for new ones in one transaction, holding
        the document's advisory lock."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors for {path}")
        now, cast = time.time(), self._cast()
        with self._transaction(path) as conn:
            doc_id = self._upsert_document(
                conn, path, root_id, size, mtime, content_hash, loader, STATUS_INDEXED, None, note
            )
            conn.execute("DELETE FROM ignored WHERE path = %s", (path,))
            conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
            ids = self._insert_chunks(conn, doc_id, chunks)
            with conn.cursor() as cur:  # executemany: pipelined, not a round trip a row
                cur.executemany(
                    f"INSERT INTO chunk_vectors(chunk_id, embedding) VALUES (%s, %s::{cast})",
                    [
                        (chunk_id, np.asarray(vector, dtype=np.float32))
                        for chunk_id, vector in zip(ids, vectors)
                    ],
                )
            self._cache(
                conn, model_id, [(chunk.chunk_hash, vector) for chunk, vector in zip(chunks, vectors)], now
            )
            conn.execute("UPDATE documents SET chunk_count = %s WHERE id = %s", (len(chunks), doc_id))
            self._touch(conn)
        self._notify("indexed", path)
        return doc_id

    @staticmethod
    def _insert_chunks(conn: Any, doc_id: int, chunks: Sequence[Any]) -> list[int]:
        """Insert a document's chunks with their keywords; their new ids, in order."""
        rows = []
        for seq, chunk in enumerate(chunks):
            headings = list(chunk.heading_path or [])
            rows.append((doc_id, seq, chunk.text, chunk.char_start, chunk.char_end, chunk.start_line, chunk.end_line,
                         chunk.page, json.dumps(headings, ensure_ascii=False), chunk.chunk_hash, " / ".join(headings),
                         chunk.text))  # fmt: skip
        if not rows:
            return []
        ids: list[int] = []
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO chunks(document_id, seq, text, char_start, char_end, start_line, end_line, page, "
                f"heading_path, chunk_hash, keywords) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {_KEYWORDS_SQL}) "
                "RETURNING id",
                rows,
                returning=True,
            )
            while True:
                ids.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
        return ids

    @_writing
    def record_problem(
        self, *, path: str, root_id: int, status: str, error: str, size: int | None = None,
        mtime: float | None = None, loader: str | None = None, keep_chunks: bool = False,
    ) -> None:  # fmt: skip
        """Record that a file failed or was skipped, with the reason; its chunks go in the same
        transaction unless ``keep_chunks``."""
        with self._transaction(path) as conn:
            doc_id = self._upsert_document(
                conn, path, root_id, size, mtime, None, loader, status, error, None, keep_chunks=True
            )
            if not keep_chunks:
                conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
                conn.execute(
                    "UPDATE documents SET content_hash = NULL, chunk_count = 0 WHERE id = %s", (doc_id,)
                )
            conn.execute("DELETE FROM ignored WHERE path = %s", (path,))
            self._touch(conn)
        self._notify(status, path)

    def _upsert_document(
        self, conn: Any, path: str, root_id: int, size: int | None, mtime: float | None,
        content_hash: str | None, loader: str | None, status: str, error: str | None, note: str | None,
        keep_chunks: bool = False,
    ) -> int:  # fmt: skip
        row = conn.execute("SELECT id FROM documents WHERE path = %s", (path,)).fetchone()
        now = time.time()
        if row and keep_chunks:  # the old chunks (and the hash they were made from) stay
            conn.execute(
                "UPDATE documents SET root_id = %s, status = %s, error = %s, size = %s, mtime = %s, "
                "loader = COALESCE(%s, loader), indexed_at = %s WHERE id = %s",
                (root_id, status, error, size, mtime, loader, now, row[0]),
            )
            return row[0]
        if row:
            conn.execute(
                "UPDATE documents SET root_id = %s, size = %s, mtime = %s, content_hash = %s, loader = %s, "
                "status = %s, error = %s, note = %s, indexed_at = %s WHERE id = %s",
                (root_id, size, mtime, content_hash, loader, status, error, note, now, row[0]),
            )
            return row[0]
        return conn.execute(
            "INSERT INTO documents(root_id, path, size, mtime, content_hash, loader, status, error, note, "
            "indexed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (root_id, path, size, mtime, None if keep_chunks else content_hash, loader, status, error, note,
             now),
        ).fetchone()[0]  # fmt: skip

    def _forget_document(self, conn: Any, path: str) -> bool:
        return bool(conn.execute("DELETE FROM documents WHERE path = %s", (path,)).rowcount)

    def _touch(self, conn: Any) -> None:
        self._set_meta(conn, "last_change", repr(time.time()))

    # -- files left out --------------------------------------------------------------------------

    @_writing
    def record_ignored(
        self, *, path: str, root_id: int, kind: str, reason: str, is_dir: bool = False,
        size: int | None = None, mtime: float | None = None,
    ) -> None:  # fmt: skip
        with self._transaction(path) as conn:
            had = self._forget_document(conn, path)
            self._upsert_ignored(conn, path, root_id, kind, reason, is_dir, size, mtime)
            if had:
                self._touch(conn)
        if had:
            self._notify("removed", path)

    @_writing
    def sync_ignored(
        self, root_id: int, entries: Sequence[tuple[str, str, str, bool]], present: set[str],
        under: str | None = None,
    ) -> None:  # fmt: skip
        sql, args = "SELECT path FROM ignored WHERE root_id = %s", [root_id]
        if under is not None:
            prefix = under.rstrip(os.sep) + os.sep
            sql += " AND left(path, %s) = %s"
            args += [len(prefix), prefix]
        dropped: list[str] = []
        with self._transaction(*(entry[0] for entry in entries)) as conn:
            gone = [row[0] for row in conn.execute(sql, args).fetchall() if row[0] not in present]
            if gone:
                conn.execute("DELETE FROM ignored WHERE path = ANY(%s)", (gone,))
            for path, kind, reason, is_dir in entries:
                if self._forget_document(conn, path):
                    dropped.append(path)
                self._upsert_ignored(conn, path, root_id, kind, reason, is_dir, None, None)
            if dropped:
                self._touch(conn)
        for path in dropped:
            self._notify("removed", path)

    @staticmethod
    def _upsert_ignored(conn: Any, path: str, root_id: int, kind: str, reason: str, is_dir: bool,
                        size: int | None, mtime: float | None) -> None:  # fmt: skip
        conn.execute(
            "INSERT INTO ignored(path, root_id, kind, reason, is_dir, size, mtime, seen_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (path) DO UPDATE SET root_id = EXCLUDED.root_id, "
            "kind = EXCLUDED.kind, reason = EXCLUDED.reason, is_dir = EXCLUDED.is_dir, size = EXCLUDED.size, "
            "mtime = EXCLUDED.mtime, seen_at = EXCLUDED.seen_at",
            (path, root_id, kind, reason, bool(is_dir), size, mtime, time.time()),
        )

    @_reading
    def get_ignored(self, path: str) -> FileEntry | None:
        row = (
            self._read()
            .execute("SELECT path, kind, reason, is_dir, size, mtime FROM ignored WHERE path = %s", (path,))
            .fetchone()
        )
        if row is None:
            return None
        entry = FileEntry(row[0], STATUS_IGNORED, row[2], kind=row[1], is_dir=bool(row[3]))
        entry.size, entry.mtime = row[4], row[5]  # type: ignore[attr-defined]
        return entry

    @_reading
    def ignored_paths(self, root: str | None = None) -> list[str]:
        sql, args = "SELECT path FROM ignored", ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = %s)"
            args = (root,)
        return [row[0] for row in self._read().execute(sql, args)]

    @_writing
    def delete_ignored(self, paths: Iterable[str]) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM ignored WHERE path = ANY(%s)", (list(paths),))

    @_reading
    def files(self, which: str = "all", root: str | None = None) -> list[FileEntry]:
        """The files of the watched folders by path, as ``Store.files`` lists them."""
        wanted = {"all": FILE_KINDS, "problems": ("failed", "skipped")}.get(which, (which,))
        if not set(wanted) <= set(FILE_KINDS):
            raise ValueError(
                f"unknown file list {which!r}: use all, problems or one of {', '.join(FILE_KINDS)}"
            )
        conn = self._read()
        where, args = "", []
        if root is not None:
            where = " AND root_id = (SELECT id FROM roots WHERE path = %s)"
            args = [str(Path(root).expanduser().resolve())]
        out: list[FileEntry] = []
        statuses = [w for w in wanted if w != STATUS_IGNORED]
        if statuses:
            for path, status, error, note, chunks in conn.execute(
                "SELECT path, status, COALESCE(error, ''), note, chunk_count FROM documents "
                f"WHERE status = ANY(%s){where}",
                (statuses, *args),
            ):
                out.append(FileEntry(path, status, error or note or "", chunks))
        if STATUS_IGNORED in wanted:
            for path, kind, reason, is_dir in conn.execute(
                f"SELECT path, kind, reason, is_dir FROM ignored WHERE TRUE{where}", args
            ):
                out.append(FileEntry(path, STATUS_IGNORED, reason, kind=kind, is_dir=bool(is_dir)))
        out.sort(key=lambda entry: entry.path)
        return out

    # -- changes of documents ----------------------------------------------------------------------

    @_writing
    def touch_document(self, path: str, size: int, mtime: float) -> None:
        with self._transaction(path) as conn:
            conn.execute(
                "UPDATE documents SET size = %s, mtime = %s, indexed_at = %s WHERE path = %s",
                (size, mtime, time.time(), path),
            )

    @_writing
    def forget_file_state(self, root: str | None = None, content: bool = False) -> int:
        sql = "UPDATE documents SET mtime = NULL" + (", content_hash = NULL" if content else "")
        args: tuple = ()
        if root is not None:
            sql += " WHERE root_id = (SELECT id FROM roots WHERE path = %s)"
            args = (str(Path(root).expanduser().resolve()),)
        with self._transaction() as conn:
            return conn.execute(sql, args).rowcount

    @_writing
    def delete_document(self, path: str) -> bool:
        with self._transaction(path) as conn:
            ignored = conn.execute("DELETE FROM ignored WHERE path = %s", (path,)).rowcount
            if not self._forget_document(conn, path):
                return bool(ignored)
            self._touch(conn)
        self._notify("removed", path)
        return True

    def delete_under(self, directory: str) -> list[str]:
        prefix = directory.rstrip(os.sep) + os.sep
        paths = [
            row[0]
            for row in self._fetch(
                "SELECT path FROM documents WHERE left(path, %s) = %s UNION "
                "SELECT path FROM ignored WHERE left(path, %s) = %s OR path = %s",
                (len(prefix), prefix, len(prefix), prefix, directory),
            )
        ]
        for path in paths:
            self.delete_document(path)
        return paths

    @_writing
    def move_document(self, src: str, dst: str, root_id: int, mtime: float | None = None) -> bool:
        with self._transaction(src, dst) as conn:
            row = conn.execute("SELECT id FROM documents WHERE path = %s", (src,)).fetchone()
            if not row:
                return False
            self._forget_document(conn, dst)
            conn.execute("DELETE FROM ignored WHERE path = %s", (dst,))
            conn.execute(
                "UPDATE documents SET path = %s, root_id = %s, mtime = COALESCE(%s, mtime), indexed_at = %s "
                "WHERE id = %s",
                (dst, root_id, mtime, time.time(), row[0]),
            )
            self._touch(conn)
        self._notify("moved", dst)
        return True

    @_writing
    def move_under(self, src: str, dst: str, root_id: int) -> list[str]:
        old, new = src.rstrip(os.sep) + os.sep, dst.rstrip(os.sep) + os.sep
        rows = self._fetch("SELECT id, path FROM documents WHERE left(path, %s) = %s", (len(old), old))
        locked = [p for _, p in rows] + [new + p[len(old) :] for _, p in rows]
        moved: list[str] = []
        with self._transaction(*locked) as conn:
            for doc_id, path in rows:
                target = new + path[len(old) :]
                self._forget_document(conn, target)
                if conn.execute(
                    "UPDATE documents SET path = %s, root_id = %s, indexed_at = %s WHERE id = %s AND path = %s",
                    (target, root_id, time.time(), doc_id, path),
                ).rowcount:
                    moved.append(target)
            conn.execute("DELETE FROM ignored WHERE left(path, %s) = %s OR path = %s", (len(old), old, src))
            if moved:
                self._touch(conn)
        for path in moved:
            self._notify("moved", path)
        return moved

    @_writing
    def delete_document_if_older(self, path: str, before: float) -> bool:
        with self._transaction(path) as conn:
            if not conn.execute(
                "DELETE FROM documents WHERE path = %s AND COALESCE(indexed_at, 0) < %s", (path, before)
            ).rowcount:
                return False
            self._touch(conn)
        self._notify("removed", path)
        return True

    # -- search queries ----------------------------------------------------------------------------

    @_reading
    def filter_documents(
        self, *, root: str | None = None, modified_after: float | None = None,
        file_types: Sequence[str] | None = None, loaders: Sequence[str] | None = None,
    ) -> list[tuple[int, str]]:  # fmt: skip
        """(id, path) of the indexed documents that pass these filters (as ``Store.filter_documents``)."""
        sql = "SELECT id, path FROM documents WHERE status = 'indexed'"
        args: list = []
        if root:
            sql += " AND root_id = (SELECT id FROM roots WHERE path = %s)"
            args.append(str(Path(root).expanduser().resolve()))
        if modified_after is not None:
            sql += " AND mtime >= %s"
            args.append(float(modified_after))
        if file_types or loaders:
            terms = ["lower(path) LIKE %s" for _ in file_types or ()] + [
                "loader LIKE %s" for _ in loaders or ()
            ]
            sql += " AND (" + " OR ".join(terms) + ")"
            args.extend("%" + _like(ext) for ext in file_types or ())
            args.extend(_like(name) + ":%" for name in loaders or ())
        return [(doc_id, path) for doc_id, path in self._read().execute(sql, args)]

    @_reading
    def has_suffix(self, suffix: str) -> bool:
        row = (
            self._read()
            .execute(
                "SELECT 1 FROM documents WHERE status = 'indexed' AND lower(path) LIKE %s LIMIT 1",
                ("%" + _like(suffix),),
            )
            .fetchone()
        )
        return row is not None

    @_reading
    def vector_search(
        self, query: np.ndarray, k: int, documents: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the ``k`` chunks nearest ``query``, best first; only
        chunks of ``documents`` when given. Exact over few chunks, HNSW otherwise (with pgvector's
        iterative scan when filtered, so a filter never starves the result)."""
        conn = self._read()
        if not self._has_vectors(conn):
            return []
        vec, cast = np.asarray(query, dtype=np.float32), self._cast()
        ids = sorted(documents) if documents is not None else None
        if ids is not None and not ids:
            return []
        where = "WHERE c.document_id = ANY(%(ids)s)" if ids is not None else ""
        source = f"chunks c {where}" if ids is not None else "chunk_vectors"
        count = conn.execute(  # counted up to the bound only: a million rows are not counted per search
            f"SELECT COUNT(*) FROM (SELECT 1 FROM {source} LIMIT %(bound)s) n",
            {"ids": ids, "bound": self.exact_below + 1},
        ).fetchone()[0]
        args = {"q": vec, "k": int(k), "ids": ids}
        if count <= self.exact_below:  # distances in a materialised step: the planner cannot use HNSW
            rows = conn.execute(
                f"WITH d AS MATERIALIZED (SELECT c.id, v.embedding <=> %(q)s::{cast} AS dist FROM chunks c "
                f"JOIN chunk_vectors v ON v.chunk_id = c.id {where}) SELECT id, dist FROM d ORDER BY dist, id "
                "LIMIT %(k)s",
                args,
            ).fetchall()
            return [(cid, 1.0 - float(dist)) for cid, dist in rows]
        with self._settings_for_one_query(conn):
            ef_search = min(EF_SEARCH_MAX, max(self.ef_search, 2 * int(k)))
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search),))
            if ids is not None:
                conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
            join = f"JOIN chunks c ON c.id = v.chunk_id {where}" if ids is not None else ""
            rows = conn.execute(
                f"SELECT v.chunk_id, v.embedding <=> %(q)s::{cast} AS dist FROM chunk_vectors v {join} "
                f"ORDER BY v.embedding <=> %(q)s::{cast} LIMIT %(k)s",
                args,
            ).fetchall()
        rows.sort(key=lambda row: (row[1], row[0]))  # relaxed order comes back nearly sorted
        return [(cid, 1.0 - float(dist)) for cid, dist in rows]

    @contextmanager
    def _settings_for_one_query(self, conn: Any) -> Iterator[None]:
        """A read-only transaction on a reading connection, so ``set_config(..., true)`` lasts for one
        query; ended by ROLLBACK, unless the server dropped the connection (``_reading`` retries)."""
        conn.execute("BEGIN")
        try:
            yield
        finally:
            if not (conn.closed or conn.broken):
                conn.execute("ROLLBACK")

    def vector_index_ready(self) -> None:
        """The server's HNSW index is always ready; nothing to build in this process."""
        return None

    @_reading
    def keyword_search(
        self, match: str, k: int, documents: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """(chunk id, ts_rank score, higher is better), best first, for the words of ``match`` (the
        quoted words of search's OR-query; any of them matches)."""
        words = [w.lower() for w in re.findall(r"\w+", match) if w not in ("AND", "OR", "NOT", "NEAR")]
        if not words:
            return []
        text = " or ".join(dict.fromkeys(words))
        where = "AND c.document_id = ANY(%(ids)s)" if documents is not None else ""
        rows = (
            self._read()
            .execute(
                f"WITH q AS (SELECT websearch_to_tsquery('{TEXT_CONFIG}', %(text)s) AS q) "
                f"SELECT c.id, ts_rank('{RANK_WEIGHTS}', c.keywords, q.q, 1) AS s FROM chunks c, q "
                f"WHERE c.keywords @@ q.q {where} ORDER BY s DESC, c.id LIMIT %(k)s",
                {"text": text, "k": int(k), "ids": sorted(documents or ())},
            )
            .fetchall()
        )
        return [(cid, float(score)) for cid, score in rows]

    @_reading
    def chunk_hits(self, ids: Sequence[int]) -> dict[int, ChunkHit]:
        if not ids:
            return {}
        rows = (
            self._read()
            .execute(
                "SELECT c.id, c.document_id, d.path, c.text, c.start_line, c.end_line, c.page, c.heading_path, "
                "d.mtime, r.path, c.chunk_hash, c.char_start, c.char_end FROM chunks c "
                "JOIN documents d ON d.id = c.document_id JOIN roots r ON r.id = d.root_id WHERE c.id = ANY(%s)",
                (list(ids),),
            )
            .fetchall()
        )
        return {
            row[0]: ChunkHit(
                chunk_id=row[0],
                document_id=row[1],
                path=row[2],
                text=row[3],
                start_line=row[4],
                end_line=row[5],
                page=row[6],
                heading_path=json.loads(row[7] or "[]"),
                mtime=row[8],
                root=row[9],
                chunk_hash=row[10],
                char_start=row[11],
                char_end=row[12],
            )  # fmt: skip
            for row in rows
        }

    @_reading
    def chunk_count(self) -> int:
        return self._read().execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    # -- copying an SQLite index in --------------------------------------------------------------

    def import_sqlite(self, path: Path | str, batch: int = 500) -> dict[str, int]:
        """Copy the SQLite index at ``path`` into this empty database, in one transaction: roots,
        documents, chunks (keywords computed here), their vectors as they are (nothing is
        re-embedded), the embedding cache, files left out and the index's settings. Ids are kept,
        so a search gives the same chunk ids on both. Returns the number of rows copied per table."""
        from .store import Store, connect

        source_path = Path(path).expanduser()
        with Store.open(source_path, create=False) as source:  # brings an older file's schema up to date
            model, dim = source.embed_model, source.embed_dim
        src = connect(source_path)
        counts: dict[str, int] = {}
        try:
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, SCHEMA_LOCK))
                if conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM roots) OR EXISTS (SELECT 1 FROM documents)"
                ).fetchone()[0]:
                    raise StoreError(
                        f"the database {self.path} already holds an index: migrate into an empty database "
                        "(or drop its tables first)"
                    )
                conn.execute("DELETE FROM embedding_cache")
                for table, columns in _COPIED_TABLES:
                    counts[table] = self._copy_rows(src, conn, table, columns, batch)
                for key, value in src.execute("SELECT key, value FROM meta WHERE key NOT IN ('index_id')"):
                    self._set_meta(conn, key, value)
                if model and dim:
                    self._create_vector_table(conn, int(dim), index=False)  # built once at the end: faster
                    counts["chunk_vectors"] = self._copy_vectors(src, conn, int(dim), batch)
                    self._create_vector_index(conn, int(dim))
                for table in ("roots", "documents", "chunks"):
                    conn.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                    )
        finally:
            src.close()
        return counts

    @staticmethod
    def _copy_rows(src: Any, conn: Any, table: str, columns: str, batch: int) -> int:
        names = [c.strip() for c in columns.split(",")]
        marks = ", ".join(
            _KEYWORDS_SQL if name == "keywords" else ("%s::boolean" if name == "is_dir" else "%s")
            for name in names
        )
        select = (
            columns.replace("keywords", "(SELECT '') AS h, text AS t") if "keywords" in names else columns
        )
        cursor = src.execute(f"SELECT {select} FROM {table} ORDER BY 1")
        total = 0
        with conn.cursor() as cur:
            while rows := cursor.fetchmany(batch):
                if "keywords" in names:
                    rows = [_with_headings(row) for row in rows]
                if "is_dir" in names:
                    at = names.index("is_dir")
                    rows = [(*row[:at], bool(row[at]), *row[at + 1 :]) for row in rows]
                cur.executemany(f"INSERT INTO {table}({columns}) VALUES ({marks})", rows)
                total += len(rows)
        return total

    def _copy_vectors(self, src: Any, conn: Any, dim: int, batch: int) -> int:
        cast, total = self._vector_type(dim), 0
        cursor = src.execute("SELECT rowid, embedding FROM chunk_vectors ORDER BY rowid")
        with conn.cursor() as cur:
            while rows := cursor.fetchmany(batch):
                cur.executemany(
                    f"INSERT INTO chunk_vectors(chunk_id, embedding) VALUES (%s, %s::{cast})",
                    [(rowid, np.frombuffer(blob, dtype=np.float32)) for rowid, blob in rows],
                )
                total += len(rows)
        return total

    # -- status ----------------------------------------------------------------------------------

    @_reading
    def status(self) -> IndexStatus:
        conn = self._read()
        roots = []
        for _root_id, path, docs, chunks, failed, skipped, ignored in conn.execute(
            "SELECT r.id, r.path, COUNT(d.id), COALESCE(SUM(d.chunk_count), 0), "
            "COUNT(d.id) FILTER (WHERE d.status = 'failed'), COUNT(d.id) FILTER (WHERE d.status = 'skipped'), "
            "(SELECT COUNT(*) FROM ignored i WHERE i.root_id = r.id) "
            "FROM roots r LEFT JOIN documents d ON d.root_id = r.id GROUP BY r.id, r.path ORDER BY r.path"
        ).fetchall():
            roots.append(RootStatus(path, docs - failed - skipped, int(chunks), failed, skipped, ignored))
        failed_rows = conn.execute(
            "SELECT path, status, COALESCE(error, '') FROM documents WHERE status != 'indexed' ORDER BY path"
        ).fetchall()
        last = self.get_meta("last_change")
        return IndexStatus(
            db_path=self.path,
            roots=roots,
            documents=conn.execute("SELECT COUNT(*) FROM documents WHERE status = 'indexed'").fetchone()[0],
            chunks=self.chunk_count(),
            failed=[FailedFile(*row) for row in failed_rows],
            last_change=float(last) if last else None,
            embed_model=self.embed_model,
            embed_dim=self.embed_dim,
            ignored=dict(
                conn.execute("SELECT kind, COUNT(*) FROM ignored GROUP BY kind ORDER BY kind").fetchall()
            ),
            skipped_count=sum(1 for row in failed_rows if row[1] == STATUS_SKIPPED),
            failed_count=sum(1 for row in failed_rows if row[1] == "failed"),
        )

    @_reading
    def check_integrity(self) -> list[str]:
        """Problems that would mean the index is inconsistent (as ``Store.check_integrity``)."""
        conn = self._read()
        problems = []
        if self._has_vectors(conn):
            missing = conn.execute(
                "SELECT COUNT(*) FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM chunk_vectors v WHERE v.chunk_id = c.id)"
            ).fetchone()[0]
            if missing:
                problems.append(f"{missing} chunks without a vector row")
        return problems + document_version_problems(conn)


_COPIED_TABLES = [
    ("roots", "id, path, added_at"),
    ("documents", _DOC_COLUMNS),
    (
        "chunks",
        "id, document_id, seq, text, char_start, char_end, start_line, end_line, page, heading_path, "
        "chunk_hash, keywords",
    ),  # fmt: skip
    ("embedding_cache", "model_id, chunk_hash, vector, used_at"),
    ("ignored", "path, root_id, kind, reason, is_dir, size, mtime, seen_at"),
]


def _with_headings(row: Sequence[Any]) -> tuple:
    """A chunk row read for copying, its last two values (placeholders) made the headings and text
    its keywords are computed from."""
    headings = " / ".join(json.loads(row[9] or "[]"))
    return (*row[:-2], headings, row[3])


def _like(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (Postgres's default escape character is the backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
