"""The in-process vector accelerator (server/vector_index.py) against exact search over the same
rows: equal top-10 on random and clustered vectors, filters applied before ranking, writes of this
and of other processes seen by the next search, sidecars that are stale, corrupt or of another
index ignored, and a kill in the middle of writing leaving nothing that disagrees with the rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lorekeeper.server import store as store_module
from lorekeeper.server import vector_index
from lorekeeper.server.chunker import Chunk
from lorekeeper.server.store import Store
from lorekeeper.server.vector_index import sidecar_path

DIM = 384
MODEL = "test-model"
PER_DOC = 20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _vectors(n: int, seed: int) -> np.ndarray:
    """Half plain Gaussian directions, half tight clusters around 40 centres (near-ties in plenty)."""
    rng = np.random.default_rng(seed)
    plain = rng.standard_normal((n // 2, DIM))
    centres = rng.standard_normal((40, DIM))
    clustered = centres[rng.integers(0, 40, n - n // 2)] + 0.3 * rng.standard_normal((n - n // 2, DIM))
    mixed = np.concatenate([plain, clustered])
    return _unit(mixed[rng.permutation(n)] + 0.2)  # an offset, as real embeddings have


def _put(store: Store, root_id: int, name: str, vectors: np.ndarray) -> int:
    chunks = [
        Chunk(text=f"{name} part {i}", char_start=0, char_end=1, chunk_hash=f"{name}-{i}")
        for i in range(len(vectors))
    ]
    return store.replace_document(
        path=f"/docs/{name}", root_id=root_id, size=1, mtime=time.time(), content_hash=name, loader="test:1",
        chunks=chunks, vectors=vectors, model_id=MODEL,
    )  # fmt: skip


def _fill(db: Path, vectors: np.ndarray, accelerate: bool | None = True) -> Store:
    store = Store(db, vector_index=accelerate)
    root = store.add_root("/docs")
    store.ensure_embedder(MODEL, DIM)
    for start in range(0, len(vectors), PER_DOC):
        _put(store, root.id, f"doc{start // PER_DOC:05d}", vectors[start : start + PER_DOC])
    return store


def _rows(store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chunk ids, float64 vectors, document ids) of every vector, read back through the vector table."""
    rows = (
        store._read()
        .execute(
            "SELECT v.rowid, v.embedding, c.document_id FROM chunk_vectors v JOIN chunks c ON c.id = v.rowid"
        )
        .fetchall()
    )
    matrix = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]).astype(np.float64)
    return np.asarray([r[0] for r in rows]), matrix, np.asarray([r[2] for r in rows])


def _exact(store: Store | tuple, query: np.ndarray, k: int, documents: set[int] | None = None) -> list[int]:
    """Exact top-k by cosine (float64) over every vector of the index, ties by id."""
    ids, matrix, docs = _rows(store) if isinstance(store, Store) else store
    if documents is not None:
        keep = np.isin(docs, list(documents))
        ids, matrix = ids[keep], matrix[keep]
    scores = matrix @ query.astype(np.float64) / np.linalg.norm(matrix, axis=1) / np.linalg.norm(query)
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def _ids(rows: list[tuple[int, float]]) -> list[int]:
    return [chunk_id for chunk_id, _ in rows]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    db = tmp_path_factory.mktemp("vectors") / "index.db"
    vectors = _vectors(6000, seed=1)
    _fill(db, vectors, accelerate=False).close()
    return db, vectors


def test_top10_equals_exact_search_on_random_and_clustered_vectors(filled) -> None:
    db, vectors = filled
    rng = np.random.default_rng(2)
    queries = np.concatenate([_unit(rng.standard_normal((15, DIM)) + 0.2), _unit(vectors[rng.integers(0, 6000, 15)] + 0.05 * rng.standard_normal((15, DIM)))])  # fmt: skip
    with Store(db, vector_index=True) as fast, Store(db, vector_index=False) as slow:
        rows = _rows(fast)
        for query in queries:
            found = fast.vector_search(query, 10)
            assert _ids(found) == _exact(rows, query, 10)
            reference = dict(slow.vector_search(query, 10))  # sqlite-vec's own exact scan
            for chunk_id, score in found:
                assert score == pytest.approx(reference[chunk_id], abs=1e-4)
        assert fast._accelerator is not None and fast._accelerator.rows == 6000


def test_sign_bit_candidates_find_near_neighbours(filled, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate step itself, made to pick 400 of 6000 rows (as it picks ~2,000 of a million):
    for queries with near neighbours (as embeddings have) recall@10 against exact stays >= 0.95."""
    db, vectors = filled
    monkeypatch.setattr(vector_index, "FULL_RESCORE_ROWS", 0)
    monkeypatch.setattr(vector_index, "CANDIDATES_MIN", 400)
    monkeypatch.setattr(vector_index, "CANDIDATES_PER_K", 1)
    rng = np.random.default_rng(20)
    near = vectors @ vectors[:300].T  # queries among the first rows whose 10th neighbour is close
    picks = np.flatnonzero(np.sort(near, axis=0)[-11] > 0.5)[:30]
    queries = _unit(vectors[picks] + 0.3 / np.sqrt(DIM) * rng.standard_normal((len(picks), DIM)))
    assert len(queries) >= 20
    with Store(db, vector_index=True) as fast:
        rows = _rows(fast)
        recall = [len(set(_ids(fast.vector_search(q, 10))) & set(_exact(rows, q, 10))) / 10 for q in queries]
        many = set(sorted(doc for doc, _ in fast.filter_documents())[::2])  # the filtered scan
        for q in queries[:10]:
            found = _ids(fast.vector_search(q, 10, many))
            exact = _exact(rows, q, 10, many)
            recall.append(len(set(found) & set(exact)) / 10)
    assert np.mean(recall) >= 0.95, recall


def test_filters_apply_before_ranking_even_far_from_the_query(filled) -> None:
    db, vectors = filled
    with Store(db, vector_index=True) as fast:
        docs = sorted(doc for doc, _ in fast.filter_documents())
        query = vectors[7]
        nearest = set(_ids(fast.vector_search(query, 200)))
        chunk_docs = dict(fast._read().execute("SELECT id, document_id FROM chunks").fetchall())
        # a few documents none of whose chunks are among the query's 200 global neighbours
        far = {d for d in docs if not any(chunk_docs[c] == d for c in nearest)}
        few = set(sorted(far)[:5])
        found = fast.vector_search(query, 10, few)
        assert found and {chunk_docs[c] for c in _ids(found)} <= few
        assert _ids(found) == _exact(fast, query, 10, few)
        many = set(docs[: int(len(docs) * 0.7)])  # more rows than are rescored: the filtered scan
        assert _ids(fast.vector_search(query, 10, many)) == _exact(fast, query, 10, many)
        assert fast.vector_search(query, 10, {10**9}) == []


def test_writes_are_seen_by_the_next_search(tmp_path: Path) -> None:
    store = _fill(tmp_path / "index.db", _vectors(3000, seed=3))
    root = store.roots()[0]
    query = _unit(np.random.default_rng(4).standard_normal(DIM))
    before = store.vector_search(query, 10)
    assert _ids(before) == _exact(store, query, 10)
    near = _unit(query + 0.05 * np.random.default_rng(5).standard_normal((3, DIM)))
    doc = _put(store, root.id, "doc00003", near)  # replace a document with chunks next to the query
    found = store.vector_search(query, 10)
    new_ids = {c.id for c in store.document_chunks("/docs/doc00003")}
    assert set(_ids(found)[:3]) == new_ids and _ids(found) == _exact(store, query, 10)
    assert store.move_document("/docs/doc00003", "/docs/moved", root.id)
    moved = {doc_id for doc_id, path in store.filter_documents() if path == "/docs/moved"}
    assert moved == {doc} and set(_ids(store.vector_search(query, 3, moved))) == new_ids
    assert store.delete_document("/docs/moved")
    after = store.vector_search(query, 10)
    assert not set(_ids(after)) & new_ids and _ids(after) == _exact(store, query, 10)
    assert store.ensure_embedder("another-model", DIM)  # every vector goes: nothing to find
    assert store.vector_search(query, 10) == []
    chunks = store.document_chunks("/docs/doc00001")
    store.set_vectors(
        "another-model", [(c.id, c.chunk_hash, v) for c, v in zip(chunks, near[:1].repeat(len(chunks), 0))]
    )
    assert set(_ids(store.vector_search(query, 50))) == {c.id for c in chunks}
    store.close()


def test_another_process_writing_is_seen(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    store = _fill(db, _vectors(2000, seed=6))
    query = _unit(np.random.default_rng(7).standard_normal(DIM))
    assert _ids(store.vector_search(query, 10)) == _exact(store, query, 10)  # the accelerator is built
    np.save(tmp_path / "near.npy", _unit(query + 0.01 * np.random.default_rng(8).standard_normal((2, DIM))))
    code = f"""
        import numpy as np
        from lorekeeper.server.chunker import Chunk
        from lorekeeper.server.store import Store
        store = Store({str(db)!r}, vector_index=False)
        near = np.load({str(tmp_path / "near.npy")!r})
        store.replace_document(path="/docs/elsewhere", root_id=store.roots()[0].id, size=1, mtime=1.0,
            content_hash="x", loader="test:1", chunks=[Chunk(text=f"t{{i}}", char_start=0, char_end=1)
            for i in range(2)], vectors=near, model_id="{MODEL}")
        store.delete_document("/docs/doc00000")
        store.close()
        """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)
    found = _ids(store.vector_search(query, 10))
    assert set(found[:2]) == {c.id for c in store.document_chunks("/docs/elsewhere")}
    assert found == _exact(store, query, 10)
    store.close()


@pytest.fixture
def small_sidecars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vector_index, "SIDECAR_MIN_ROWS", 0)


def _fresh_search(db: Path, query: np.ndarray) -> tuple[str, list[int], list[int]]:
    with Store(db, vector_index=True) as store:
        found = _ids(store.vector_search(query, 10))
        return store._accelerator.source, found, _exact(store, query, 10)


def test_sidecar_is_used_replayed_and_ignored_when_bad(tmp_path: Path, small_sidecars, monkeypatch) -> None:
    db = tmp_path / "index.db"
    query = _unit(np.random.default_rng(9).standard_normal(DIM))
    store = _fill(db, _vectors(3000, seed=10))
    store.vector_search(query, 10)
    store.close()
    side = sidecar_path(db)
    assert side.is_file() and (side.stat().st_mode & 0o777) == 0o600
    source, found, exact = _fresh_search(db, query)
    assert source == "sidecar" and found == exact
    with Store(db, vector_index=False) as writer:  # changes after the sidecar: replayed from the log
        _put(writer, writer.roots()[0].id, "doc00002", _unit(query + 0.02 * np.ones((4, DIM))))
    source, found, exact = _fresh_search(db, query)
    assert source == "sidecar" and found == exact
    monkeypatch.setattr(store_module, "CHANGE_LOG_KEEP", 1)  # the log no longer reaches back
    with Store(db, vector_index=False) as writer:
        _put(writer, writer.roots()[0].id, "doc00004", _unit(query + 0.03 * np.ones((5, DIM))))
    source, found, exact = _fresh_search(db, query)
    assert source == "sqlite" and found == exact
    good = side.read_bytes()
    for bad in (good[: len(good) // 2], good[:-3000] + bytes(3000), b"junk" + good[4:]):
        side.write_bytes(bad)
        source, found, exact = _fresh_search(db, query)
        assert source == "sqlite" and found == exact
    other = tmp_path / "other.db"  # a sidecar of another index is not used for this one
    _fill(other, _vectors(2500, seed=11)).close()
    sidecar_path(other).write_bytes(side.read_bytes())
    source, found, exact = _fresh_search(other, query)
    assert source == "sqlite" and found == exact


WRITER = """
import sys, numpy as np
from lorekeeper.server import vector_index
from lorekeeper.server.chunker import Chunk
from lorekeeper.server.store import Store
vector_index.SIDECAR_MIN_ROWS = 0
store = Store(sys.argv[1], vector_index=True)
root, rng = store.roots()[0], np.random.default_rng(int(sys.argv[2]))
for step in range(100000):
    name = f"doc{int(rng.integers(0, 150)):05d}"
    vectors = rng.standard_normal((int(rng.integers(1, 30)), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.replace_document(path=f"/docs/{name}", root_id=root.id, size=1, mtime=1.0, content_hash=str(step),
        loader="test:1", chunks=[Chunk(text=f"{step} {i}", char_start=0, char_end=1) for i in range(len(vectors))],
        vectors=vectors, model_id="test-model")
    if step % 3 == 0:
        store.delete_document(f"/docs/doc{int(rng.integers(0, 150)):05d}")
    store.vector_search(vectors[0], 10)
    store._accelerator.save_sidecar()
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_kill_while_writing_the_index_and_sidecar_leaves_search_exact(
    tmp_path: Path, small_sidecars
) -> None:
    db = tmp_path / "index.db"
    _fill(db, _vectors(3000, seed=12)).close()
    rng = np.random.default_rng(13)
    for trial in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(trial)], stdout=subprocess.PIPE, text=True
        )
        steps = 0
        wanted = int(rng.integers(3, 15))
        while steps < wanted and child.stdout.readline():
            steps += 1
        time.sleep(float(rng.uniform(0, 0.3)))  # somewhere inside a write or a sidecar save
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert steps == wanted, "the writer stopped before it was killed"
        for query in _unit(rng.standard_normal((5, DIM))):
            source, found, exact = _fresh_search(db, query)
            assert found == exact, (trial, source)
        with Store(db) as store:
            assert store.check_integrity() == []
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert all(json.dumps(name) for name in leftovers)  # temporary sidecars only ever sit beside it


def test_storage_table_read_equals_the_vector_table_read(filled) -> None:
    """The cold build reads vec0's storage tables directly; what it reads must be what the virtual
    table says, row for row (else the build falls back to the virtual table)."""
    db, _ = filled
    with Store(db, vector_index=False) as store:
        conn = store._read()
        fast = list(vector_index._batches_fast(conn, DIM))
        public = list(vector_index._batches_public(conn, DIM))
    fast_ids, public_ids = np.concatenate([b[0] for b in fast]), np.concatenate([b[0] for b in public])
    fast_vecs, public_vecs = np.concatenate([b[1] for b in fast]), np.concatenate([b[1] for b in public])
    assert len(fast_ids) == len(public_ids) == 6000
    assert np.array_equal(fast_vecs[np.argsort(fast_ids)], public_vecs[np.argsort(public_ids)])


def test_a_failing_accelerator_falls_back_to_the_exact_scan(filled, monkeypatch, caplog) -> None:
    db, vectors = filled

    def broken(*args, **kwargs):
        raise MemoryError("no room for the arrays")

    query = vectors[11]
    with Store(db, vector_index=True) as store:
        exact = _exact(store, query, 10)
        monkeypatch.setattr(vector_index.VectorIndex, "search", broken)
        assert _ids(store.vector_search(query, 10)) == exact
        assert "the vector accelerator failed" in caplog.text
        monkeypatch.undo()
        assert _ids(store.vector_search(query, 10)) == exact and store._accelerator is None  # waits
        monkeypatch.setattr(store_module, "ACCELERATOR_RETRY_S", 0.0)
        assert _ids(store.vector_search(query, 10)) == exact and store._accelerator is not None
