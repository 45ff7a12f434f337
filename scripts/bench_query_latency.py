"""Latency of meaning-based (hybrid) searches while a folder is being indexed, against the same
searches on an idle index.

A sample of real files (every k-th file of /usr/share/doc, or ``--source``) is copied to a temporary
folder. A small part is indexed first, so searches have something to find; then, for
``--seconds``, hybrid searches run one after another while another thread indexes the rest of the
folder with the same embedder (as the MCP server's watcher does), and again for ``--seconds`` on
the idle index. Reports p50/p95/max of each; bounded by ``--seconds`` and the sample size.

    python scripts/bench_query_latency.py                      # 300 files, 60 s each way
    python scripts/bench_query_latency.py --files 200 --seconds 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

QUERIES = [
    "how do I configure the network interface",
    "license terms for redistribution",
    "security fix for a buffer overflow",
    "what changed in the latest release",
    "memory leak in the parser",
    "documentation of command line options",
    "build dependencies and packaging",
    "translation updates for german",
]


def copy_sample(source: Path, count: int, folder: Path) -> int:
    found = sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    step = max(1, len(found) // max(1, count))
    picked = found[::step][:count]
    for path in picked:
        target = folder / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return len(picked)


def run_queries(store, embedder, seconds: float, stop: threading.Event | None = None) -> list[float]:
    from lorekeeper.server.search import search

    latencies: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        started = time.monotonic()
        search(store, embedder, QUERIES[i % len(QUERIES)], k=8, mode="hybrid")
        latencies.append(time.monotonic() - started)
        i += 1
        time.sleep(0.05)
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=Path("/usr/share/doc"))
    parser.add_argument("--files", type=int, default=300, help="files copied (default 300)")
    parser.add_argument("--seconds", type=float, default=60, help="searching time each way (default 60)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from lorekeeper import plugins
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.settings import process_environment
    from lorekeeper.server.store import Store

    process_environment()
    embedder = plugins.get_embedder()
    embedder.embed(["warm up the model before anything is timed"])
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-query-latency-"))
    try:
        first, rest = work / "first", work / "rest"
        first.mkdir()
        rest.mkdir()
        copied = copy_sample(args.source, args.files // 10, first)
        copied += copy_sample(args.source, args.files, rest)
        store = Store.open(work / "index.db")
        indexer = Indexer(store, embedder)
        indexer.add_root(first)
        store.add_root(rest)
        finished = threading.Event()
        indexing = threading.Thread(target=lambda: (indexer.reconcile(str(rest.resolve())), finished.set()))
        indexing.start()
        busy = run_queries(store, embedder, args.seconds, finished)
        chunks_then = store.chunk_count()
        indexing.join()
        idle = run_queries(store, embedder, min(args.seconds, 30))
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {"files": copied, "chunks_while_searching": chunks_then, "busy": summary(busy), "idle": summary(idle),
               "indexing_finished_first": finished.is_set() and len(busy) < 3, "load": os.getloadavg()[0]}  # fmt: skip
    for name in ("busy", "idle"):
        f = figures[name]
        label = "while a folder is being indexed" if name == "busy" else "on the idle index"
        if f["n"]:
            print(
                f"hybrid search {label:32} n={f['n']:4}  p50 {f['p50']:.3f} s  p95 {f['p95']:.3f} s  max {f['max']:.3f} s"
            )
    print(
        f"({copied} files, {chunks_then} chunks indexed when the busy searches ended; load average {figures['load']:.1f})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
