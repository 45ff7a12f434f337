"""Hybrid retrieval: vector nearest neighbours from sqlite-vec and BM25 from FTS5, fused.

Fusion is weighted reciprocal rank fusion: each list contributes ``weight / (rrf_k + rank)``, so
neither list's raw scores need calibrating against the other's. Filters (root, path glob, file type,
modified time) apply before ranking: a filtered search returns the best k among the matching files,
not the matching few among the global best k. Hits that repeat each other collapse: the same text
twice in one file, or overlapping windows of one passage, come back once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorekeeper.plugins.base import Embedder

from .store import Store, path_matches, vector_blob

MODES = ("hybrid", "vector", "keyword")
MAX_K = 200
RRF_K = 60
EXACT_SCAN_LIMIT = 20_000  # filtered searches over at most this many chunks are scanned exactly
VEC_K_LIMIT = 4096  # the most neighbours one vec0 query returns


@dataclass
class SearchHit:
    chunk_id: int
    document_id: int
    path: str
    text: str
    score: float
    start_line: int | None
    end_line: int | None
    page: int | None
    heading_path: list[str]
    mtime: float | None
    rank: int = 0
    root: str | None = None
    vector_score: float | None = None  # cosine similarity, when the vector list found it
    keyword_score: float | None = None  # BM25 (higher is better), when the keyword list found it
    also_in: list[str] = field(default_factory=list)  # other files holding the very same text
    char_start: int | None = None
    char_end: int | None = None

    @property
    def location(self) -> str:
        """``path:12-30``, ``path#page=3`` or the bare path: what a citation shows."""
        if self.page is not None:
            return f"{self.path}#page={self.page}"
        if self.start_line is not None:
            end = self.end_line if self.end_line is not None else self.start_line
            return f"{self.path}:{self.start_line}-{end}"
        return self.path


def validate(query: str, k: int, mode: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is empty: give a few words or a question to search for")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r} is out of range: ask for between 1 and {MAX_K} results")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    return query.strip()


def normalise_types(file_types: list[str] | None) -> list[str] | None:
    if not file_types:
        return None
    out = []
    for item in file_types:
        item = item.strip().lower()
        if not item:
            continue
        out.append(item if item.startswith(".") else "." + item)
    return out or None


def keyword_query(query: str) -> str | None:
    """The query's words as an FTS5 OR-query; quoting each word keeps user punctuation harmless."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        return None
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def search(
    store: Store,
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
    file_types = normalise_types(file_types)
    conn = store._read()
    allowed = _allowed_documents(store, path_glob, file_types, modified_after, root)
    if allowed is not None and not allowed:
        return []
    fetch = max(k * 4, 20)

    vector_list: list[tuple[int, float]] = []
    keyword_list: list[tuple[int, float]] = []
    if mode in ("hybrid", "vector") and store.embed_dim:
        if embedder is None:
            raise ValueError("vector search needs an embedder")
        qvec = np.asarray(embedder.embed_query(query), dtype=np.float32)
        vector_list = _vector_candidates(conn, qvec, fetch, allowed)
    if mode in ("hybrid", "keyword"):
        keyword_list = _keyword_candidates(conn, query, fetch, allowed)

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
    rows = _load_chunks(conn, order)

    hits: list[SearchHit] = []
    by_hash: dict[str, SearchHit] = {}
    for chunk_id in order:
        row = rows.get(chunk_id)
        if row is None:
            continue
        hit, chunk_hash = row
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
    store: Store,
    path_glob: str | None,
    file_types: list[str] | None,
    modified_after: float | None,
    root: str | None,
) -> set[int] | None:
    """Ids of the documents the filters admit; None when there are no filters."""
    if not (path_glob or file_types or modified_after is not None or root):
        return None
    sql = "SELECT id, path FROM documents WHERE status = 'indexed'"
    args: list = []
    if root:
        sql += " AND root_id = (SELECT id FROM roots WHERE path = ?)"
        args.append(str(Path(root).expanduser().resolve()))
    if modified_after is not None:
        sql += " AND mtime >= ?"
        args.append(float(modified_after))
    if file_types:
        sql += " AND (" + " OR ".join("lower(path) LIKE ?" for _ in file_types) + ")"
        args.extend("%" + ext for ext in file_types)
    roots = [r.path for r in store.roots()]
    allowed = set()
    for doc_id, path in store._read().execute(sql, args):
        if path_glob and not path_matches(path, path_glob, roots):
            continue
        allowed.add(doc_id)
    return allowed


def _vector_candidates(
    conn, qvec: np.ndarray, fetch: int, allowed: set[int] | None
) -> list[tuple[int, float]]:
    blob = vector_blob(qvec)
    if allowed is None:
        rows = conn.execute(
            "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? ORDER BY distance",
            (blob, min(fetch, VEC_K_LIMIT)),
        ).fetchall()
        return [(rowid, 1.0 - dist) for rowid, dist in rows]
    ids = json.dumps(sorted(allowed))
    n_allowed = conn.execute(
        "SELECT COUNT(*) FROM chunks WHERE document_id IN (SELECT value FROM json_each(?))", (ids,)
    ).fetchone()[0]
    total = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    if n_allowed == 0:
        return []
    if n_allowed > EXACT_SCAN_LIMIT:
        # many matching chunks: ask the index for more neighbours than needed, keep the matching ones
        want = min(VEC_K_LIMIT, fetch * math.ceil(total / n_allowed) * 2)
        rows = conn.execute(
            "SELECT v.rowid, v.distance, c.document_id FROM chunk_vectors v JOIN chunks c ON c.id = v.rowid "
            "WHERE v.embedding MATCH ? AND k = ? ORDER BY v.distance",
            (blob, want),
        ).fetchall()
        found = [(rowid, 1.0 - dist) for rowid, dist, doc in rows if doc in allowed][:fetch]
        if len(found) >= min(fetch, n_allowed):
            return found
    rows = conn.execute(
        "SELECT c.id, vec_distance_cosine(v.embedding, ?) AS dist FROM chunks c "
        "JOIN chunk_vectors v ON v.rowid = c.id "
        "WHERE c.document_id IN (SELECT value FROM json_each(?)) ORDER BY dist LIMIT ?",
        (blob, ids, fetch),
    ).fetchall()
    return [(rowid, 1.0 - dist) for rowid, dist in rows]


def _keyword_candidates(conn, query: str, fetch: int, allowed: set[int] | None) -> list[tuple[int, float]]:
    match = keyword_query(query)
    if match is None:
        return []
    if allowed is None:
        rows = conn.execute(
            "SELECT rowid, bm25(chunks_fts, 1.0, 2.0) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
            "ORDER BY s LIMIT ?",
            (match, fetch),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT f.rowid, bm25(chunks_fts, 1.0, 2.0) AS s FROM chunks_fts f JOIN chunks c ON c.id = f.rowid "
            "WHERE chunks_fts MATCH ? AND c.document_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY s LIMIT ?",
            (match, json.dumps(sorted(allowed)), fetch),
        ).fetchall()
    return [(rowid, -score) for rowid, score in rows]


def _load_chunks(conn, ids: list[int]) -> dict[int, tuple[SearchHit, str]]:
    if not ids:
        return {}
    rows = conn.execute(
        "SELECT c.id, c.document_id, d.path, c.text, c.start_line, c.end_line, c.page, c.heading_path, "
        "d.mtime, r.path, c.chunk_hash, c.char_start, c.char_end FROM chunks c "
        "JOIN documents d ON d.id = c.document_id JOIN roots r ON r.id = d.root_id "
        "WHERE c.id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ).fetchall()
    out = {}
    for row in rows:
        hit = SearchHit(
            chunk_id=row[0],
            document_id=row[1],
            path=row[2],
            text=row[3],
            score=0.0,
            start_line=row[4],
            end_line=row[5],
            page=row[6],
            heading_path=json.loads(row[7] or "[]"),
            mtime=row[8],
            root=row[9],
            char_start=row[11],
            char_end=row[12],
        )
        out[row[0]] = (hit, row[10])
    return out
