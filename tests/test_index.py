"""The index on real files and the real embedder: incremental indexing, moves, ignore rules,
filters, bad input, crash consistency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from lorekeeper.server.indexer import Indexer
from lorekeeper.server.search import search
from lorekeeper.server.store import Store

GARDEN = """# Garden notes

## Tomatoes
Tomatoes want six hours of direct sun and deep watering twice a week.
Pinch out the side shoots so the plant puts its energy into fruit.

## Roses
Roses prefer slightly acidic soil. Feed them bone meal in early spring
and prune hard in late winter.
"""

OFFICE = """The quarterly budget review happens in the second week of March.

The coffee machine is on the third floor, next to the printer.

Expense reports are due on the fifth working day of each month.
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def paths_of(hits) -> list[str]:
    return [Path(h.path).name for h in hits]


@pytest.fixture
def garden(docs: Path) -> Path:
    write(docs / "garden.md", GARDEN)
    write(docs / "office.txt", OFFICE)
    return docs


def test_index_and_search_with_provenance(indexer: Indexer, store: Store, garden: Path, embedder) -> None:
    report = indexer.add_root(garden)
    assert report.indexed == 2 and report.failed == 0

    hits = search(store, embedder, "how often should I water tomato plants", k=3)
    top = hits[0]
    assert top.path == str(garden / "garden.md")
    assert top.heading_path == ["Garden notes", "Tomatoes"]
    lines = (garden / "garden.md").read_text().splitlines()
    assert "Tomatoes want six hours" in "\n".join(lines[top.start_line - 1 : top.end_line])

    hits = search(store, embedder, "expense reports deadline", k=2, mode="keyword")
    assert paths_of(hits)[0] == "office.txt"
    assert "fifth working day" in hits[0].text

    status = store.status()
    assert status.documents == 2 and status.roots[0].path == str(garden.resolve())
    assert status.embed_model == embedder.model_id and status.embed_dim == 384
    assert store.check_integrity() == []


def test_unchanged_files_cost_no_embedding(indexer: Indexer, garden: Path, counting_embedder) -> None:
    indexer.add_root(garden)
    first = counting_embedder.embedded
    assert first > 0
    (garden / "office.txt").touch()  # new mtime, same bytes
    report = indexer.reconcile()
    assert report.unchanged == 2
    assert counting_embedder.embedded == first


def test_modified_file_replaces_its_chunks(indexer: Indexer, store: Store, garden: Path, embedder) -> None:
    indexer.add_root(garden)
    write(garden / "office.txt", "The coffee machine moved to the basement kitchen.\n")
    assert indexer.index_file(garden / "office.txt") == "indexed"
    texts = [c.text for c in store.document_chunks(garden / "office.txt")]
    assert texts == ["The coffee machine moved to the basement kitchen."]
    assert search(store, embedder, "quarterly budget review March", k=5, mode="keyword") == []
    assert store.check_integrity() == []


def test_deleted_file_leaves_the_index(indexer: Indexer, store: Store, garden: Path, embedder) -> None:
    indexer.add_root(garden)
    (garden / "office.txt").unlink()
    report = indexer.reconcile()
    assert report.removed == 1
    assert store.get_document(garden / "office.txt") is None
    assert all(Path(h.path).name != "office.txt" for h in search(store, embedder, "coffee machine", k=5))
    assert store.check_integrity() == []


def test_rename_and_copy_reembed_nothing(
    indexer: Indexer, store: Store, garden: Path, counting_embedder
) -> None:
    indexer.add_root(garden)
    before = counting_embedder.embedded
    (garden / "archive").mkdir()
    os.rename(garden / "garden.md", garden / "archive" / "plants.md")
    report = indexer.reconcile()
    assert report.moved == 1 and report.removed == 0
    assert store.get_document(garden / "garden.md") is None
    assert store.get_document(garden / "archive" / "plants.md").chunk_count > 0

    # a copy, even in another format, finds its chunks in the embedding cache
    write(garden / "plants-copy.markdown", GARDEN)
    report = indexer.reconcile()
    assert report.indexed == 1 and report.cached_chunks > 0
    assert counting_embedder.embedded == before
    hits = search(store, counting_embedder, "acidic soil for roses", k=3)
    assert hits[0].path.endswith(("plants.md", "plants-copy.markdown"))
    assert len(hits[0].also_in) == 1  # the duplicate collapses into one hit that names both files


def test_changing_the_embedder_reembeds_everything(store: Store, garden: Path, counting_embedder) -> None:
    Indexer(store, counting_embedder).add_root(garden)
    n_chunks = store.status().chunks
    # an index built with another model: its vectors must not be mixed with MiniLM's
    store.ensure_embedder("some-older-model", 384)
    assert store.embed_model == "some-older-model"
    store._writer.execute("DELETE FROM embedding_cache")
    counting_embedder.embedded = 0

    indexer = Indexer(store, counting_embedder)
    assert store.embed_model == counting_embedder.model_id
    assert len(store.chunks_missing_vectors()) == n_chunks
    indexer.reconcile()
    assert counting_embedder.embedded == n_chunks
    assert store.chunks_missing_vectors() == []
    assert store.check_integrity() == []
    assert search(store, counting_embedder, "roses", k=1)[0].path.endswith("garden.md")


def test_ignore_rules(indexer: Indexer, store: Store, docs: Path) -> None:
    write(docs / "keep.md", "# Keep\nThis note is indexed.\n")
    write(docs / "node_modules" / "pkg" / "README.md", "# Package\nnot mine\n")
    write(docs / ".git" / "notes.txt", "git internals\n")
    write(docs / "draft.md.swp", "swap file\n")
    write(docs / ".gitignore", "secret/\n*.log\n")
    write(docs / "secret" / "plan.md", "# Plan\nhidden\n")
    write(docs / "debug.log", "log line\n")
    write(docs / "sub" / ".lorekeeperignore", "private.txt\n")
    write(docs / "sub" / "private.txt", "private\n")
    write(docs / "sub" / "public.txt", "public\n")
    indexer.add_root(docs)
    indexed = sorted(Path(d.path).relative_to(docs.resolve()).as_posix() for d in store.documents())
    assert indexed == ["keep.md", "sub/public.txt"]


def test_filters(indexer: Indexer, store: Store, docs: Path, embedder) -> None:
    write(docs / "notes" / "tea.md", "# Tea\nGreen tea steeps at 80 degrees for two minutes.\n")
    write(docs / "recipes" / "tea.txt", "Black tea steeps at 95 degrees for four minutes.\n")
    write(docs / "recipes" / "bread.md", "# Bread\nBread rises for two hours before baking.\n")
    old = docs / "recipes" / "tea.txt"
    os.utime(old, (time.time() - 86400 * 30, time.time() - 86400 * 30))
    indexer.add_root(docs)

    def names(**filters) -> set[str]:
        hits = search(store, embedder, "tea steeping temperature", k=10, **filters)
        return {Path(h.path).relative_to(docs.resolve()).as_posix() for h in hits}

    assert names(path_glob="notes/**") == {"notes/tea.md"}
    assert names(path_glob="*.txt") == {"recipes/tea.txt"}
    assert names(file_types=["md"]) == {"notes/tea.md", "recipes/bread.md"}
    assert names(modified_after=time.time() - 86400) == {"notes/tea.md", "recipes/bread.md"}
    assert names(root=str(docs)) == {"notes/tea.md", "recipes/tea.txt", "recipes/bread.md"}
    assert names(path_glob="nothing/*") == set()
    for mode in ("vector", "keyword"):
        assert {
            Path(h.path).name for h in search(store, embedder, "tea", k=10, mode=mode, file_types=[".txt"])
        } == {"tea.txt"}


def test_bad_search_arguments(store: Store, embedder) -> None:
    for kwargs, message in (
        ({"query": "  "}, "query is empty"),
        ({"query": "x", "k": 0}, "out of range"),
        ({"query": "x", "k": 10_000}, "out of range"),
        ({"query": "x", "mode": "magic"}, "unknown"),
    ):
        with pytest.raises(ValueError, match=message):
            search(store, embedder, **kwargs)


def test_bad_input_is_recorded_and_nothing_else_is_lost(
    indexer: Indexer, store: Store, garden: Path, embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    indexer.add_root(garden)
    (garden / "empty.txt").write_bytes(b"")
    (garden / "binary.txt").write_bytes(b"\x00\x01\x02 not text \x00" * 100)
    (garden / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e recipe.\n".encode("latin-1"))
    with open(garden / "huge.txt", "wb") as handle:  # sparse: 200 MB on paper, nothing on disk
        handle.truncate(200 * 1024 * 1024)
    (garden / "corrupt.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog broken")
    os.symlink("loop.md", garden / "loop.md")
    report = indexer.reconcile()

    by_path = {Path(f.path).name: f for f in store.status().failed}
    assert by_path["empty.txt"].status == "skipped" and "empty" in by_path["empty.txt"].error
    assert by_path["binary.txt"].status == "failed" and "binary" in by_path["binary.txt"].error
    assert by_path["huge.txt"].status == "skipped" and "200.0 MB" in by_path["huge.txt"].error
    assert "config set max_file_mb" in by_path["huge.txt"].error
    assert by_path["corrupt.pdf"].status == "failed" and "PDF" in by_path["corrupt.pdf"].error
    assert by_path["loop.md"].status == "failed" and "symlink loop" in by_path["loop.md"].error
    # invalid UTF-8 is indexed, with a note saying what was done about it
    latin = store.get_document(garden / "latin1.txt")
    assert latin.status == "indexed" and latin.note
    assert report.failed + report.skipped == 5

    # a file deleted between the event and the read is simply gone, not an error
    (garden / "gone.md").write_text("# Gone\nsoon\n")
    path = str(garden / "gone.md")
    os.unlink(path)
    assert indexer.index_files([path]).outcomes[path] == "removed"

    # the good documents are untouched and the index is consistent
    assert search(store, embedder, "tomatoes sun watering", k=1)[0].path.endswith("garden.md")
    assert store.status().documents == 3
    assert store.check_integrity() == []

    # a failed file is retried once it changes, and then indexed
    (garden / "binary.txt").write_text("Now it is text about binary search trees.\n")
    assert indexer.index_file(garden / "binary.txt") == "indexed"


def test_unreadable_file(tmp_path: Path, docs: Path) -> None:
    """Permission denied is recorded with a reason. Root reads anything, so as root the indexing runs
    in a child process without the capabilities that bypass file permissions (util-linux setpriv)."""
    write(docs / "ok.txt", "Readable note about sailing.\n")
    write(docs / "locked.txt", "You cannot read me.\n")
    os.chmod(docs / "locked.txt", 0o000)
    code = textwrap.dedent(
        f"""
        import json
        from lorekeeper.server.store import Store
        from lorekeeper.server.indexer import Indexer
        store = Store.open({str(tmp_path / "perm.db")!r})
        Indexer(store).add_root({str(docs)!r})
        print(json.dumps({{f.path: f.error for f in store.status().failed}}))
        """
    )
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    locked = str((docs / "locked.txt").resolve())
    assert list(failed) == [locked]
    assert "permission denied" in failed[locked]


@pytest.mark.slow
def test_crash_mid_indexing_leaves_a_consistent_index(tmp_path: Path, docs: Path) -> None:
    """SIGKILL while a big folder is being indexed; the index must open consistent and catch up."""
    for i in range(120):
        write(docs / f"note{i:03}.txt", f"Note number {i}.\n\n" + OFFICE * 3)
    db = tmp_path / "crash.db"
    code = textwrap.dedent(
        f"""
        from lorekeeper.server.store import Store
        from lorekeeper.server.indexer import Indexer
        import lorekeeper.server.indexer as ix
        ix.EMBED_BATCH_CHUNKS = 8   # many small transactions, so the kill lands between and inside them
        Indexer(Store.open({str(db)!r})).add_root({str(docs)!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if db.exists():
                try:
                    probe = Store.open(db)
                    done = probe._read().execute("SELECT COUNT(*) FROM documents").fetchone()[0]
                    probe.close()
                except Exception:
                    done = 0
                if done >= 10:
                    break
            time.sleep(0.05)
        assert child.poll() is None, "the indexer finished before it could be interrupted"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    store = Store.open(db)
    try:
        assert store.check_integrity() == []
        partial = store.status().documents
        assert 10 <= partial < 120
        from lorekeeper import plugins

        Indexer(store, plugins.get_embedder()).reconcile()
        assert store.status().documents == 120
        assert store.check_integrity() == []
    finally:
        store.close()


# -- queries while indexing ------------------------------------------------------------------------


def test_query_first_lock_lets_a_query_jump_the_queue_of_batches() -> None:
    from lorekeeper.plugins.base import QueryFirstLock

    lock = QueryFirstLock()
    order: list[str] = []
    lock.acquire()  # a batch is running
    waiting = threading.Barrier(3)

    def batch(name: str) -> None:
        waiting.wait()
        with lock.hold():
            order.append(name)

    def query() -> None:
        waiting.wait()
        time.sleep(0.2)  # arrives after the next batch is already waiting
        with lock.hold(urgent=True):
            order.append("query")

    threads = [threading.Thread(target=batch, args=("batch",)), threading.Thread(target=query)]
    for thread in threads:
        thread.start()
    waiting.wait()
    wait_for(lambda: lock._urgent_waiting == 1)
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == ["query", "batch"]


@pytest.mark.slow
def test_a_query_does_not_wait_for_a_long_embedding_run(embedder) -> None:
    """The real embedder indexing many texts in one call: a query embeds between two of its batches."""
    texts = [f"Paragraph {i} about harbours, tides and the ferry timetable." * 4 for i in range(640)]
    finished: list[str] = []
    indexing = threading.Thread(target=lambda: (embedder.embed(texts), finished.append("indexing")))
    indexing.start()
    time.sleep(0.5)  # the indexing run has started its batches
    vector = embedder.embed_query("when does the ferry leave")
    finished.append("query")
    indexing.join(600)
    assert finished == ["query", "indexing"] and vector.shape == (embedder.dimension,)


def test_type_filter_takes_every_spelling_of_a_format_and_names_unknown_types(
    indexer: Indexer, store: Store, docs: Path, embedder
) -> None:
    write(docs / "a.md", "# Kites\nKites fly in the wind.\n")
    write(docs / "b.markdown", "# Kites\nKites fly high in strong wind.\n")
    write(docs / "c.txt", "Kites in plain text, flying in wind.\n")
    write(docs / "copyright", "Kites copyright notice, wind and all.\n")
    indexer.add_root(docs)
    found = {Path(h.path).name for h in search(store, embedder, "kites wind", k=10, file_types=["md"])}
    assert found == {"a.md", "b.markdown"}
    found = {Path(h.path).name for h in search(store, embedder, "kites wind", k=10, file_types=["text"])}
    assert found == {"c.txt", "copyright"}  # the loader's name also takes files read by content
    with pytest.raises(ValueError, match=r"unknown file type foo: .*known types: .*markdown.*pdf"):
        search(store, embedder, "kites", file_types=["foo"])


@pytest.mark.parametrize("query", ['AND OR "(', "NOT", "((", "NEAR AND"])
def test_a_query_of_only_operators_is_refused_not_answered_with_anything(store: Store, query: str) -> None:
    with pytest.raises(ValueError, match="no words to search for"):
        search(store, None, query, mode="keyword")
