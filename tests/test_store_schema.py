"""Schema migrations (from a blank file and from an older schema) and the chunker's guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorekeeper.plugins.base import TextUnit
from lorekeeper.server import migrations
from lorekeeper.server.chunker import chunk_units
from lorekeeper.server.store import Store, StoreError, connect


def test_blank_database_gets_every_migration(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "fresh.db")
    try:
        assert store.schema_version() == migrations.LATEST_VERSION
        applied = store._read().execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [v for (v,) in applied] == sorted(v for v, _, _ in migrations.MIGRATIONS)
        assert store._read().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_upgrade_from_the_first_schema_keeps_the_data(tmp_path: Path, embedder) -> None:
    db = tmp_path / "old.db"
    conn = connect(db)
    migrations.migrate(conn, target=1)
    conn.execute("INSERT INTO roots(path, added_at) VALUES ('/notes', 1.0)")
    conn.execute(
        "INSERT INTO documents(root_id, path, size, mtime, content_hash, loader, status, chunk_count) "
        "VALUES (1, '/notes/a.md', 10, 1.0, 'abc', 'markdown:1', 'indexed', 1)"
    )
    conn.execute(
        "INSERT INTO chunks(document_id, seq, text, char_start, char_end, start_line, end_line, heading_path) "
        "VALUES (1, 0, 'Old chunk about lanterns.', 0, 25, 1, 1, ?)",
        (json.dumps(["A"]),),
    )
    conn.execute("INSERT INTO chunks_fts(rowid, text, headings) VALUES (1, 'Old chunk about lanterns.', 'A')")
    conn.close()

    store = Store.open(db)
    try:
        assert store.schema_version() == migrations.LATEST_VERSION
        doc = store.get_document("/notes/a.md")
        assert doc.content_hash == "abc" and doc.note is None
        assert store.document_chunks("/notes/a.md")[0].text == "Old chunk about lanterns."
        # the old chunk had no vector: opening an indexer embeds it, and search finds it
        from lorekeeper.server.indexer import Indexer
        from lorekeeper.server.search import search

        Indexer(store, embedder).fill_missing_vectors()
        assert store.check_integrity() == []
        assert search(store, embedder, "lanterns", k=1)[0].path == "/notes/a.md"
    finally:
        store.close()


def test_a_file_that_is_not_an_index_gives_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="--db"):
        Store.open(bogus)


def _units(text: str) -> list[TextUnit]:
    return [
        TextUnit(text=text, char_start=0, char_end=len(text), start_line=1, end_line=text.count("\n") + 1)
    ]


def test_chunks_fit_the_window_and_overlap(embedder) -> None:
    paragraphs = [f"Paragraph {i} talks about subject {i} in several plain words." for i in range(200)]
    text = "\n".join(paragraphs)
    chunks = chunk_units(_units(text), embedder.token_spans, max_tokens=100, overlap_tokens=16)
    assert len(chunks) > 10
    for chunk in chunks:
        assert embedder.count_tokens(chunk.text) <= 100
        assert text[chunk.char_start : chunk.char_end] == chunk.text
        # line numbers point at the chunk's own lines
        lines = text.splitlines()[chunk.start_line - 1 : chunk.end_line]
        assert chunk.text.splitlines()[0] in lines[0] and chunk.text.splitlines()[-1] in lines[-1]
    for a, b in zip(chunks, chunks[1:]):
        assert b.char_start < a.char_end, "neighbouring windows overlap"
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)


def test_small_units_under_one_heading_are_packed_together() -> None:
    units = [
        TextUnit(
            text=f"Short line {i}.",
            char_start=i * 20,
            char_end=i * 20 + 14,
            start_line=i + 1,
            end_line=i + 1,
            heading_path=["Intro"] if i < 3 else ["Details"],
        )  # fmt: skip
        for i in range(6)
    ]
    chunks = chunk_units(units, max_tokens=64)
    assert [c.heading_path for c in chunks] == [["Intro"], ["Details"]]
    assert (chunks[0].start_line, chunks[0].end_line) == (1, 3)
    assert (chunks[1].start_line, chunks[1].end_line) == (4, 6)


def test_one_huge_line_is_chunked_in_linear_time(embedder) -> None:
    text = "word " * 200_000  # a megabyte on one line
    chunks = chunk_units(_units(text), embedder.token_spans, max_tokens=254)
    assert 700 < len(chunks) < 1100
    assert all(c.start_line == 1 and c.end_line == 1 for c in chunks)


def test_small_definitions_of_one_class_share_a_chunk() -> None:
    methods = [
        TextUnit(text=f"    def m{i}(self):\n        return {i}", char_start=i * 40, char_end=i * 40 + 35,
                 start_line=2 + 2 * i, end_line=3 + 2 * i, heading_path=["class Box", f"def m{i}"], kind="code")
        for i in range(5)
    ]  # fmt: skip
    other = TextUnit(text="def helper():\n    pass", char_start=300, char_end=322, start_line=20, end_line=21,
                     heading_path=["def helper"], kind="code")  # fmt: skip
    chunks = chunk_units([*methods, other], max_tokens=200)
    assert len(chunks) == 2
    assert chunks[0].heading_path == ["class Box"] and (chunks[0].start_line, chunks[0].end_line) == (2, 11)
    assert chunks[1].heading_path == ["def helper"]


@pytest.mark.slow
def test_a_long_unit_is_tokenized_a_segment_at_a_time_with_exact_offsets_and_lines() -> None:
    from lorekeeper.server.chunker import SEGMENT_CHARS

    lines = [f"line {i} " + "tide " * (i % 30) for i in range(20_000)]
    text = "\n".join(lines)
    assert len(text) > 5 * SEGMENT_CHARS
    seen: list[int] = []

    def spans(piece: str):
        seen.append(len(piece))
        return [m.span() for m in __import__("re").finditer(r"\S+", piece)]

    chunks = chunk_units(_units(text), spans, max_tokens=100)
    assert max(seen) <= SEGMENT_CHARS  # never the whole text at once
    for chunk in chunks:
        assert text[chunk.char_start : chunk.char_end] == chunk.text
        assert text.count("\n", 0, chunk.char_start) + 1 == chunk.start_line
        assert text.count("\n", 0, chunk.char_end - 1) + 1 == chunk.end_line
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text.rstrip())


def test_more_chunks_than_the_bound_is_an_error() -> None:
    from lorekeeper.server.chunker import TooManyChunks

    text = "word " * 50_000
    with pytest.raises(TooManyChunks, match="max_chunks_per_file"):
        chunk_units(_units(text), max_tokens=64, max_chunks=100)
