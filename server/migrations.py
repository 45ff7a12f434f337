"""Numbered, append-only schema migrations, recorded in the ``schema_migrations`` table.

Never edit a migration that has shipped: add a new one. Each runs inside its own transaction, so a
crash part-way leaves the database at the previous version. The vector table is not created here:
its dimension depends on the embedder, so the store creates it when it learns the embedder.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlean

MIGRATIONS: list[tuple[int, str, str]] = []


def migration(version: int, name: str) -> Callable[[str], str]:
    def add(sql: str) -> str:
        MIGRATIONS.append((version, name, sql))
        return sql

    return add


migration(1, "roots, documents, chunks and keyword index")(
    """
    CREATE TABLE roots (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        added_at REAL NOT NULL
    );
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        root_id INTEGER NOT NULL REFERENCES roots(id) ON DELETE CASCADE,
        path TEXT NOT NULL UNIQUE,
        size INTEGER,
        mtime REAL,
        content_hash TEXT,
        loader TEXT,
        status TEXT NOT NULL,
        error TEXT,
        chunk_count INTEGER NOT NULL DEFAULT 0,
        indexed_at REAL
    );
    CREATE INDEX documents_root ON documents(root_id);
    CREATE INDEX documents_hash ON documents(content_hash);
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        text TEXT NOT NULL,
        char_start INTEGER,
        char_end INTEGER,
        start_line INTEGER,
        end_line INTEGER,
        page INTEGER,
        heading_path TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX chunks_document ON chunks(document_id, seq);
    CREATE VIRTUAL TABLE chunks_fts USING fts5(
        text, headings, content='', contentless_delete=1, tokenize='porter unicode61'
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    """
)

migration(2, "chunk hashes, embedding cache and per-document notes")(
    """
    ALTER TABLE chunks ADD COLUMN chunk_hash TEXT NOT NULL DEFAULT '';
    CREATE INDEX chunks_hash ON chunks(chunk_hash);
    ALTER TABLE documents ADD COLUMN note TEXT;
    CREATE TABLE embedding_cache (
        model_id TEXT NOT NULL,
        chunk_hash TEXT NOT NULL,
        vector BLOB NOT NULL,
        used_at REAL NOT NULL,
        PRIMARY KEY (model_id, chunk_hash)
    ) WITHOUT ROWID;
    """
)

migration(3, "files left out of the index, with the reason")(
    """
    CREATE TABLE ignored (
        path TEXT PRIMARY KEY,
        root_id INTEGER NOT NULL REFERENCES roots(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        is_dir INTEGER NOT NULL DEFAULT 0,
        size INTEGER,
        mtime REAL,
        seen_at REAL NOT NULL
    );
    CREATE INDEX ignored_root ON ignored(root_id, kind);
    """
)

migration(4, "a log of changed chunks for the in-process vector accelerator, and the index's id")(
    """
    CREATE TABLE vector_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, chunk_id INTEGER NOT NULL);
    CREATE TRIGGER chunks_log_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO vector_changes(chunk_id) VALUES (new.id);
    END;
    CREATE TRIGGER chunks_log_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO vector_changes(chunk_id) VALUES (old.id);
    END;
    CREATE TRIGGER chunks_log_update AFTER UPDATE OF id, document_id ON chunks BEGIN
        INSERT INTO vector_changes(chunk_id) VALUES (old.id);
        INSERT INTO vector_changes(chunk_id) VALUES (new.id);
    END;
    INSERT OR IGNORE INTO meta(key, value) VALUES ('index_id', lower(hex(randomblob(16))));
    """
)


def current_version(conn) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def migrate(conn, target: int | None = None) -> list[int]:
    """Apply every migration above the database's version (up to ``target``); return those applied."""
    applied = []
    for version, name, sql in sorted(MIGRATIONS):
        if target is not None and version > target:
            break
        if version <= current_version(conn):
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def _statements(sql: str) -> list[str]:
    # executescript() would commit implicitly; split instead so the migration stays one transaction.
    # No statement here contains a semicolon inside a string literal; a trigger's body holds several,
    # so pieces are joined until SQLite calls the statement complete.
    out, pending = [], ""
    for piece in sql.split(";"):
        pending += piece + ";"
        if sqlean.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip().rstrip(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        out.append(pending.strip().rstrip(";").strip())
    return out


LATEST_VERSION = max(v for v, _, _ in MIGRATIONS)
