"""A fast in-process vector accelerator for the index, built from its rows and never needed for
correctness.

Why: sqlite-vec's ``vec0`` scans every float vector for each query (measured 79 ms at 100k chunks,
7x exact numpy; ~0.8 s at 1M), and its ``bit[N]`` KNN was no faster (53 ms at 200k). The choice,
measured with ``scripts/bench_vectors.py``:

1. Every vector, minus the mean vector of the index, becomes 384 sign bits (48 bytes). A query's
   Hamming distance to every row is six XOR + popcount passes over 64-bit words held column-wise
   (``np.bitwise_count``): ~10 ms at 1M rows on one core. A histogram of the distances picks the
   few thousand nearest rows without a sort.
2. Those candidates are rescored with an int16 copy of each unit-length vector, scaled per row
   (768 bytes a row: 768 MB at 1M): the cosine it gives is within ~1e-5 of the float32 one, so the
   order is the exact order but for near-ties. Reading the float vectors back from ``vec0`` was
   measured instead and rejected: a lookup by rowid costs ~0.4 ms (it walks the overflow pages of
   a 1.5 MB blob) and ``rowid IN (...)`` scans the whole table.

Filters arrive as the set of allowed document ids: the Hamming scan only looks at rows of those
documents (a document id per row), so they apply before ranking. When at most
``FULL_RESCORE_ROWS`` rows remain, all of them are rescored and the result is exact up to int16
rounding. Sign bits find the neighbours of a query that has near neighbours, as text embeddings
do (recall@10 0.99 at 100k with real questions); for a query with no near neighbour at all (a
random direction) they find little, which is one more reason small sets are rescored in full.

Keeping in step: SQLite stays the only source of truth. Triggers on ``chunks`` (migration 4) and
the store's vector writes append changed chunk ids to ``vector_changes`` in the same transaction
as the change, whichever process makes it. Before each search the accelerator compares the log's
head with its own position and applies the changes (or rebuilds when the log no longer reaches
back that far, or an embedder change reset the vectors). A cold build reads the vectors straight
from ``vec0``'s storage tables, streaming, checked against the virtual table on a sample of rows
(5 s at 1M on a quiet machine, 12-25 s on a busy one; through the virtual table it reads ~45 us a
row, ~45 s); any surprise there falls back to the virtual table. Memory at 1M: ~860 MB resident.

Sidecar: the arrays are saved beside the index (``index.db.vecbits``, mode 0600, written to a
temporary file and renamed, in a background thread) with the index's id, embedder, log position
and a CRC32, so a new process loads them (1.4-2.9 s at 1M) and replays the log from there. A sidecar that is corrupt,
of another index or embedder, or older than the log reaches back, is ignored and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".vecbits"
SIDECAR_MAGIC = b"LKVECBITS1\n"
CANDIDATES_MIN = 2048  # rows rescored with their int16 vectors at least
CANDIDATES_PER_K = 48  # ... and at least this many per neighbour asked for
FULL_RESCORE_ROWS = 8192  # this few rows (after filters) are all rescored: exact, ~3 ms
LEVELS = 32767  # int16 steps of the largest component of a unit vector
REBUILD_FRACTION = 0.25  # more logged changes than this share of the rows: rebuild instead
SIDECAR_MIN_ROWS = 5_000  # smaller indexes are searched exactly (store.ACCELERATE_FROM)
RESET = -1  # a logged chunk id meaning "every vector changed" (the embedder changed)
_STREAM_ROWS = 16_384
_DEAD_DISTANCE = np.uint16(0xFFFF)


def sidecar_path(db_path: Path | str) -> Path:
    return Path(f"{db_path}{SIDECAR_SUFFIX}")


class _Arrays:
    """The rows: per row its chunk id, document, sign-bit codes and int8 vector, in buffers with
    room to grow (``n`` rows are used; a deleted row keeps its place with document 0 until the
    next compaction)."""

    def __init__(self, ids: np.ndarray, docs: np.ndarray, codes: np.ndarray, v16: np.ndarray,
                 scale: np.ndarray, mean: np.ndarray) -> None:  # fmt: skip
        self.n = len(ids)
        self._ids, self._docs, self._codes, self._v16, self._scale = ids, docs, codes, v16, scale
        self.mean = mean  # float32 [dim]

    ids = property(lambda self: self._ids[: self.n])  # int64 [n]
    docs = property(lambda self: self._docs[: self.n])  # int64 [n], 0 for a deleted row
    codes = property(lambda self: self._codes[:, : self.n])  # uint64 [words, n], column-wise
    v16 = property(lambda self: self._v16[: self.n])  # int16 [n, dim], the unit vector / scale
    scale = property(lambda self: self._scale[: self.n])  # float32 [n]

    @property
    def dim(self) -> int:
        return self._v16.shape[1]

    def append(self, ids: np.ndarray, docs: np.ndarray, codes: np.ndarray, v16: np.ndarray,
               scale: np.ndarray) -> None:  # fmt: skip
        end = self.n + len(ids)
        if end > len(self._ids):
            room = max(end, int(len(self._ids) * 1.25) + 1024)
            self._ids = _grown(self._ids, room, self.n)
            self._docs = _grown(self._docs, room, self.n)
            self._v16 = _grown(self._v16, room, self.n)
            self._scale = _grown(self._scale, room, self.n)
            codes_buf = np.empty((self._codes.shape[0], room), dtype=np.uint64)
            codes_buf[:, : self.n] = self._codes[:, : self.n]
            self._codes = codes_buf
        self._ids[self.n : end], self._docs[self.n : end], self._v16[self.n : end] = ids, docs, v16
        self._scale[self.n : end], self._codes[:, self.n : end] = scale, codes
        self.n = end

    def compacted(self) -> _Arrays:
        live = self.docs != 0
        return _Arrays(self.ids[live], self.docs[live], np.ascontiguousarray(self.codes[:, live]),
                       self.v16[live], self.scale[live], self.mean)  # fmt: skip


def _grown(array: np.ndarray, room: int, used: int) -> np.ndarray:
    out = np.empty((room, *array.shape[1:]), dtype=array.dtype)
    out[:used] = array[:used]
    return out


def _encode(vectors: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 unit vectors, their per-row scale, sign bits of (unit - mean) as uint64 [words, m])."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scale = np.maximum(np.abs(unit).max(axis=1), 1e-12) / LEVELS
    bits = np.packbits(unit > mean, axis=1, bitorder="little")
    words = (vectors.shape[1] + 63) // 64
    if bits.shape[1] != words * 8:
        bits = np.pad(bits, ((0, 0), (0, words * 8 - bits.shape[1])))
    codes = np.ascontiguousarray(bits).view(np.uint64).T
    return np.rint(unit / scale[:, None]).astype(np.int16), scale.astype(np.float32), codes


def _query_code(query: np.ndarray, mean: np.ndarray, words: int) -> np.ndarray:
    bits = np.packbits(query > mean, bitorder="little")
    return np.pad(bits, (0, words * 8 - len(bits))).view(np.uint64)


def _batches_fast(conn: Any, dim: int, where: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rowids, float32 vectors) batches read from vec0's storage tables as sqlite-vec 0.1.x lays
    them out (1,024 vectors a blob, a validity bitmap, the rowids); ValueError on any surprise."""
    for size, validity, rowids, blob in conn.execute(
        # the vector blocks outside, each block's row found by its key, and no ORDER BY: the rows
        # stream (sorting them made SQLite hold every vector blob in memory: 1.7 GB more at 1M)
        "SELECT c.size, c.validity, c.rowids, v.vectors FROM chunk_vectors_vector_chunks00 v "
        f"CROSS JOIN chunk_vectors_chunks c ON c.chunk_id = v.rowid {where}"
    ):
        if len(rowids) != size * 8 or len(blob) != size * dim * 4 or len(validity) * 8 < size:
            raise ValueError("unexpected vec0 chunk layout")
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")[:size]
        valid = bits.astype(bool)
        yield (
            np.frombuffer(rowids, dtype=np.int64)[valid],
            np.frombuffer(blob, dtype=np.float32).reshape(size, dim)[valid],
        )


def _batches_public(conn: Any, dim: int, limit: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    cursor = conn.execute(f"SELECT rowid, embedding FROM chunk_vectors {limit}")
    while rows := cursor.fetchmany(_STREAM_ROWS):
        ids = np.asarray([row[0] for row in rows], dtype=np.int64)
        yield ids, np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), dim)


def _fill(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], total: int, dim: int, mean: np.ndarray
) -> _Arrays:
    """Encode streamed vectors into arrays made for ``total`` rows (the document ids come later)."""
    words = (dim + 63) // 64
    arrays = _Arrays(np.empty(total, np.int64), np.zeros(total, np.int64), np.empty((words, total), np.uint64),
                     np.empty((total, dim), np.int16), np.empty(total, np.float32), mean)  # fmt: skip
    arrays.n = 0
    for batch_ids, vectors in batches:
        if arrays.n + len(batch_ids) > total:
            raise ValueError("more vectors than counted")
        v16, scale, codes = _encode(vectors, mean)
        arrays.append(batch_ids, np.zeros(len(batch_ids), np.int64), codes, v16, scale)
    if arrays.n != total:
        raise ValueError(f"{arrays.n} vectors read, {total} counted")
    return arrays


def _sample_mean(batches: Iterator[tuple[np.ndarray, np.ndarray]], dim: int) -> np.ndarray:
    total, count = np.zeros(dim, dtype=np.float64), 0
    for _, vectors in batches:
        total += (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).sum(0)
        count += len(vectors)
    return (total / max(count, 1)).astype(np.float32)


def log_head(conn: Any) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'vector_changes'").fetchone()
    return int(row[0]) if row else 0


class VectorIndex:
    """The accelerator of one index file; thread-safe (one lock around sync and scan)."""

    def __init__(self, db_path: Path | str, *, use_sidecar: bool = True) -> None:
        self.db_path = Path(db_path)
        self.use_sidecar = use_sidecar
        self._lock = threading.Lock()
        self._arrays: _Arrays | None = None
        self._seq = -1
        self._identity: tuple[str, str, int] | None = None
        self.source = ""  # "sqlite", "sidecar" or "" before the first build
        self._saver: threading.Thread | None = None
        self.build_seconds = 0.0

    @property
    def rows(self) -> int:
        arrays = self._arrays
        return 0 if arrays is None else int(np.count_nonzero(arrays.docs))

    # -- keeping in step --------------------------------------------------------------------------

    def sync(self, conn: Any) -> None:
        """Bring the arrays up to the index's last committed change (in one read transaction)."""
        with self._lock:
            self._sync(conn)

    def _sync(self, conn: Any) -> None:
        head = log_head(conn)
        if self._arrays is not None and head == self._seq:
            return
        conn.execute("BEGIN")
        try:
            identity = _identity(conn)
            head = log_head(conn)
            if self._arrays is None or identity != self._identity or not self._apply_log(conn, head):
                self._build(conn, identity, head)
        finally:
            conn.execute("COMMIT")

    def _apply_log(self, conn: Any, head: int) -> bool:
        """Apply the logged changes after our position; False when a rebuild is needed instead."""
        oldest = conn.execute("SELECT MIN(seq) FROM vector_changes").fetchone()[0]
        if head < self._seq or oldest is None or oldest > self._seq + 1:
            return head == self._seq
        changed = {
            row[0] for row in conn.execute("SELECT chunk_id FROM vector_changes WHERE seq > ?", (self._seq,))
        }
        assert self._arrays is not None
        if RESET in changed or len(changed) > max(1000, REBUILD_FRACTION * len(self._arrays.ids)):
            return False
        self._arrays = _apply_changes(conn, self._arrays, sorted(changed))
        self._seq = head
        return True

    def _build(self, conn: Any, identity: tuple[str, str, int], head: int) -> None:
        began = time.perf_counter()
        self._identity = identity
        if self.use_sidecar and self._load_sidecar(conn, identity, head):
            self.build_seconds = time.perf_counter() - began
            return
        self._arrays = _arrays_from_rows(conn, identity[2])
        self._seq, self.source = head, "sqlite"
        self.build_seconds = time.perf_counter() - began
        log.info("vector accelerator built from %d rows in %.2f s", len(self._arrays.ids), self.build_seconds)
        if self.use_sidecar and len(self._arrays.ids) >= SIDECAR_MIN_ROWS:
            # in the background (~7 s for 830 MB at 1M on this disk): searches go on meanwhile; not a
            # daemon, so a one-shot command finishes the file before it exits
            self._saver = threading.Thread(target=self.save_sidecar, name="vecbits-save")
            self._saver.start()

    # -- the sidecar ------------------------------------------------------------------------------

    def wait(self) -> None:
        """Wait for a sidecar being saved in the background."""
        if self._saver is not None:
            self._saver.join()

    def save_sidecar(self) -> None:
        """Write the arrays beside the index (atomically); a failure only costs the next start time.

        It runs without the lock: a search that applies changes meanwhile may mark rows of the
        snapshot deleted. Then either the checksum no longer matches (the file is ignored later)
        or the file holds deletions newer than its log position, which replaying the log from
        there applies again: every chunk changed after that position is re-read."""
        arrays, identity, seq = self._arrays, self._identity, self._seq
        if arrays is None or identity is None:
            return
        target = sidecar_path(self.db_path)
        for old in target.parent.glob(f"{target.name}.tmp*"):  # left by a process that was killed
            pid = old.name.rsplit(".tmp", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                old.unlink(missing_ok=True)
        parts = [arrays.ids, arrays.docs, arrays.scale, arrays.mean, arrays.codes, arrays.v16]
        crc = 0
        for part in parts:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(part)).cast("B"), crc)
        header = json.dumps({
            "index_id": identity[0], "embed_model": identity[1], "dim": identity[2], "seq": seq,
            "rows": len(arrays.ids), "words": arrays.codes.shape[0], "crc32": crc,
        }).encode()  # fmt: skip
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(SIDECAR_MAGIC + struct.pack("<I", len(header)) + header)
                for part in parts:
                    out.write(memoryview(np.ascontiguousarray(part)).cast("B"))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            log.info("could not save the vector sidecar %s: %s", target, exc)
            tmp.unlink(missing_ok=True)

    def _load_sidecar(self, conn: Any, identity: tuple[str, str, int], head: int) -> bool:
        loaded = read_sidecar(sidecar_path(self.db_path), identity)
        if loaded is None:
            return False
        arrays, seq = loaded
        self._arrays, self._seq, self.source = arrays, seq, "sidecar"
        if seq == head or self._apply_log(conn, head):
            return True
        self._arrays, self._seq = None, -1
        log.info("the vector sidecar is older than the change log reaches back: rebuilding")
        return False

    # -- search -------------------------------------------------------------------------------------

    def search(
        self, conn: Any, query: np.ndarray, k: int, documents: set[int] | None
    ) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the ``k`` nearest rows, best first, after bringing the arrays up to
        date; only rows of ``documents`` when given."""
        with self._lock:
            self._sync(conn)
            arrays = self._arrays
            assert arrays is not None
            q = np.asarray(query, dtype=np.float32)
            q = q / max(float(np.linalg.norm(q)), 1e-12)
            rows = _allowed_rows(arrays, documents)
            want = max(CANDIDATES_MIN, CANDIDATES_PER_K * k)
            if rows is None and arrays.n <= max(want, FULL_RESCORE_ROWS):
                rows = np.flatnonzero(arrays.docs)
            if rows is None or len(rows) > max(want, FULL_RESCORE_ROWS):
                rows = _hamming_nearest(arrays, q, rows, want)
            if not len(rows) or k <= 0:
                return []
            scores = (arrays.v16[rows].astype(np.float32) @ q) * arrays.scale[rows]
            keep = min(len(rows), k)
            top = np.argpartition(-scores, keep - 1)[:keep]
            ids = arrays.ids[rows[top]]
            order = np.lexsort((ids, -scores[top]))
            return [(int(ids[i]), float(scores[top][i])) for i in order]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _identity(conn: Any) -> tuple[str, str, int]:
    meta = dict(
        conn.execute("SELECT key, value FROM meta WHERE key IN ('index_id', 'embed_model', 'embed_dim')")
    )
    return meta.get("index_id", ""), meta.get("embed_model", ""), int(meta.get("embed_dim") or 0)


def _arrays_from_rows(conn: Any, dim: int) -> _Arrays:
    """Every vector of the index, encoded in streaming batches (never all floats at once). The mean
    the sign bits are taken against comes from a sample of up to 16 evenly spread blocks of rows."""
    try:
        blocks = conn.execute("SELECT COUNT(*) FROM chunk_vectors_chunks").fetchone()[0]
        step = max(1, blocks // 16)
        mean = _sample_mean(_batches_fast(conn, dim, f"WHERE c.chunk_id % {step} = 0"), dim)
        total = conn.execute("SELECT COUNT(*) FROM chunk_vectors_rowids").fetchone()[0]
        arrays = _fill(_batches_fast(conn, dim), total, dim, mean)
        picks = np.linspace(0, arrays.n - 1, min(arrays.n, 16)).astype(int)
        for row in picks:  # the storage tables must say what the vector table says
            got = conn.execute("SELECT embedding FROM chunk_vectors WHERE rowid = ?", (int(arrays.ids[row]),))
            found = got.fetchone()
            v16, scale, _ = (
                _encode(np.frombuffer(found[0], dtype=np.float32)[None, :], mean) if found else (0, 0, 0)
            )
            if found is None or not np.array_equal(v16[0], arrays.v16[row]) or scale[0] != arrays.scale[row]:
                raise ValueError(f"vector {arrays.ids[row]} differs from the vector table")
    except Exception as exc:  # another sqlite-vec version: read through the virtual table (slower)
        log.info("vec0 storage tables not read directly (%s); reading through the vector table", exc)
        mean = _sample_mean(_batches_public(conn, dim, "LIMIT 16384"), dim)
        total = conn.execute("SELECT COUNT(*) FROM chunk_vectors").fetchone()[0]
        arrays = _fill(_batches_public(conn, dim), total, dim, mean)
    arrays.docs[:] = _documents_of(conn, arrays.ids)
    return arrays


def _documents_of(conn: Any, ids: np.ndarray) -> np.ndarray:
    """The document of each chunk id (0 for a chunk that is gone)."""
    cursor = conn.execute("SELECT id, document_id FROM chunks")  # from the (document, seq) index
    pairs = np.fromiter(cursor, dtype=np.dtype((np.int64, 2)))
    pairs = pairs[np.argsort(pairs[:, 0])] if len(pairs) else pairs.reshape(0, 2)
    docs = np.zeros(len(ids), dtype=np.int64)
    if len(pairs) and len(ids):
        at = np.minimum(np.searchsorted(pairs[:, 0], ids), len(pairs) - 1)
        hit = pairs[at, 0] == ids
        docs[hit] = pairs[at[hit], 1]
    return docs


def _apply_changes(conn: Any, arrays: _Arrays, changed: list[int]) -> _Arrays:
    """The arrays with these chunks re-read: rows of gone or changed chunks marked deleted, the
    chunks that have a vector now appended; compacted when deleted rows pile up."""
    if not changed:
        return arrays
    found = {}
    for rowid, doc_id, blob in conn.execute(
        "SELECT c.id, c.document_id, v.embedding FROM chunks c JOIN chunk_vectors v ON v.rowid = c.id "
        "WHERE c.id IN (SELECT value FROM json_each(?))",
        (json.dumps(changed),),
    ):
        found[rowid] = (doc_id, np.frombuffer(blob, dtype=np.float32))
    arrays.docs[np.isin(arrays.ids, np.asarray(changed, dtype=np.int64))] = 0
    if found:
        new_ids = np.asarray(sorted(found), dtype=np.int64)
        v16, scale, codes = _encode(np.stack([found[i][1] for i in new_ids]), arrays.mean)
        docs = np.asarray([found[i][0] for i in new_ids], dtype=np.int64)
        arrays.append(new_ids, docs, codes, v16, scale)
    if arrays.n > 1024 and np.count_nonzero(arrays.docs == 0) > arrays.n // 4:
        arrays = arrays.compacted()
    return arrays


def _allowed_rows(arrays: _Arrays, documents: set[int] | None) -> np.ndarray | None:
    """Row numbers of the allowed documents' chunks; None for every row."""
    if documents is None:
        return None
    wanted = np.fromiter((d for d in documents if d > 0), dtype=np.int64)
    if not len(wanted) or not len(arrays.docs):
        return np.empty(0, dtype=np.int64)
    top = int(max(wanted.max(), arrays.docs.max())) + 1
    table = np.zeros(top, dtype=bool)
    table[wanted] = True
    return np.flatnonzero(table[arrays.docs])


def _hamming_nearest(arrays: _Arrays, q: np.ndarray, rows: np.ndarray | None, want: int) -> np.ndarray:
    """Row numbers of (about) the ``want`` rows nearest ``q`` in Hamming distance of the codes."""
    words = arrays.codes.shape[0]
    code = _query_code(q, arrays.mean, words)
    codes = arrays.codes if rows is None else arrays.codes[:, rows]
    n = codes.shape[1]
    dist = np.zeros(n, dtype=np.uint16)
    scratch = np.empty(n, dtype=np.uint64)
    counts = np.empty(n, dtype=np.uint8)
    for word in range(words):
        np.bitwise_xor(codes[word], code[word], out=scratch)
        np.bitwise_count(scratch, out=counts)
        np.add(dist, counts, out=dist)
    if rows is None:
        dead = arrays.docs == 0
        if dead.any():
            dist[dead] = _DEAD_DISTANCE
    hist = np.cumsum(np.bincount(dist, minlength=words * 64 + 1)[: words * 64 + 1])
    limit = int(np.searchsorted(hist, want))
    picked = np.flatnonzero(dist <= limit)
    if len(picked) > 2 * want:  # a crowded distance at the limit: keep the nearest ``want``
        picked = picked[np.argpartition(dist[picked], want - 1)[:want]]
    return picked if rows is None else rows[picked]


def read_sidecar(path: Path, identity: tuple[str, str, int]) -> tuple[_Arrays, int] | None:
    """(arrays, log position) from a sidecar of this index and embedder, or None when it is
    missing, of another index, truncated or corrupt (a notice in the log says which)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(SIDECAR_MAGIC)) != SIDECAR_MAGIC:
                raise ValueError("not a vector sidecar")
            (size,) = struct.unpack("<I", handle.read(4))
            head = json.loads(handle.read(size))
            if (head["index_id"], head["embed_model"], head["dim"]) != identity:
                raise ValueError("made for another index or embedder")
            n, dim, words = int(head["rows"]), int(head["dim"]), int(head["words"])
            spec = [("ids", np.int64, (n,)), ("docs", np.int64, (n,)), ("scale", np.float32, (n,)),
                    ("mean", np.float32, (dim,)), ("codes", np.uint64, (words, n)), ("v16", np.int16, (n, dim))]  # fmt: skip
            parts: dict[str, np.ndarray] = {}
            crc = 0
            for name, dtype, shape in spec:
                count = int(np.prod(shape))
                part = np.fromfile(handle, dtype=dtype, count=count)
                if len(part) != count:
                    raise ValueError("truncated")
                crc = zlib.crc32(memoryview(part).cast("B"), crc)
                parts[name] = part.reshape(shape)
            if handle.read(1) or crc != head["crc32"]:
                raise ValueError("checksum mismatch")
        return _Arrays(**parts), int(head["seq"])  # type: ignore[arg-type]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        log.warning("ignoring the vector sidecar %s (%s); rebuilding it from the index", path, exc)
        return None
