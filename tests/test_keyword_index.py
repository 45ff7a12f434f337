"""The keyword accelerator (server/keyword_index.py: Tantivy beside the index) against FTS5 on the
same rows: it finds only chunks FTS5 matches and ranks like it, sees this and other processes'
writes at the next search, applies filters, answers through FTS5 while it is behind, damaged or
locked by another process, and a kill in the middle of an update leaves nothing that disagrees
with the rows.

The text is real: pieces of the Python standard library's sources, with headings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lorekeeper.server import keyword_index
from lorekeeper.server.chunker import Chunk
from lorekeeper.server.keyword_index import sidecar_dir
from lorekeeper.server.search import keyword_query
from lorekeeper.server.store import Store

DIM = 16
MODEL = "test-model"
PER_DOC = 10
QUERIES = [
    "how do I parse command line arguments",
    "read rows from a csv file",
    "compress data with zlib",
    "open a socket connection with a timeout",
    "format a date as a string",
    "copy a directory tree",
    "decode base64 text",
    "thread lock acquire release",
    "sort a list of dictionaries by key",
    "temporary file cleanup",
    "unicode normalization of names",
    "raise an error when the path does not exist",
]


def stdlib_pieces(count: int, size: int = 700) -> list[tuple[str, str]]:
    """(module name, ~size characters of its source) in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[tuple[str, str]] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for start in range(0, len(text) - size, size):
            pieces.append((path.stem, text[start : start + size]))
            if len(pieces) == count:
                return pieces
    return pieces


def put(store: Store, root_id: int, name: str, texts: list[str], headings: list[str] | None = None) -> int:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    chunks = [
        Chunk(
            text=text, char_start=0, char_end=len(text), chunk_hash=f"{name}-{i}-{hash(text)}",
            heading_path=[name, headings[i] if headings else f"part {i}"],
        )
        for i, text in enumerate(texts)
    ]  # fmt: skip
    vectors = rng.standard_normal((len(texts), DIM)).astype(np.float32)
    return store.replace_document(
        path=f"/docs/{name}", root_id=root_id, size=1, mtime=time.time(), content_hash=str(hash(tuple(texts))),
        loader="test:1", chunks=chunks, vectors=vectors, model_id=MODEL,
    )  # fmt: skip


def fill(db: Path, docs: int = 200) -> Store:
    store = Store(db, keyword_index=True)
    root = store.add_root("/docs")
    store.ensure_embedder(MODEL, DIM)
    pieces = stdlib_pieces(docs * PER_DOC)
    for d in range(docs):
        part = pieces[d * PER_DOC : (d + 1) * PER_DOC]
        put(store, root.id, f"{part[0][0]}-{d:04d}", [text for _, text in part])
    return store


def fts5(store: Store, query: str, k: int, documents: set[int] | None = None) -> list[int]:
    with Store(store.path, keyword_index=False) as plain:
        return [cid for cid, _ in plain.keyword_search(keyword_query(query), k, documents)]


def fts5_matches(store: Store, query: str) -> set[int]:
    rows = store._read().execute(
        "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ?", (keyword_query(query),)
    )
    return {r[0] for r in rows}


def accelerated(store: Store, query: str, k: int = 10, documents: set[int] | None = None) -> list[int]:
    found = [cid for cid, _ in store.keyword_search(keyword_query(query), k, documents)]
    assert store._keywords is not None and store._keywords.last_used, "FTS5 answered, not the accelerator"
    return found


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Store:
    store = fill(tmp_path_factory.mktemp("kw") / "index.db")
    assert store.keyword_index_ready() is not None
    yield store
    store.close()


def test_finds_only_what_fts5_matches_and_ranks_like_it(filled) -> None:
    overlaps = []
    for query in QUERIES:
        mine = accelerated(filled, query)
        theirs = fts5(filled, query, 10)
        assert len(mine) == len(theirs) == 10, query
        assert set(mine) <= fts5_matches(filled, query), query  # every hit contains a query word
        overlaps.append(len(set(mine) & set(theirs)) / 10)
        assert mine[0] in fts5(filled, query, 3), query  # its best is among FTS5's first three
    assert np.mean(overlaps) >= 0.75, overlaps


def test_words_of_the_heading_path_are_found(tmp_path: Path) -> None:
    store = fill(tmp_path / "index.db", docs=20)
    put(store, store.roots()[0].id, "guide", ["plain words", "more plain words", "other"],
        headings=["Vexmoor procedures", "Vexmoor appendix", "Index"])  # fmt: skip
    assert store.keyword_index_ready() is not None
    found = accelerated(store, "vexmoor")
    assert set(found) == fts5_matches(store, "vexmoor") and len(found) == 2
    store.close()


def test_filters_apply_before_ranking(filled) -> None:
    docs = filled.documents()
    allowed = {docs[3].id, docs[50].id}
    found = accelerated(filled, "return self value", k=50, documents=allowed)
    assert found and {filled.chunk_hits(found)[cid].document_id for cid in found} <= allowed
    assert set(found) == set(fts5(filled, "return self value", 50, allowed))
    assert accelerated(filled, "return", documents={10**9}) == []


def test_writes_are_seen_by_the_next_search(tmp_path: Path) -> None:
    store = fill(tmp_path / "index.db", docs=30)
    assert store.keyword_index_ready() is not None
    root = store.roots()[0].id
    put(store, root, "fresh", ["the zyxquorbal ledger is kept in the vault", "nothing to see"])
    found = accelerated(store, "zyxquorbal")
    assert [store.chunk_hits(found)[c].path for c in found] == ["/docs/fresh"]
    put(store, root, "fresh", ["the ledger moved to the plimbrook archive"])  # a new version
    assert accelerated(store, "zyxquorbal") == []
    assert len(accelerated(store, "plimbrook")) == 1
    store.delete_document("/docs/fresh")
    assert accelerated(store, "plimbrook") == []
    store.close()


def test_another_process_writing_is_seen(tmp_path: Path) -> None:
    store = fill(tmp_path / "index.db", docs=30)
    assert store.keyword_index_ready() is not None
    code = f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lorekeeper.server.store import Store
        from test_keyword_index import put
        with Store({str(store.path)!r}, keyword_index=False) as other:
            put(other, other.roots()[0].id, "elsewhere", ["a note about the vorpelline bridge"])
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)
    found = accelerated(store, "vorpelline")
    assert [store.chunk_hits(found)[c].path for c in found] == ["/docs/elsewhere"]
    store.close()


def test_many_changes_are_answered_by_fts5_while_it_catches_up(tmp_path: Path, monkeypatch) -> None:
    store = fill(tmp_path / "index.db", docs=30)
    assert store.keyword_index_ready() is not None
    monkeypatch.setattr(keyword_index, "INLINE_CHANGES", 5)
    root = store.roots()[0].id
    for i in range(4):
        put(store, root, f"batch{i}", [f"entry {j} of the quillomane register" for j in range(5)])
    found = store.keyword_search(keyword_query("quillomane"), 40)
    assert len(found) == 20 and not store._keywords.last_used  # FTS5, correct, while it catches up
    store._keywords.wait()
    assert len(accelerated(store, "quillomane", k=40)) == 20
    store.close()


def test_a_damaged_or_foreign_sidecar_is_rebuilt_and_fts5_answers_meanwhile(tmp_path: Path) -> None:
    store = fill(tmp_path / "index.db", docs=30)
    assert store.keyword_index_ready() is not None
    expected = accelerated(store, QUERIES[0])
    store.close()
    folder = sidecar_dir(tmp_path / "index.db")
    for damage in ("state", "segments", "foreign"):
        if damage == "state":
            (folder / keyword_index.STATE_FILE).write_text("{not json")
        elif damage == "segments":
            for f in folder.iterdir():
                if f.name != keyword_index.STATE_FILE and f.is_file():
                    # new files in their place: truncating a file that a live process still has
                    # mapped would kill that process with SIGBUS, and this one had them mapped
                    f.with_name(f.name + ".bad").write_bytes(b"garbage")
                    os.replace(f.with_name(f.name + ".bad"), f)
        else:
            state = (folder / keyword_index.STATE_FILE).read_text().replace('"index_id": "', '"index_id": "x')
            (folder / keyword_index.STATE_FILE).write_text(state)
        with Store(tmp_path / "index.db", keyword_index=True) as again:
            first = [c for c, _ in again.keyword_search(keyword_query(QUERIES[0]), 10)]
            assert set(first) == set(fts5(again, QUERIES[0], 10)), damage  # FTS5 answered
            assert again.keyword_index_ready() is not None, damage
            assert accelerated(again, QUERIES[0]) == expected, damage


def test_a_writer_held_by_another_process_means_fts5_until_it_is_free(tmp_path: Path) -> None:
    store = fill(tmp_path / "index.db", docs=30)
    assert store.keyword_index_ready() is not None
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, tantivy
            from lorekeeper.server.keyword_index import _schema
            index = tantivy.Index(_schema(), path={str(sidecar_dir(store.path))!r}, reuse=True)
            writer = index.writer(heap_size=20_000_000, num_threads=1)
            print("held", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        put(store, store.roots()[0].id, "late", ["the brasswick kettle"])
        found = store.keyword_search(keyword_query("brasswick"), 10)
        assert len(found) == 1 and not store._keywords.last_used
    finally:
        holder.communicate("go\n", timeout=60)
    assert len(accelerated(store, "brasswick")) == 1
    store.close()


def test_hand_written_fts5_expressions_go_to_fts5(filled) -> None:
    found = filled.keyword_search('"import" AND "os"', 5)
    assert found and not filled._keywords.last_used


@pytest.mark.slow
def test_a_kill_during_updates_leaves_search_in_agreement_with_the_rows(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    fill(db, docs=30).close()
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lorekeeper.server.search import keyword_query
        from lorekeeper.server.store import Store
        from test_keyword_index import put
        store = Store({str(db)!r}, keyword_index=True)
        store.keyword_index_ready()
        root = store.roots()[0].id
        i = 0
        while True:
            put(store, root, f"w{{i % 7}}", [f"round {{i}} of the kestrovane log", "another line"])
            print(i, flush=True)
            store.keyword_search(keyword_query("kestrovane"), 10)
            i += 1
    """)
    )
    rng = np.random.default_rng(7)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        for _ in range(int(rng.integers(3, 25))):
            if not proc.stdout.readline():
                break
        time.sleep(float(rng.uniform(0, 0.05)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Store(db, keyword_index=True) as store:
            assert store.check_integrity() == []
            assert store.keyword_index_ready() is not None
            for query in ("kestrovane log", "round", QUERIES[1]):
                mine = accelerated(store, query, k=200)
                assert set(mine) == set(fts5(store, query, 200)), (trial, query)


def test_closing_the_store_stops_a_rebuild_and_leaves_no_half_made_folder(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(keyword_index, "STOP_CHECK_ROWS", 10)
    fill(tmp_path / "index.db", docs=100).close()
    store = Store(tmp_path / "index.db", keyword_index=True)
    found = store.keyword_search(keyword_query(QUERIES[0]), 10)  # FTS5 answers; a rebuild starts
    assert found and not store._keywords.last_used
    worker = store._keywords._worker
    store.close()
    assert worker is not None and not worker.is_alive()
    assert not list(tmp_path.glob("index.db.tantivy.*")), list(tmp_path.iterdir())
    with Store(tmp_path / "index.db", keyword_index=True) as again:  # whatever was left is usable
        assert again.keyword_index_ready() is not None
        assert set(accelerated(again, QUERIES[0])) <= fts5_matches(again, QUERIES[0])


def test_indexing_commands_leave_the_ranker_ready_for_the_next_process(tmp_path: Path) -> None:
    """`add` and `reindex` end by bringing it up to date; a new process's first search uses it."""
    from lorekeeper.server.cli.index import ready_for_search

    db = tmp_path / "index.db"
    fill(db, docs=20).close()
    assert not sidecar_dir(db).exists()
    with Store(db, keyword_index=True) as store:
        ready_for_search(store)
    assert (sidecar_dir(db) / keyword_index.STATE_FILE).is_file()
    assert sidecar_dir(db).stat().st_mode & 0o077 == 0  # it holds the files' words: private
    with Store(db, keyword_index=True) as again:
        assert accelerated(again, QUERIES[0])  # the first search, answered by Tantivy
