"""Retrieval evaluation: judged queries, the standard ranking metrics, runs of the real search, and a
sweep of the fusion settings.

A judged query names the files (or line ranges of files) that answer it, each with a grade (1 when
not given; 0 means judged not relevant). Search returns chunks; a ranking for evaluation is the
search's order with each chunk mapped to the judgement it hits (its file, or the judged line range
it overlaps) and repeats dropped, so a file is counted once, at its best rank, as trec_eval counts
documents. Paths are relative to the registered folder that holds them.

The metric functions are pure (rankings and judgements in, numbers out) and follow trec_eval:
recall@k is the share of a query's relevant items in the first k; MRR@10 is the mean of 1/rank of
the first relevant item in the first 10 (0 when none); nDCG@10 uses the grade as the gain and
1/log2(rank + 1) as the discount, against the ideal order of the query's judgements. A query
without a relevant judgement is left out of the means (and counted); unjudged results count as not
relevant. Rankings read from a run file are ordered by score, ties by document id in reverse
(trec_eval's rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorekeeper.plugins.base import Embedder

RECALL_KS = (1, 5, 10)
CUTOFF = 10  # MRR and nDCG look at the first 10 results
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
SEARCH_DEPTH = 50  # chunks fetched per query; enough to fill 10 distinct files in practice
DEFAULT_VECTOR_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # the keyword weight stays 1: only the ratio matters
DEFAULT_RRF_KS = (10, 30, 60, 100)


# ------------------------------------------------------------------------------------------------
# Judgements


@dataclass(frozen=True)
class Judgement:
    """A file, or lines ``start``-``end`` of it, that answers a query, with its grade."""

    path: str
    grade: int = 1
    lines: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The document id of this judgement in rankings and TREC files: ``path`` or ``path#L3-9``."""
        return self.path if self.lines is None else f"{self.path}#L{self.lines[0]}-{self.lines[1]}"


@dataclass
class JudgedQuery:
    qid: str
    text: str
    judgements: list[Judgement]
    extra: dict[str, Any] = field(default_factory=dict)  # kind, source... of a generated query

    @property
    def grades(self) -> dict[str, int]:
        """Document id -> grade; the highest grade when an id is judged twice."""
        out: dict[str, int] = {}
        for j in self.judgements:
            out[j.key] = max(j.grade, out.get(j.key, j.grade))
        return out


def parse_key(key: str) -> tuple[str, tuple[int, int] | None]:
    """``path#L3-9`` -> (path, (3, 9)); a plain path -> (path, None)."""
    path, sep, tail = key.rpartition("#L")
    if sep and path:
        start, dash, end = tail.partition("-")
        if start.isdigit() and (not dash or end.isdigit()):
            first = int(start)
            return path, (first, int(end) if dash else first)
    return key, None


def relative_path(path: str, roots: Sequence[str]) -> str:
    """``path`` relative to the registered folder that holds it (the longest such folder); a path
    outside every folder, or already relative, is returned as given (with ``/`` separators)."""
    candidate = Path(path)
    if candidate.is_absolute():
        for root in sorted(roots, key=len, reverse=True):
            try:
                return candidate.relative_to(root).as_posix()
            except ValueError:
                continue
        return candidate.as_posix()
    return candidate.as_posix().removeprefix("./")


# ------------------------------------------------------------------------------------------------
# Metrics (pure)


def ranking_from_scores(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score, highest first; equal scores by document id in reverse order, as trec_eval."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda kv: (-kv[1], _Reversed(kv[0])))]


class _Reversed:
    """Sorts strings in reverse order inside an ascending sort key."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __lt__(self, other: _Reversed) -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.text == other.text


def recall_at(ranking: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, grade in grades.items() if grade > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def reciprocal_rank(ranking: Sequence[str], grades: Mapping[str, int], k: int = CUTOFF) -> float:
    for rank, doc in enumerate(ranking[:k], 1):
        if grades.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranking: Sequence[str], grades: Mapping[str, int], k: int = CUTOFF) -> float:
    """Normalised discounted cumulative gain with the grade as the gain (trec_eval's ndcg_cut)."""
    dcg = sum(max(grades.get(doc, 0), 0) / math.log2(rank + 1) for rank, doc in enumerate(ranking[:k], 1))
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def query_metrics(ranking: Sequence[str], grades: Mapping[str, int]) -> dict[str, float]:
    """Every metric of one query."""
    out = {f"recall@{k}": recall_at(ranking, grades, k) for k in RECALL_KS}
    out["mrr@10"] = reciprocal_rank(ranking, grades, CUTOFF)
    out["ndcg@10"] = ndcg_at(ranking, grades, CUTOFF)
    return out


@dataclass
class Scores:
    """Mean metrics over the judged queries of one run, and each query's own."""

    means: dict[str, float]
    per_query: dict[str, dict[str, float]]
    judged: int  # queries with at least one relevant judgement (the means are over these)
    unjudged: list[str]  # query ids left out: no relevant judgement


def evaluate(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> Scores:
    """Mean metrics of ``rankings`` (query id -> document ids, best first) against ``qrels`` (query id ->
    document id -> grade). A judged query missing from ``rankings`` scores 0 (it found nothing)."""
    per_query: dict[str, dict[str, float]] = {}
    unjudged = []
    for qid, grades in qrels.items():
        if not any(g > 0 for g in grades.values()):
            unjudged.append(qid)
            continue
        per_query[qid] = query_metrics(list(rankings.get(qid, ())), grades)
    means = {
        m: (sum(q[m] for q in per_query.values()) / len(per_query) if per_query else 0.0) for m in METRICS
    }
    return Scores(means, per_query, len(per_query), unjudged)


def means_by_group(
    scores: Scores, groups: Mapping[str, str], metric: str = "ndcg@10"
) -> dict[str, tuple[int, float]]:
    """Group -> (judged queries, mean ``metric``), e.g. by the kind of a drafted query."""
    values: dict[str, list[float]] = {}
    for qid, per in scores.per_query.items():
        values.setdefault(groups.get(qid, "other"), []).append(per[metric])
    return {g: (len(v), sum(v) / len(v)) for g, v in sorted(values.items())}


# ------------------------------------------------------------------------------------------------
# Running the real search


@dataclass(frozen=True)
class Fusion:
    """The hybrid fusion settings one run uses."""

    vector_weight: float
    keyword_weight: float
    rrf_k: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "vector_weight": self.vector_weight,
            "keyword_weight": self.keyword_weight,
            "rrf_k": self.rrf_k,
        }


class QueryCache(Embedder):
    """The index's embedder with each query embedded once, so a sweep of many settings re-embeds
    nothing; search itself runs unchanged."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens
        self._queries: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed(texts)

    def embed_query(self, text: str) -> np.ndarray:
        if text not in self._queries:
            self._queries[text] = self.inner.embed_query(text)
        return self._queries[text]


@dataclass
class Ranked:
    """One query's ranking as evaluated: document ids and the score of each (best first)."""

    docs: list[str]
    scores: list[float]


def rank_hits(hits: Iterable[Any], query: JudgedQuery, roots: Sequence[str]) -> Ranked:
    """Search hits -> the ranking evaluated: each hit's judgement (a judged line range it overlaps,
    else its file), each id once, at its best rank."""
    ranges: dict[str, list[Judgement]] = {}
    for j in query.judgements:
        if j.lines is not None:
            ranges.setdefault(j.path, []).append(j)
    docs: list[str] = []
    scores: list[float] = []
    seen: set[str] = set()
    for hit in hits:
        path = relative_path(hit.path, [hit.root] if hit.root else roots)
        doc = path
        if path in ranges:
            doc = _range_key(path, ranges[path], hit.start_line, hit.end_line)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
            scores.append(float(hit.score))
    return Ranked(docs, scores)


def _range_key(path: str, judged: list[Judgement], start: int | None, end: int | None) -> str:
    """The id of the judged range (highest grade first) that lines start-end overlap, else ``path#Ls-e``."""
    if start is not None:
        last = end if end is not None else start
        for j in sorted(judged, key=lambda j: -j.grade):
            assert j.lines is not None
            if start <= j.lines[1] and last >= j.lines[0]:
                return j.key
        return f"{path}#L{start}-{last}"
    return path


SearchFn = Callable[..., list[Any]]


def run_queries(
    search: SearchFn,
    queries: Sequence[JudgedQuery],
    mode: str,
    fusion: Fusion,
    roots: Sequence[str],
    depth: int = SEARCH_DEPTH,
) -> dict[str, Ranked]:
    """Each query's ranking from ``search`` (``server.search.search`` bound to a store and embedder)."""
    out = {}
    for q in queries:
        try:
            hits = search(query=q.text, k=depth, mode=mode, **fusion.as_dict())
        except ValueError as exc:
            raise ValueError(f"query {q.qid} ({q.text[:60]!r}): {exc}") from None
        out[q.qid] = rank_hits(hits, q, roots)
    return out


def qrels_of(queries: Iterable[JudgedQuery]) -> dict[str, dict[str, int]]:
    return {q.qid: q.grades for q in queries}


def score_runs(runs: Mapping[str, Ranked], queries: Sequence[JudgedQuery]) -> Scores:
    return evaluate({qid: r.docs for qid, r in runs.items()}, qrels_of(queries))


@dataclass
class SweepRow:
    fusion: Fusion
    scores: Scores


def sweep(
    search: SearchFn,
    queries: Sequence[JudgedQuery],
    roots: Sequence[str],
    vector_weights: Sequence[float] = DEFAULT_VECTOR_WEIGHTS,
    rrf_ks: Sequence[int] = DEFAULT_RRF_KS,
    keyword_weights: Sequence[float] = (1.0,),
    current: Fusion | None = None,
) -> list[SweepRow]:
    """Hybrid search under every combination of the fusion settings (and ``current``), best first.
    Only the ratio of the two weights matters to the order, so by default the keyword weight stays 1."""
    grid = [
        Fusion(float(w), float(kw), int(k)) for k in rrf_ks for kw in keyword_weights for w in vector_weights
    ]
    grid = [f for f in dict.fromkeys(grid) if f.vector_weight > 0 or f.keyword_weight > 0]
    if current is not None and current not in grid:
        grid.append(current)
    rows = [SweepRow(f, score_runs(run_queries(search, queries, "hybrid", f, roots), queries)) for f in grid]
    return sorted(rows, key=lambda r: sweep_order(r, current))


def sweep_order(row: SweepRow, current: Fusion | None) -> tuple:
    """nDCG@10 first, then recall@10 and MRR@10; on a tie the current settings, then RRF k near 60."""
    m, f = row.scores.means, row.fusion
    return (-round(m["ndcg@10"], 9), -round(m["recall@10"], 9), -round(m["mrr@10"], 9),
            row.fusion != current, abs(row.fusion.rrf_k - 60), abs(math.log((f.vector_weight or 1e-9) / (f.keyword_weight or 1e-9))))  # fmt: skip
