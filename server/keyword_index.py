"""A fast keyword ranker for big indexes: Tantivy beside the index file, built from its rows and
never needed for correctness.

Why: FTS5 computes ``bm25()`` for every row that matches any word of the query. A question's
words ("how", "read", "file") match a third to three quarters of a million chunks, so the keyword
half of a hybrid search took ~500 ms at 1M chunks (scripts/bench_vectors.py), however few results
are wanted. Tantivy (the Rust search library behind Quickwit and ParadeDB) ranks with BM25 and
skips, block by block, the postings that cannot reach the current top k (block-max WAND): the same
40 questions take ~4 ms at 1M chunks. It is used from ``store.KEYWORD_ACCELERATE_FROM`` chunks;
below that FTS5 is fast enough and is used alone.

What it indexes, so that it finds what FTS5 finds: each chunk's text and its heading path (joined
with " / ", as FTS5 gets them), tokenized on non-alphanumeric characters, lower-cased and stemmed
with the Snowball English stemmer (FTS5: unicode61 + Porter). A query is FTS5's ``"w1" OR "w2"``
expression (``search.keyword_query``); each word is looked up in both fields (headings weighted as
``HEADINGS_BOOST`` says). Rankings are BM25 in both engines but are not equal
(Tantivy scores the two fields apart, FTS5 together; the stemmers differ on a few words):
scripts/bench_vectors.py reports how much of FTS5's top 10 it keeps. Any other match expression
(one a caller wrote by hand) goes to FTS5.

Keeping in step: SQLite stays the only source of truth. The change log that the vector
accelerator reads (``vector_changes``: chunk ids, filled by triggers in the writing transaction,
whichever process writes) says what changed since the sidecar's position. Before a search, up to
``INLINE_CHANGES`` changes are applied and committed at once (deleted by chunk id, re-read from
SQLite); more than that, a log that no longer reaches back, another index's sidecar or a damaged
one, and the search goes to FTS5 while a background thread catches up or rebuilds. Only one
process at a time can write a Tantivy index: a process that finds the writer taken searches the
sidecar only when it is up to date, FTS5 otherwise.

Files: the folder ``index.db.tantivy`` (mode 0700) with Tantivy's segments and ``lorekeeper.json``
(the index id and the change-log position it holds), written after each Tantivy commit, so a
crash between the two leaves a position older than the contents, and replaying from there is
harmless (every replayed chunk is deleted and re-read). A rebuild writes a new folder and renames
it into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .vector_index import RESET, _alive, log_head  # the change log both accelerators read

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".tantivy"
STATE_FILE = "lorekeeper.json"
FORMAT = 1
INLINE_CHANGES = 5_000  # logged changes applied before a search; more: FTS5 while a thread catches up
# FTS5 weighs heading words 2 against text 1 inside one BM25 over both columns; Tantivy scores each
# field on its own, where a heading word (short field, rare term) already scores high. 0.5 gave the
# closest top 10 to FTS5's (tests/test_keyword_index.py: 0.83 shared on average, the first hit
# always in FTS5's first three; 2.0 shared 0.80 and put one first hit 12th).
HEADINGS_BOOST = 0.5
WRITER_HEAP = 64_000_000  # bytes of Tantivy's indexing buffer (its minimum is 15 MB per thread)
_MATCH = re.compile(r'^"(\w+)"(?: OR "(\w+)")*$')
_WORD = re.compile(r'"(\w+)"')
_BATCH = 5_000
STOP_CHECK_ROWS = 2_000  # a rebuild looks for a stop request this often


def sidecar_dir(db_path: Path | str) -> Path:
    return Path(f"{db_path}{SIDECAR_SUFFIX}")


def match_words(match: str) -> list[str] | None:
    """The words of an FTS5 match built by ``search.keyword_query`` (``"a" OR "b"``); None for
    any other expression."""
    if not _MATCH.match(match):
        return None
    return _WORD.findall(match)


def _schema() -> Any:
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_integer_field("chunk", stored=True, indexed=True, fast=True)
    builder.add_integer_field("doc", indexed=True, fast=True)
    builder.add_text_field("text", tokenizer_name="en_stem", index_option="position")
    builder.add_text_field("headings", tokenizer_name="en_stem", index_option="position")
    return builder.build()


def _headings(heading_path: str | None) -> str:
    try:
        return " / ".join(json.loads(heading_path or "[]"))
    except ValueError:
        return ""


def _index_id(conn: Any) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'index_id'").fetchone()
    return row[0] if row else ""


class WriterBusy(Exception):
    """Another process holds the sidecar's writer."""


class Stopped(Exception):
    """The store was closed while the sidecar was being rebuilt."""


class KeywordIndex:
    """The keyword accelerator of one index file; thread-safe."""

    def __init__(self, db_path: Path | str, connect: Any) -> None:
        """``connect()`` opens a new read connection to the index (for the background thread)."""
        self.db_path = Path(db_path)
        self.dir = sidecar_dir(db_path)
        self._connect = connect
        self._lock = threading.Lock()
        self._index: Any = None
        self._schema: Any = None
        self._state: dict[str, Any] | None = None  # lorekeeper.json of the open index
        self._state_mtime = 0.0
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self.last_used = False  # whether the last search was answered here (for tests and benchmarks)

    # -- search -----------------------------------------------------------------------------------

    def search(
        self, conn: Any, match: str, k: int, documents: set[int] | None = None
    ) -> list[tuple[int, float]] | None:
        """(chunk id, BM25 score) best first, or None when FTS5 must answer (not up to date yet,
        or a match expression this ranker does not take)."""
        self.last_used = False
        words = match_words(match)
        if words is None:
            return None
        worker = self._worker
        if worker is not None and worker.is_alive():
            return None  # catching up or rebuilding (under the lock, for a catch-up): FTS5 meanwhile
        with self._lock:
            if not self._up_to_date(conn):
                return None
            import tantivy

            query = self._index.parse_query(
                " OR ".join(f'"{w}"' for w in words),
                ["text", "headings"],
                field_boosts={"headings": HEADINGS_BOOST},  # read at each search (tests vary it)
            )
            if documents is not None:
                allowed = tantivy.Query.term_set_query(self._schema, "doc", sorted(documents))
                query = tantivy.Query.boolean_query(
                    [(tantivy.Occur.Must, query), (tantivy.Occur.Must, allowed)]
                )
            searcher = self._index.searcher()
            hits = searcher.search(query, k).hits
            found = [(int(searcher.doc(address)["chunk"][0]), float(score)) for score, address in hits]
        self.last_used = True
        return found

    def ready(self, conn: Any) -> bool:
        """Bring the sidecar up to date now, building it if need be (for benchmarks and tools that
        want the cost paid up front); whether searches are answered here."""
        self.wait()
        with self._lock:
            if self._up_to_date(conn):
                return True
        self.wait()
        with self._lock:
            return self._up_to_date(conn)

    def wait(self) -> None:
        """Wait for a background catch-up or rebuild."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def close(self) -> None:
        """Stop a rebuild in progress (its half-made folder is removed) and wait for the thread, so
        no Tantivy thread is left running while the process exits."""
        self._stopping.set()
        self.wait()
        # let Tantivy go now (its memory maps and threads), not when a garbage collection finds
        # the cycle through the finished thread's target
        self._worker = None
        self._index = self._schema = None

    # -- keeping in step --------------------------------------------------------------------------

    def _up_to_date(self, conn: Any) -> bool:
        """Whether the open sidecar holds every change of the index (applying a few if need be);
        starts a background catch-up or rebuild when it cannot be made so at once."""
        if self._worker is not None and self._worker.is_alive():
            return False
        self._worker = None
        self._reopen_if_replaced()
        if self._index is None and not self._open():
            self._start(self._rebuild)
            return False
        head = log_head(conn)
        seq = int(self._state["seq"])
        if self._state["index_id"] != _index_id(conn):
            self._start(self._rebuild)
            return False
        if seq == head:
            return True
        if seq > head:  # a log reset (the index was replaced): nothing to replay from
            self._start(self._rebuild)
            return False
        oldest = conn.execute("SELECT MIN(seq) FROM vector_changes").fetchone()[0]
        if oldest is None or oldest > seq + 1:
            self._start(self._rebuild)
            return False
        if head - seq > INLINE_CHANGES:
            self._start(self._catch_up)
            return False
        try:
            self._apply(conn, seq)
        except WriterBusy:
            return False  # another process updates it; FTS5 until its commit shows here
        except Exception:  # damaged beyond what the writer's clean-up mends: a new one
            log.warning("the keyword accelerator could not be updated; rebuilding it", exc_info=True)
            self._index = None
            self._start(self._rebuild)
            return False
        return int(self._state["seq"]) == head

    def _apply(self, conn: Any, seq: int) -> None:
        """Apply the logged changes after ``seq`` (one read transaction, one Tantivy commit)."""
        import tantivy

        conn.execute("BEGIN")
        try:
            head = log_head(conn)
            changed = sorted(
                {
                    row[0]
                    for row in conn.execute("SELECT chunk_id FROM vector_changes WHERE seq > ?", (seq,))
                    if row[0] != RESET
                }
            )
            writer = self._writer()
            try:
                for chunk_id in changed:
                    writer.delete_documents_by_term("chunk", chunk_id)
                for start in range(0, len(changed), _BATCH):
                    batch = changed[start : start + _BATCH]
                    rows = conn.execute(
                        "SELECT id, document_id, text, heading_path FROM chunks WHERE id IN "
                        f"({','.join('?' * len(batch))})",
                        batch,
                    )
                    for chunk_id, doc_id, text, headings in rows:
                        writer.add_document(
                            tantivy.Document(
                                chunk=chunk_id, doc=doc_id, text=text, headings=_headings(headings)
                            )
                        )
                writer.commit()
                writer.wait_merging_threads()
            finally:
                del writer  # releases the writer's lock for other processes
        finally:
            conn.execute("COMMIT")
        self._write_state(self.dir, {**self._state, "seq": head})
        self._index.reload()

    def _writer(self) -> Any:
        try:
            writer = self._index.writer(heap_size=WRITER_HEAP, num_threads=1)
        except ValueError as exc:
            if "lock" in str(exc).lower():
                raise WriterBusy(str(exc)) from None
            raise
        # files a killed writer left behind (not in any commit) would clash with this one's names
        writer.garbage_collect_files()
        return writer

    def _start(self, job: Any) -> None:
        if self._worker is None and not self._stopping.is_set():
            self._worker = threading.Thread(target=self._run, args=(job,), name="keyword-index", daemon=True)
            self._worker.start()

    def _run(self, job: Any) -> None:
        conn = self._connect()
        try:
            job(conn)
        except (WriterBusy, Stopped):
            pass
        except Exception:  # never needed for correctness: FTS5 answers meanwhile
            log.warning("the keyword accelerator could not be brought up to date", exc_info=True)
        finally:
            conn.close()

    def _catch_up(self, conn: Any) -> None:
        with self._lock:
            if self._index is not None and self._state is not None:
                self._apply(conn, int(self._state["seq"]))

    def _rebuild(self, conn: Any) -> None:
        """A new sidecar from every chunk (in one read transaction), renamed into place."""
        import tantivy

        began = time.perf_counter()
        self._remove_stale_builds()
        tmp = self.dir.with_name(f"{self.dir.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        schema = _schema()
        index = tantivy.Index(schema, path=str(tmp))
        writer = index.writer(heap_size=WRITER_HEAP * 4, num_threads=2)
        conn.execute("BEGIN")
        try:
            head, index_id = log_head(conn), _index_id(conn)
            rows = conn.execute("SELECT id, document_id, text, heading_path FROM chunks")
            count = 0
            for chunk_id, doc_id, text, headings in rows:
                writer.add_document(
                    tantivy.Document(chunk=chunk_id, doc=doc_id, text=text, headings=_headings(headings))
                )
                count += 1
                if count % STOP_CHECK_ROWS == 0 and self._stopping.is_set():
                    writer.rollback()
                    raise Stopped()
            writer.commit()
            writer.wait_merging_threads()
        except Stopped:
            writer = index = None  # dropped: Tantivy's files and lock are released before removal
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            conn.execute("COMMIT")
        writer = index = None
        self._write_state(tmp, {"format": FORMAT, "index_id": index_id, "seq": head, "chunks": count})
        with self._lock:
            old = self.dir.with_name(f"{self.dir.name}.old{os.getpid()}")
            if self.dir.exists():
                self.dir.rename(old)
            tmp.rename(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            self._index = None
            self._open()
        log.info("keyword accelerator built from %d chunks in %.1f s", count, time.perf_counter() - began)

    def _remove_stale_builds(self) -> None:
        for left in self.dir.parent.glob(f"{self.dir.name}.*"):
            for mark in (".tmp", ".old"):
                pid = left.name.rsplit(mark, 1)[1] if mark in left.name else ""
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(left, ignore_errors=True)

    # -- the folder ------------------------------------------------------------------------------

    def _open(self) -> bool:
        """Open the sidecar folder; False when there is none usable (then it is rebuilt)."""
        import tantivy

        state_file = self.dir / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if state.get("format") != FORMAT or not isinstance(state.get("seq"), int):
                return False
            schema = _schema()
            index = tantivy.Index(schema, path=str(self.dir), reuse=True)
            index.reload()
            self._state_mtime = state_file.stat().st_mtime
        except (OSError, ValueError) as exc:
            if self.dir.exists():
                log.info("the keyword accelerator's folder %s is not usable (%s); rebuilding", self.dir, exc)
            return False
        self._index, self._schema, self._state = index, schema, state
        return True

    def _reopen_if_replaced(self) -> None:
        """Another process rebuilt the folder or moved its position: follow it."""
        if self._index is None:
            return
        try:
            mtime = (self.dir / STATE_FILE).stat().st_mtime
        except OSError:
            self._index = None
            return
        if mtime != self._state_mtime:
            self._index = None
            self._open()

    def _write_state(self, folder: Path, state: dict[str, Any]) -> None:
        path = folder / STATE_FILE
        tmp = folder / f"{STATE_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, path)
        if folder == self.dir:
            self._state = state
            self._state_mtime = path.stat().st_mtime
