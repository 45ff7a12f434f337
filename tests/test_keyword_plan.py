"""Keyword search on a large index runs in two steps (rare words pick candidates, the whole query
scores them): it must return what ranking every match returns, with the same scores."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from lorekeeper.server import keyword_plan
from lorekeeper.server.chunker import Chunk
from lorekeeper.server.search import keyword_query, query_words, search
from lorekeeper.server.store import Store

COMMON = ("the", "with", "file", "return", "value", "using")
RARE = [
    f"{a}{b}"
    for a in ("zor", "quel", "brin", "tamp", "vesk", "lomb")
    for b in ("ax", "ish", "ent", "ode", "ur")
]
PER_DOC = 10


def _text(rng: random.Random) -> str:
    """Mostly common words, at varying counts, and one to three rare ones."""
    words = [w for w in COMMON for _ in range(rng.randint(0, 4))]
    words += rng.sample(RARE, rng.randint(1, 3))
    words += ["parsing", "arguments"] if rng.random() < 0.05 else []
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    rng = random.Random(7)
    store = Store(tmp_path_factory.mktemp("kw") / "index.db", vector_index=False)
    root = store.add_root("/docs")
    store.ensure_embedder("test-model", 4)
    for d in range(80):
        chunks = [
            Chunk(text=_text(rng), char_start=0, char_end=1, chunk_hash=f"d{d}-{i}") for i in range(PER_DOC)
        ]
        vectors = np.tile(np.array([1, 0, 0, 0], dtype=np.float32), (PER_DOC, 1))
        store.replace_document(
            path=f"/docs/d{d:03d}.txt", root_id=root.id, size=1, mtime=time.time(), content_hash=f"d{d}",
            loader="test:1", chunks=chunks, vectors=vectors, model_id="test-model",
        )  # fmt: skip
    return store


def test_plan_counts_the_index_terms_and_leaves_common_words_out(store: Store) -> None:
    conn = store._read()
    words = ["the", "with", "zorax", "arguments", "parse"]
    small = keyword_plan.plan(conn, words, budget=200)
    assert small.rare is not None
    rare = set(query_words(small.rare))
    # "arguments" and "parse" are found through their stems (argument, pars) in the few chunks that
    # say "arguments" and "parsing"; the common words are left to the scoring step
    assert {"zorax", "arguments", "parse"} <= rare and not rare & {"the", "with"}
    assert small.postings > 700  # "the" and "with" are in most of the 800 chunks
    assert keyword_plan.plan(conn, words, budget=10_000).rare is None  # few enough: one ranking
    assert keyword_plan.plan(conn, ["the"], budget=1).rare is None  # one word: nothing to split


def _queries() -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.sample(COMMON, 3) + rng.sample(RARE, 2)) for _ in range(30)] + [
        "how to parse the arguments with a value"
    ]


def test_two_steps_return_the_full_ranking_with_its_scores(store: Store, monkeypatch) -> None:
    full = {q: store.keyword_search(keyword_query(q), 10) for q in _queries()}
    monkeypatch.setattr(keyword_plan, "PLAIN_POSTINGS", 150)
    overlap = []
    for q in _queries():
        assert keyword_plan.plan(store._read(), query_words(q)).rare is not None, q
        got = store.keyword_search(keyword_query(q), 10, words=query_words(q))
        everything = dict(store.keyword_search(keyword_query(q), 800))
        for chunk_id, score in got:  # the scores are the whole query's BM25
            assert score == pytest.approx(everything[chunk_id], rel=1e-9)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        overlap.append(len({c for c, _ in got} & {c for c, _ in full[q]}) / 10)
    assert np.mean(overlap) >= 0.97, overlap


def test_two_steps_keep_filters_and_search_modes(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(keyword_plan, "PLAIN_POSTINGS", 150)
    query = "the file with zorax and brinode"
    hits = search(store, None, query, k=10, mode="keyword", path_glob="/docs/d00*")
    assert hits and all(h.path.startswith("/docs/d00") for h in hits)
    monkeypatch.setattr(keyword_plan, "PLAIN_POSTINGS", 10**9)
    assert [h.chunk_id for h in hits] == [
        h.chunk_id for h in search(store, None, query, k=10, mode="keyword", path_glob="/docs/d00*")
    ]


def test_index_changes_reach_the_term_counts(tmp_path: Path) -> None:
    store = Store(tmp_path / "index.db", vector_index=False)
    root = store.add_root("/docs")
    store.ensure_embedder("test-model", 4)
    conn = store._read()
    assert keyword_plan.plan(conn, ["zorax", "the"], budget=0).postings == 0
    chunk = Chunk(text="the zorax", char_start=0, char_end=1, chunk_hash="h")
    store.replace_document(
        path="/docs/a.txt", root_id=root.id, size=1, mtime=time.time(), content_hash="a", loader="test:1",
        chunks=[chunk], vectors=np.ones((1, 4), dtype=np.float32), model_id="test-model",
    )  # fmt: skip
    assert keyword_plan.plan(conn, ["zorax", "the"], budget=0).postings == 2
