"""Chunk size measured on a sample: the judged files and some others, indexed again at each size
into a temporary index (the real one is never touched), the judged queries run on each.

Every size sees the same files and the same queries, so the sizes compare fairly with each other;
a sample holds fewer distracting files than the whole index, so its figures run higher than the
index's own. A query judged by a line range counts a chunk that overlaps the range (as everywhere
in the evaluation), so smaller chunks are not penalised for splitting what a larger one held.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorekeeper.plugins.base import Embedder

from . import evaluation as ev
from .settings import Settings

DEFAULT_SAMPLE_FILES = 40
# nDCG@10 a size must gain over the current one to be recommended (a new size re-embeds everything)
MIN_GAIN = 0.01


@dataclass
class ChunkRow:
    size: int
    files: int
    chunks: int
    scores: ev.Scores
    seconds: float


def sample_files(store: Any, judged: Sequence[ev.JudgedQuery], roots: Sequence[str], n: int,
                 seed: int = 0) -> list[str]:  # fmt: skip
    """Absolute paths: every indexed file a query names, then others drawn at random up to ``n``."""
    indexed = [d for d in store.documents() if d.status == "indexed"]
    named = {j.path for q in judged for j in q.judgements}
    chosen = [d.path for d in indexed if ev.relative_path(d.path, roots) in named]
    taken = set(chosen)
    others = sorted(d.path for d in indexed if d.path not in taken)
    random.Random(seed).shuffle(others)
    return chosen + others[: max(0, n - len(chosen))]


def chunk_sweep(
    settings: Settings,
    store: Any,
    embedder: Embedder,
    judged: Sequence[ev.JudgedQuery],
    sizes: Sequence[int],
    *,
    mode: str = "hybrid",
    fusion: ev.Fusion | None = None,
    n_files: int = DEFAULT_SAMPLE_FILES,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[ChunkRow]:
    """One row per chunk size (in the order given): the sample indexed at that size, then scored."""
    from .indexer import Indexer
    from .search import search
    from .store import Store

    roots = [r.path for r in store.roots()]
    paths = sample_files(store, judged, roots, n_files, seed)
    fusion = fusion or ev.Fusion(settings.vector_weight, settings.keyword_weight, settings.rrf_k)
    cached = ev.QueryCache(embedder)
    rows = []
    for i, size in enumerate(sizes):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="lorekeeper-chunks-") as tmp:
            db = Path(tmp) / "sample.db"
            sized = replace(settings, db=str(db), chunk_tokens=int(size))
            with Store.open(db) as sample:
                for root in roots:
                    sample.add_root(root)
                Indexer(sample, embedder, settings=sized).index_files(paths)
                chunks = sample.chunk_count()

                def run(**args: Any) -> list:
                    return search(sample, cached, **args)

                runs = ev.run_queries(run, judged, mode, fusion, roots)
        rows.append(ChunkRow(int(size), len(paths), chunks, ev.score_runs(runs, judged),
                             time.monotonic() - started))  # fmt: skip
        if progress is not None:
            progress(i + 1, len(sizes))
    return rows


def best_size(rows: Sequence[ChunkRow], current: int, min_gain: float = MIN_GAIN) -> ChunkRow:
    """The row with the best nDCG@10 (then recall@10, MRR@10, then the larger size), but the current
    size unless the best beats it by ``min_gain`` nDCG@10: a new size re-embeds the whole index."""

    def order(row: ChunkRow) -> tuple:
        m = row.scores.means
        return (-round(m["ndcg@10"], 9), -round(m["recall@10"], 9), -round(m["mrr@10"], 9), -row.size)

    best = min(rows, key=order)
    now = next((r for r in rows if r.size == current), None)
    if now is not None and best.scores.means["ndcg@10"] - now.scores.means["ndcg@10"] < min_gain:
        return now
    return best
