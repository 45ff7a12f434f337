"""Keyword search that stays fast on a large index (part of the SQLite backend).

FTS5 ranks every chunk that holds any word of an OR-query, about a microsecond each on two cores.
On a million chunks a question's common words ("how", "with", "file") match most of the index,
so ranking them all takes half a second while their part of the BM25 score is small: a word found
in a third of the chunks weighs about a fifth of one found in a thousandth.

So when the words of a query match more chunks in total than ``PLAIN_POSTINGS``, the search runs
in two steps:

1. Candidates: the rarest words (in order of how many chunks hold them, while their total stays
   within ``PLAIN_POSTINGS``; always at least the rarest one) pick the ``candidates`` best chunks by
   their own BM25 score.
2. Scores: those candidates are scored by the whole query, every word included, with FTS5's own
   ``bm25()`` (whose statistics are the whole index's), and the best ``k`` are returned. When the
   rare words hold fewer than ``k`` chunks in all, FTS5 ranks every match instead.

A chunk can be missed only when it holds none of the rare words, or so few that even the
common words cannot lift it from below the candidates into the top ``k``. The benchmark
(``scripts/bench_vectors.py``) measures what that costs against the full ranking (recall@10).

How many chunks hold a word comes from an ``fts5vocab`` table over the index; the words are first
cut into FTS5's own tokens (the index stems with Porter) by a small FTS5 table in the connection's
``temp`` schema, so the counts are those of the terms the index really holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PLAIN_POSTINGS = 40_000  # matches FTS5 ranks in about 40 ms here; more than this: two steps
MIN_CANDIDATES = 200

_TEMP_TABLES = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lk_query USING fts5(t, tokenize='porter unicode61')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lk_query_terms USING fts5vocab(temp, lk_query, instance)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lk_chunk_terms USING fts5vocab(main, chunks_fts, row)",
)


@dataclass
class Plan:
    """How to run one keyword query: ``rare`` is None when FTS5 can rank the whole query at once."""

    full: str
    rare: str | None
    postings: int  # chunks the query's words match, counted once per word


def or_query(words: Sequence[str]) -> str:
    """The words as an FTS5 OR-query; quoting each keeps punctuation harmless."""
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def _word_terms(conn: Any, words: list[str]) -> dict[int, list[str]]:
    """FTS5's tokens for each word (by position in ``words``), as the index's tokenizer cuts them."""
    for sql in _TEMP_TABLES:
        conn.execute(sql)
    conn.execute("DELETE FROM temp.lk_query")
    conn.executemany(
        "INSERT INTO temp.lk_query(rowid, t) VALUES (?, ?)", [(i, w) for i, w in enumerate(words)]
    )
    terms: dict[int, list[str]] = {}
    for doc, term in conn.execute("SELECT doc, term FROM temp.lk_query_terms ORDER BY doc, offset"):
        terms.setdefault(doc, []).append(term)
    conn.execute("DELETE FROM temp.lk_query")
    return terms


def plan(conn: Any, words: Sequence[str], budget: int | None = None) -> Plan:
    """Whether and how to split the query ``words`` (lower case, no operators) into two steps;
    ``budget``: the most matches one FTS5 ranking may read (default ``PLAIN_POSTINGS``)."""
    budget = PLAIN_POSTINGS if budget is None else budget
    words = list(dict.fromkeys(words))
    full = or_query(words)
    if len(words) < 2:
        return Plan(full, None, 0)
    terms = _word_terms(conn, words)
    wanted = sorted({t for ts in terms.values() for t in ts})
    docs = dict(
        conn.execute(
            "SELECT term, doc FROM temp.lk_chunk_terms WHERE term IN (SELECT value FROM json_each(?))",
            (json.dumps(wanted),),
        ).fetchall()
    )
    # A word FTS5 cuts into several tokens is a phrase: reading it costs all of their lists.
    cost = {i: sum(docs.get(t, 0) for t in terms.get(i, [])) for i in range(len(words))}
    total = sum(cost.values())
    if total <= budget:
        return Plan(full, None, total)
    rare: list[str] = []
    spent = 0
    for i in sorted(cost, key=lambda i: cost[i]):
        if cost[i] == 0:
            continue  # in no chunk: it cannot pick a candidate
        if rare and spent + cost[i] > budget:
            break
        rare.append(words[i])
        spent += cost[i]
    if not rare or len(rare) == sum(1 for c in cost.values() if c):
        return Plan(full, None, total)
    return Plan(full, or_query(rare), total)
