"""Hybrid retrieval: vector nearest neighbours from sqlite-vec and BM25 from FTS5, fused.

Fusion is weighted reciprocal rank fusion: each list contributes ``weight / (rrf_k + rank)``, so
neither list's raw scores need calibrating against the other's. Filters (root, path glob, file type,
modified time) apply before ranking: a filtered search returns the best k among the matching files,
not the matching few among the global best k. Hits that repeat each other collapse: the same text
twice in one file, or overlapping windows of one passage, come back once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lorekeeper.plugins.base import Embedder

from .hits import MAX_K, MODES, SearchHit, parse_since
from .store import path_matches
from .stores import IndexStore

__all__ = ["MAX_K", "MODES", "SearchHit", "parse_since", "search"]

RRF_K = 60


FTS_OPERATORS = frozenset({"AND", "OR", "NOT", "NEAR"})


def query_words(query: str) -> list[str]:
    """The words a query searches for: runs of letters and digits, lower case, without the
    keyword-query operators a user may type (``AND``, ``OR``, ``NOT``, ``NEAR`` in capitals)."""
    return [w.lower() for w in re.findall(r"\w+", query) if w not in FTS_OPERATORS]


def validate(query: str, k: int, mode: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is empty: give a few words or a question to search for")
    if not query_words(query):
        raise ValueError(
            f"query {query.strip()[:80]!r} has no words to search for (only punctuation or the operators "
            "AND, OR, NOT, NEAR): give a few words or a question"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r} is out of range: ask for between 1 and {MAX_K} results")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    return query.strip()


@dataclass
class TypeFilter:
    """A file-type filter resolved against the loaders: file suffixes, and loaders by name (which
    also catches files read by content, such as a ``copyright`` file or a ``.gz`` of text)."""

    suffixes: list[str]
    loaders: list[str]


def normalise_types(file_types: list[str] | None, store: IndexStore | None = None) -> TypeFilter | None:
    """Resolve ``--type`` values: a loader's name (``markdown``, ``pdf``, ``code``) takes every file
    it reads; an extension takes its spellings when its loader reads one format (``md`` also finds
    ``.markdown``), else itself. A type no loader knows and no indexed file has is an error that
    names the known types."""
    if not file_types:
        return None
    from lorekeeper.plugins import get_loaders, loaders_by_extension

    by_ext = loaders_by_extension()
    names = {loader.name: loader for loader in get_loaders()}
    suffixes: dict[str, None] = {}
    loaders: dict[str, None] = {}
    unknown: list[str] = []
    for item in file_types:
        item = str(item).strip().lower().lstrip(".")
        if not item:
            continue
        loader = by_ext.get("." + item)
        if item in names:
            loaders[item] = None
        elif loader is not None:
            spellings = loader.extensions if loader.one_format else ("." + item,)
            suffixes.update(dict.fromkeys(ext for ext in spellings if ext.startswith(".")))
        elif store is not None and len(unknown) < 20 and store.has_suffix("." + item):
            suffixes["." + item] = None
        else:
            unknown.append(item)
    if unknown:
        known = sorted(names) + sorted(ext.lstrip(".") for ext in by_ext if ext.startswith("."))
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"unknown file type {shown}: no loader reads it and no indexed file has it; known types: "
                         + ", ".join(known))  # fmt: skip
    if not suffixes and not loaders:
        return None
    return TypeFilter(list(suffixes), list(loaders))


def keyword_query(query: str) -> str | None:
    """The query's words as an FTS5 OR-query; quoting each word keeps user punctuation harmless."""
    words = query_words(query)
    if not words:
        return None
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def search(
    store: IndexStore,
    embedder: Embedder | None,
    query: str,
    k: int = 8,
    mode: str = "hybrid",
    path_glob: str | None = None,
    file_types: list[str] | None = None,
    modified_after: float | None = None,
    root: str | None = None,
    vector_weight: float = 1.0,
    keyword_weight: float = 1.0,
    rrf_k: int = RRF_K,
) -> list[SearchHit]:
    """The ``k`` best chunks for ``query``; raises ValueError on bad arguments."""
    query = validate(query, k, mode)
    if vector_weight < 0 or keyword_weight < 0:
        raise ValueError("fusion weights must be zero or positive")
    types = normalise_types(file_types, store)
    allowed = _allowed_documents(store, path_glob, types, modified_after, root)
    if allowed is not None and not allowed:
        return []
    fetch = max(k * 4, 20)

    vector_list: list[tuple[int, float]] = []
    keyword_list: list[tuple[int, float]] = []
    if mode in ("hybrid", "vector") and store.embed_dim:
        if embedder is None:
            raise ValueError("vector search needs an embedder")
        qvec = np.asarray(embedder.embed_query(query), dtype=np.float32)
        vector_list = store.vector_search(qvec, fetch, allowed)
    if mode in ("hybrid", "keyword"):
        match = keyword_query(query)
        if match is not None:
            keyword_list = store.keyword_search(match, fetch, allowed)

    fused: dict[int, float] = {}
    vec_scores = dict(vector_list)
    kw_scores = dict(keyword_list)
    if mode == "vector":
        fused = dict(vector_list)
    elif mode == "keyword":
        fused = dict(keyword_list)
    else:
        for rank, (chunk_id, _) in enumerate(vector_list, 1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + vector_weight / (rrf_k + rank)
        for rank, (chunk_id, _) in enumerate(keyword_list, 1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + keyword_weight / (rrf_k + rank)
    order = sorted(fused, key=lambda cid: fused[cid], reverse=True)
    rows = store.chunk_hits(order)

    hits: list[SearchHit] = []
    by_hash: dict[str, SearchHit] = {}
    for chunk_id in order:
        chunk = rows.get(chunk_id)
        if chunk is None:
            continue
        hit, chunk_hash = SearchHit.from_chunk(chunk), chunk.chunk_hash
        earlier = by_hash.get(chunk_hash)
        if earlier is not None:
            if earlier.path != hit.path and hit.path not in earlier.also_in:
                earlier.also_in.append(hit.path)
            continue
        if any(_overlaps(h, hit) for h in hits):
            continue
        hit.score = fused[chunk_id]
        hit.vector_score = vec_scores.get(chunk_id)
        hit.keyword_score = kw_scores.get(chunk_id)
        hit.rank = len(hits) + 1
        hits.append(hit)
        by_hash[chunk_hash] = hit
        if len(hits) == k:
            break
    return hits


def _overlaps(a: SearchHit, b: SearchHit) -> bool:
    """Two windows of the same passage (the chunker's overlap) count as one hit."""
    if a.document_id != b.document_id or a.page != b.page:
        return False
    if None in (a.char_start, a.char_end, b.char_start, b.char_end):
        return False
    overlap = min(a.char_end, b.char_end) - max(a.char_start, b.char_start)
    shorter = min(a.char_end - a.char_start, b.char_end - b.char_start)
    return shorter > 0 and overlap > shorter / 2


def _allowed_documents(
    store: IndexStore,
    path_glob: str | None,
    types: TypeFilter | None,
    modified_after: float | None,
    root: str | None,
) -> set[int] | None:
    """Ids of the documents the filters admit; None when there are no filters."""
    if not (path_glob or types or modified_after is not None or root):
        return None
    roots = [r.path for r in store.roots()]
    return {
        doc_id
        for doc_id, path in store.filter_documents(
            root=root,
            modified_after=modified_after,
            file_types=types.suffixes if types else None,
            loaders=types.loaders if types else None,
        )
        if not path_glob or path_matches(path, path_glob, roots)
    }
