"""Vector search benchmark at 10k, 100k and 1M chunks: the in-process vector accelerator
(``server/vector_index.py``) against exact numpy search over the same vectors, in the same run.

For each size it reports p50/p95 of ``search()`` in vector, keyword and hybrid mode, of the raw
``Store.vector_search`` call, of exact numpy search (``X @ q`` then top-k, one BLAS thread) and, at
the sizes where it is bearable, of the exact sqlite-vec ``vec0`` scan the store used before;
recall@10 of the accelerator (and of hybrid's vector list) against exact search; the
accelerator's build time cold from SQLite and from its sidecar file; and the resident memory of
the searching process.

How the index is made (say so with the figures): embedding a million chunks would take days here,
so each index is written in bulk straight into the schema the store creates (documents of 20
chunks, one ``executemany`` per table per 20,000 chunks, keywords into FTS5 as the store writes
them). The texts are real: the Python standard library's sources cut into ~800-character pieces at
line ends, reused in turn when they run out. The vectors are perturbations of real ones: a few
thousand of those pieces are embedded with the real MiniLM model, and each stored vector is a
random real vector plus 0.35 of another plus Gaussian noise of norm ~0.35, re-normalised (the
recipe of ``bench_index.py``; it keeps the real vectors' anisotropy and cluster structure).
Queries: the 40 questions of ``bench_index.py`` embedded with the real model, plus as many
perturbed real vectors (vector figures over all 80; keyword and hybrid over the 40 questions,
whose words are real keyword queries).

Searches run in a child process per index (one cold, where the accelerator is built from the
rows, and one warm from its sidecar), so the resident memory reported is the searching process's
own and the exact-numpy matrix of the parent is not counted in it.

Run ``nice -n 10 python scripts/bench_vectors.py`` (all three sizes: about 20 minutes the first
time, which embeds the real pieces (~10 minutes) and writes the indexes (the 1M one in ~4.5
minutes), kept in ``--workdir``; about 5 minutes after that) or ``--sizes 10000 100000``;
``--json OUT`` writes every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import QUERIES, SYNTH_MIX  # noqa: E402
from bench_index import _synthesise as synthesise  # noqa: E402

log = logging.getLogger("bench_vectors")

K = 10
CHUNKS_PER_DOC = 20
BATCH = 20_000
REAL_VECTORS = 3000
PIECE_CHARS = 800
MODES = ("vector", "keyword", "hybrid")


# -- the corpus --------------------------------------------------------------------------------


def real_pieces(limit: int | None = None):
    """~800-character pieces of the standard library's sources, cut at line ends, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield "".join(piece)
                count += 1
                if limit is not None and count >= limit:
                    return
                piece, size = [], 0


def real_vectors(workdir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(real piece vectors, query vectors, model id), embedded once and kept in the work folder."""
    cache = workdir / "real_vectors.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["real"], data["queries"], str(data["model"])
    from lorekeeper import plugins

    embedder = plugins.get_embedder()
    texts = list(real_pieces(REAL_VECTORS))
    began = time.perf_counter()
    real = np.asarray(embedder.embed(texts), dtype=np.float32)
    log.info("embedded %d real pieces in %.0f s", len(texts), time.perf_counter() - began)
    asked = np.stack([np.asarray(embedder.embed_query(q), dtype=np.float32) for q in QUERIES])
    rng = np.random.default_rng(7)
    perturbed = synthesise(real, len(QUERIES), rng)
    queries = np.concatenate([asked, perturbed])
    np.savez(cache, real=real, queries=queries, model=np.asarray(embedder.model_id))
    return real, queries, embedder.model_id


def build_index(path: Path, size: int, real: np.ndarray, model_id: str, seed: int) -> float:
    """Write ``size`` chunks in bulk into a fresh index at ``path``; return the seconds it took."""
    from lorekeeper.server.store import Store, vector_blob

    began = time.perf_counter()
    tmp = path.with_suffix(".building")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    with Store.open(tmp) as store:
        root = store.add_root(path.parent / "corpus")
        store.ensure_embedder(model_id, real.shape[1])
        conn = store._writer
        pieces = real_pieces()
        chunk_id = 0
        while chunk_id < size:
            n = min(BATCH, size - chunk_id)
            vectors = synthesise(real, n, rng)
            texts = []
            for _ in range(n):
                piece = next(pieces, None)
                if piece is None:
                    pieces = real_pieces()
                    piece = next(pieces)
                texts.append(piece)
            ids = range(chunk_id + 1, chunk_id + n + 1)
            docs = sorted({(cid - 1) // CHUNKS_PER_DOC + 1 for cid in ids})
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO documents(id, root_id, path, size, mtime, content_hash, loader, status, "
                "chunk_count, indexed_at) VALUES (?, ?, ?, 0, ?, ?, 'bench:1', 'indexed', ?, ?)",
                [
                    (d, root.id, f"{root.path}/doc{d:07d}.py", time.time() - d, f"h{d}", CHUNKS_PER_DOC,
                     time.time())
                    for d in docs
                ],
            )  # fmt: skip
            conn.executemany(
                "INSERT INTO chunks(id, document_id, seq, text, char_start, char_end, heading_path, chunk_hash) "
                "VALUES (?, ?, ?, ?, 0, ?, '[]', ?)",
                [
                    (cid, (cid - 1) // CHUNKS_PER_DOC + 1, (cid - 1) % CHUNKS_PER_DOC, text, len(text), f"c{cid}")
                    for cid, text in zip(ids, texts)
                ],
            )  # fmt: skip
            conn.executemany(
                "INSERT INTO chunks_fts(rowid, text, headings) VALUES (?, ?, '')", list(zip(ids, texts))
            )
            conn.executemany(
                "INSERT INTO chunk_vectors(rowid, embedding) VALUES (?, ?)",
                [(cid, vector_blob(v)) for cid, v in zip(ids, vectors)],
            )
            conn.execute("COMMIT")
            chunk_id += n
            if chunk_id % 100_000 == 0:
                log.info("  %d chunks written (%.0f s)", chunk_id, time.perf_counter() - began)
        store.set_meta("bench_chunks", str(size))
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    os.replace(tmp, path)
    return time.perf_counter() - began


# -- exact baseline (parent process) -------------------------------------------------------------


def load_matrix(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids, float32 vectors) of every chunk, read in streaming batches into one array."""
    from lorekeeper.server.store import connect

    conn = connect(path)
    try:
        total = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        dim = int(conn.execute("SELECT value FROM meta WHERE key = 'embed_dim'").fetchone()[0])
        ids = np.empty(total, dtype=np.int64)
        matrix = np.empty((total, dim), dtype=np.float32)
        row = 0
        for rowid, blob in conn.execute("SELECT rowid, embedding FROM chunk_vectors ORDER BY rowid"):
            ids[row] = rowid
            matrix[row] = np.frombuffer(blob, dtype=np.float32)
            row += 1
        return ids[:row], matrix[:row]
    finally:
        conn.close()


def exact_baseline(path: Path, queries: np.ndarray, rounds: int) -> tuple[dict, list[list[int]]]:
    """p50/p95 of exact numpy top-k, and each query's exact top-10 chunk ids."""
    try:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        limit = None
    ids, matrix = load_matrix(path)
    fetch = max(K * 4, 20)
    times, truth = [], []
    for round_ in range(rounds + 1):
        for q in queries:
            began = time.perf_counter()
            scores = matrix @ q
            top = np.argpartition(scores, -fetch)[-fetch:]
            order = top[np.argsort(-scores[top])]
            took = time.perf_counter() - began
            if round_:
                times.append(took)
            else:
                truth.append(ids[order[:K]].tolist())
    del matrix
    if limit is not None:
        limit.unregister() if hasattr(limit, "unregister") else None
    return summary(times), truth


def summary(times: list[float]) -> dict:
    arr = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)), "n": len(times)}


# -- the searching process --------------------------------------------------------------------------


class FixedQueries:
    """An embedder stand-in that hands ``search`` query vectors embedded beforehand."""

    def __init__(self, model_id: str, vectors: dict[str, np.ndarray]) -> None:
        self.model_id, self.vectors, self.dimension = model_id, vectors, 384

    def embed_query(self, text: str) -> np.ndarray:
        return self.vectors[text]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB. The peak is VmHWM, not ru_maxrss: a
    child's ru_maxrss starts from its parent's size at the fork (this parent holds the exact matrix)."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def child(db: Path, queries_file: Path, rounds: int, exact_vec0: int) -> dict:
    """Open the index as a search process would, time the accelerator's build and the searches."""
    from lorekeeper.server.search import search
    from lorekeeper.server.store import Store

    data = np.load(queries_file)
    qvecs, texts = data["queries"], [str(t) for t in data["texts"]]
    store = Store.open(db, create=False)
    out: dict = {"rss_open_mb": rss_mb()[0]}
    began = time.perf_counter()
    accel = store.vector_index_ready()
    out["build_s"] = time.perf_counter() - began
    out["build_source"] = accel.source if accel else None
    began = time.perf_counter()
    if accel is not None:
        accel.wait()  # the sidecar is saved in the background: keep it out of the search timings
    out["sidecar_save_wait_s"] = time.perf_counter() - began
    began = time.perf_counter()
    keywords = store.keyword_index_ready()  # Tantivy from KEYWORD_ACCELERATE_FROM chunks
    out["keyword_build_s"] = time.perf_counter() - began
    out["keyword_accelerator"] = keywords is not None
    out["rss_after_build_mb"], out["rss_peak_after_build_mb"] = rss_mb()
    if rounds == 0:  # only the build was asked for (the run from the sidecar)
        store.close()
        return out
    embedder = FixedQueries(store.embed_model, dict(zip(texts, qvecs)))
    fetch = max(K * 4, 20)
    times: dict[str, list[float]] = {m: [] for m in (*MODES, "vector_search")}
    found: dict[str, list[list[int]]] = {"vector": [], "vector_search": [], "keyword": [], "hybrid": []}
    for round_ in range(rounds + 1):
        for number, (text, q) in enumerate(zip(texts, qvecs)):
            for mode in MODES:
                if mode != "vector" and number >= len(QUERIES):
                    continue  # the perturbed vectors' stand-in texts are no real keyword query
                began = time.perf_counter()
                hits = search(store, embedder, text, k=K, mode=mode)
                took = time.perf_counter() - began
                if round_:
                    times[mode].append(took)
                else:
                    found[mode].append([h.chunk_id for h in hits])
            began = time.perf_counter()
            rows = store.vector_search(q, fetch)
            took = time.perf_counter() - began
            if round_:
                times["vector_search"].append(took)
            else:
                found["vector_search"].append([cid for cid, _ in rows[:K]])
    out["times"] = {name: summary(values) for name, values in times.items()}
    out["found"] = found
    # the search process's memory: taken here, before the comparisons below open more stores
    out["rss_end_mb"], out["rss_peak_mb"] = rss_mb()
    if keywords is not None:  # FTS5 alone on the same index and queries, for the ratio
        fts5 = Store.open(db, create=False, keyword_index=False)
        fts5_times: dict[str, list[float]] = {"keyword": [], "hybrid": []}
        for round_ in range(rounds + 1):
            for text in texts[: len(QUERIES)]:
                for mode in fts5_times:
                    began = time.perf_counter()
                    search(fts5, embedder, text, k=K, mode=mode)
                    if round_:
                        fts5_times[mode].append(time.perf_counter() - began)
        fts5.close()
        for mode, values in fts5_times.items():
            out["times"][f"{mode}_fts5"] = summary(values)
    out["exact_text"] = exact_text_modes(db, embedder, texts[: len(QUERIES)])
    # The big indexes reuse each text many times, so FTS5 and Tantivy can pick different copies of
    # one text among equal scores: also count a hit as shared when FTS5's top 10 has its text.
    out["text_recall"] = {}
    for mode in ("keyword", "hybrid"):
        ids = sorted({cid for rows in (*found[mode], *out["exact_text"][mode]) for cid in rows})
        text = {cid: hit.text for cid, hit in store.chunk_hits(ids).items()}
        shares = []
        for mine, truth in zip(found[mode], out["exact_text"][mode]):
            wanted = {text.get(cid) for cid in truth}
            shares.append(sum(text.get(cid) in wanted for cid in mine) / max(1, len(mine)))
        out["text_recall"][mode] = float(np.mean(shares)) if shares else 0.0
    if accel is None:  # a small index searches exactly: time the accelerator forced on, to compare
        forced = Store.open(db, create=False, vector_index=True)
        began = time.perf_counter()
        forced.vector_index_ready()
        out["forced_build_s"] = time.perf_counter() - began
        took = []
        for q in list(qvecs) * (rounds + 1):
            began = time.perf_counter()
            forced.vector_search(q, fetch)
            took.append(time.perf_counter() - began)
        out["times"]["vector_search_accelerator_forced"] = summary(took[len(qvecs) :])
        forced.close()
    if exact_vec0:
        slow = Store.open(db, create=False, vector_index=False)
        vec0 = []
        for q in qvecs[:exact_vec0]:
            began = time.perf_counter()
            slow.vector_search(q, fetch)
            vec0.append(time.perf_counter() - began)
        out["times"]["vec0_exact"] = summary(vec0)
        slow.close()
    store.close()
    return out


def exact_text_modes(db: Path, embedder: FixedQueries, texts: list[str]) -> dict[str, list[list[int]]]:
    """Keyword and hybrid top-10 with sqlite-vec's exact vector scan and FTS5's full keyword
    ranking, for recall@10 of what ``search`` returned (for keywords above the keyword
    accelerator's threshold: how much of FTS5's top 10 Tantivy's BM25 keeps)."""
    from lorekeeper.server.search import search
    from lorekeeper.server.store import Store

    exact = Store.open(db, create=False, vector_index=False, keyword_index=False)
    try:
        return {
            mode: [[h.chunk_id for h in search(exact, embedder, t, k=K, mode=mode)] for t in texts]
            for mode in ("keyword", "hybrid")
        }
    finally:
        exact.close()


def run_child(db: Path, queries_file: Path, rounds: int, exact_vec0: int) -> dict:
    out_file = db.with_suffix(".child.json")
    cmd = [sys.executable, __file__, "--child", str(db), "--queries-file", str(queries_file),
           "--rounds", str(rounds), "--exact-vec0", str(exact_vec0), "--json", str(out_file)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(out_file.read_text(encoding="utf-8"))


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# -- one size, and the report ------------------------------------------------------------------------


def bench_size(size: int, args: argparse.Namespace, real: np.ndarray, qfile: Path, model_id: str) -> dict:
    import shutil

    from lorekeeper.server.keyword_index import sidecar_dir
    from lorekeeper.server.vector_index import sidecar_path

    db = args.workdir / f"vectors-{size}.db"
    out: dict = {"chunks": size}
    if not db.is_file():
        log.info("writing a %d-chunk index in bulk", size)
        out["index_write_s"] = build_index(db, size, real, model_id, seed=size)
    queries = np.load(qfile)["queries"]
    numpy_times, truth = exact_baseline(db, queries, args.rounds)
    out["numpy_exact"] = numpy_times
    exact_vec0 = len(queries) if size <= 100_000 else 5
    sidecar_path(db).unlink(missing_ok=True)
    shutil.rmtree(sidecar_dir(db), ignore_errors=True)
    cold = run_child(db, qfile, args.rounds, exact_vec0)
    warm = run_child(db, qfile, 0, 0)
    out["keyword_build_s"], out["warm_keyword_open_s"] = cold["keyword_build_s"], warm["keyword_build_s"]
    if sidecar_dir(db).is_dir():
        out["keyword_sidecar_mb"] = sum(f.stat().st_size for f in sidecar_dir(db).iterdir()) / 2**20
    out["cold"], out["warm_build_s"], out["warm_build_source"] = cold, warm["build_s"], warm["build_source"]
    out["warm_rss_after_build_mb"] = warm["rss_after_build_mb"]
    out["recall_vector_search"] = recall(cold["found"]["vector_search"], truth)
    out["recall_search_vector_mode"] = recall(cold["found"]["vector"], truth)
    for mode in ("keyword", "hybrid"):  # against the same modes with exact vectors
        out[f"recall_{mode}"] = recall(cold["found"][mode], cold["exact_text"][mode])
        out[f"recall_{mode}_by_text"] = cold["text_recall"][mode]
    del cold["exact_text"]
    del cold["found"]
    return out


def render(result: dict) -> str:
    lines = [f"Vector search benchmark ({result['command']})", ""]
    head = f"{'chunks':>9} {'mode':<34}{'p50 ms':>9}{'p95 ms':>9}{'p50 x numpy':>13}"
    lines.append(head)
    for fig in result["sizes"]:
        base = fig["numpy_exact"]["p50_ms"]
        rows = [("numpy exact X @ q", fig["numpy_exact"])]
        names = ("vector_search", "vector_search_accelerator_forced", *MODES, "keyword_fts5", "hybrid_fts5",
                 "vec0_exact")  # fmt: skip
        rows += [(f"{name}", fig["cold"]["times"][name]) for name in names
                 if name in fig["cold"]["times"]]  # fmt: skip
        for name, t in rows:
            lines.append(
                f"{fig['chunks']:>9} {name:<24}{t['p50_ms']:9.1f}{t['p95_ms']:9.1f}{t['p50_ms'] / base:13.2f}"
            )
        lines.append(
            f"{'':>9} recall@10 {fig['recall_vector_search']:.3f} (search vector mode {fig['recall_search_vector_mode']:.3f},"
            f" keyword {fig['recall_keyword']:.3f}, hybrid {fig['recall_hybrid']:.3f});"
            f" build {fig['cold']['build_s']:.2f} s from {fig['cold']['build_source']}, "
            f"{fig['warm_build_s']:.2f} s from {fig['warm_build_source']}; RSS {fig['cold']['rss_end_mb']:.0f} MB "
            f"(peak {fig['cold']['rss_peak_after_build_mb']:.0f} MB after the build, "
            f"{fig['cold']['rss_peak_mb']:.0f} MB over the searches)"
        )  # fmt: skip
        if fig["cold"].get("keyword_accelerator"):
            lines.append(
                f"{'':>9} keywords ranked by Tantivy: built in {fig['keyword_build_s']:.1f} s "
                f"({fig.get('keyword_sidecar_mb', 0):.0f} MB beside the index), opened in "
                f"{fig['warm_keyword_open_s']:.2f} s; keyword recall@10 is its top 10 shared with FTS5's"
                f" ({fig['recall_keyword_by_text']:.3f} counting copies of one text as one; hybrid"
                f" {fig['recall_hybrid_by_text']:.3f})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the queries (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorekeeper-bench-vectors"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--exact-vec0", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help="only write the indexes")
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.queries_file, args.rounds, args.exact_vec0)
        args.json.write_text(json.dumps(result), encoding="utf-8")
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["LOREKEEPER_HOME"] = str(args.workdir / "home")
    real, queries, model_id = real_vectors(args.workdir)
    qfile = args.workdir / "queries.npz"
    texts = list(QUERIES) + [f"perturbed real vector {i}" for i in range(len(queries) - len(QUERIES))]
    np.savez(qfile, queries=queries, texts=np.asarray(texts))
    if args.build_only:
        for size in args.sizes:
            db = args.workdir / f"vectors-{size}.db"
            if not db.is_file():
                log.info("wrote %d chunks in %.0f s", size, build_index(db, size, real, model_id, seed=size))
        return 0
    result = {"sizes": [], "command": "python scripts/bench_vectors.py " + " ".join(argv or sys.argv[1:])}
    for size in args.sizes:
        result["sizes"].append(bench_size(size, args, real, qfile, model_id))
    result["environment"] = {
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "vectors": f"perturbed real MiniLM vectors: normalise(real_i + {SYNTH_MIX} real_j + noise)",
    }
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
