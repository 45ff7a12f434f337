"""The watcher on a real folder: every change lands in search, waiting on events with a deadline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from fakes import HashEmbedder

from lorekeeper.server.indexer import BATCH_SECONDS, Indexer
from lorekeeper.server.search import search
from lorekeeper.server.store import Store
from lorekeeper.server.watcher import Watcher


class Events:
    """Collects the store's committed changes so a test can wait for a specific one."""

    def __init__(self, store: Store) -> None:
        self.seen: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        store.add_listener(self._on)

    def _on(self, event: str, path: str) -> None:
        with self._cond:
            self.seen.append((event, path))
            self._cond.notify_all()

    def wait(self, event: str, path: Path | str, timeout: float = 20.0) -> None:
        target = (event, str(path))
        with self._cond:
            if not self._cond.wait_for(lambda: target in self.seen, timeout=timeout):
                raise AssertionError(f"no {event} event for {path} within {timeout} s; saw {self.seen[-10:]}")


@pytest.fixture
def watched(indexer: Indexer, store: Store, docs: Path):
    (docs / "start.md").write_text("# Start\nThe lighthouse keeper logs the weather every morning.\n")
    indexer.add_root(docs)
    events = Events(store)
    watcher = Watcher(indexer, debounce=0.1, reconcile_interval=3600)
    watcher.start()
    assert watcher.wait_idle(30)
    yield docs.resolve(), watcher, events
    watcher.stop()


def top_path(store: Store, embedder, query: str) -> str | None:
    hits = search(store, embedder, query, k=1)
    return hits[0].path if hits else None


def test_add_modify_delete_rename_while_watching(watched, store: Store, embedder, counting_embedder) -> None:
    docs, watcher, events = watched
    new = docs / "whales.md"
    new.write_text("# Whales\nHumpback whales migrate to warm waters to breed in winter.\n")
    events.wait("indexed", new)
    assert top_path(store, embedder, "where do humpbacks go to breed") == str(new)

    new.write_text("# Whales\nBlue whales are the largest animals that ever lived.\n")
    events.seen.clear()
    events.wait("indexed", new)
    assert "largest animals" in store.document_chunks(new)[0].text
    assert search(store, embedder, "humpback breed warm waters", k=5, mode="keyword") == []

    before = counting_embedder.embedded
    renamed = docs / "ocean" / "blue-whales.md"
    renamed.parent.mkdir()
    os.rename(new, renamed)
    events.wait("moved", renamed)
    assert store.get_document(new) is None
    assert top_path(store, embedder, "largest animal ever") == str(renamed)
    assert counting_embedder.embedded == before  # a rename re-embeds nothing

    renamed.unlink()
    events.wait("removed", renamed)
    assert store.get_document(renamed) is None
    assert watcher.wait_idle(20)
    assert store.check_integrity() == []


def test_editor_save_via_temporary_file(watched, store: Store) -> None:
    """Editors write a temporary file and rename it over the original."""
    docs, watcher, events = watched
    target = docs / "start.md"
    temp = docs / ".start.md.tmp"
    temp.write_text("# Start\nThe keeper now logs the tides at dusk.\n")
    os.replace(temp, target)
    events.wait("indexed", target)
    assert "tides at dusk" in store.document_chunks(target)[0].text
    assert watcher.wait_idle(20)
    assert [d.path for d in store.documents()] == [str(target)]


def test_burst_of_files_and_a_folder_moved_in(watched, store: Store, tmp_path: Path) -> None:
    docs, watcher, events = watched
    for i in range(150):
        (docs / f"burst{i:03}.txt").write_text(f"Burst note {i}: the ferry leaves at {i % 24}:00.\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(5):
        (outside / f"moved{i}.md").write_text(f"# Moved {i}\nA note about kites, number {i}.\n")
    os.rename(outside, docs / "kites")
    for i in range(5):
        events.wait("indexed", docs / "kites" / f"moved{i}.md")
    assert watcher.wait_idle(60)
    assert store.status().documents == 1 + 150 + 5
    assert store.check_integrity() == []


def test_ignored_files_and_bad_files_do_not_stop_the_watcher(watched, store: Store, embedder) -> None:
    docs, watcher, events = watched
    (docs / "node_modules").mkdir()
    (docs / "node_modules" / "lib.md").write_text("# Library\nvendored\n")
    (docs / "blob.txt").write_bytes(b"\x00\xff" * 1000)
    good = docs / "after.md"
    good.write_text("# After\nThe watcher keeps going after a binary file.\n")
    events.wait("failed", docs / "blob.txt")
    events.wait("indexed", good)
    assert watcher.wait_idle(20)
    assert store.get_document(docs / "node_modules" / "lib.md") is None
    assert top_path(store, embedder, "keeps going after binary") == str(good)

    # a .gitignore written while watching applies at once
    (docs / ".gitignore").write_text("after.md\n")
    events.wait("removed", good)


def test_restart_reconciles_changes_made_while_stopped(
    indexer: Indexer, store: Store, docs: Path, embedder
) -> None:
    keep = docs / "keep.md"
    drop = docs / "drop.md"
    keep.write_text("# Keep\nOriginal text about owls.\n")
    drop.write_text("# Drop\nThis file will be deleted.\n")
    indexer.add_root(docs)
    with Watcher(indexer, debounce=0.1) as watcher:
        assert watcher.wait_idle(30)
    assert store.status().documents == 2
    # changes while nothing watches
    keep.write_text("# Keep\nRewritten text about falcons.\n")
    drop.unlink()
    (docs / "new.md").write_text("# New\nA note written while lorekeeper was stopped.\n")
    with Watcher(indexer, debounce=0.1) as watcher:
        assert watcher.wait_idle(30)
    docs_now = sorted(Path(d.path).name for d in store.documents())
    assert docs_now == ["keep.md", "new.md"]
    assert "falcons" in store.document_chunks(keep.resolve())[0].text


def test_polling_fallback(indexer: Indexer, store: Store, docs: Path) -> None:
    indexer.add_root(docs)
    events = Events(store)
    with Watcher(indexer, debounce=0.05, force_polling=True, poll_interval=0.2) as watcher:
        assert watcher.modes == {str(docs.resolve()): "polling"}
        note = docs.resolve() / "polled.md"
        note.write_text("# Polled\nFound by polling.\n")
        events.wait("indexed", note)


class SlowHashEmbedder(HashEmbedder):
    """The hashing fake at the pace of a real model on a busy machine: a call costs its number of
    texts times its longest text (a real batch is padded to it), 60 us per character. Each
    call's modelled cost is kept with the thread that made it."""

    SECONDS_PER_CHAR = 6e-5

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def embed(self, texts):
        cost = self.SECONDS_PER_CHAR * len(texts) * max(map(len, texts), default=0)
        self.calls.append((threading.current_thread().name, cost))
        time.sleep(cost)
        return super().embed(texts)


@pytest.mark.slow
def test_a_small_file_saved_while_a_large_one_is_embedded_does_not_wait_for_it(
    store: Store, docs: Path
) -> None:
    embedder = SlowHashEmbedder()
    indexer = Indexer(store, embedder)
    indexer.add_root(docs)
    events = Events(store)
    with Watcher(indexer, debounce=0.05, reconcile_interval=3600) as watcher:
        assert watcher.wait_idle(30)
        for i in range(3):  # short notes first: the embedder's pace is learned on short texts
            note = docs.resolve() / f"note-{i}.md"
            note.write_text(f"# Note {i}\nA short note.\n")
            events.wait("indexed", note)
        big = docs.resolve() / "changelog"
        big.write_text("\n\n".join(f"Release {i}: " + "fixed the ferry timetable " * 30 for i in range(150)))
        wait_for(lambda: indexer.activity.get(str(big), (0, 0))[0] > 0)  # the large file is being embedded
        small = docs.resolve() / "small.md"
        small.write_text("# Small\nA note saved while the changelog is embedded.\n")
        events.wait("indexed", small)
        assert ("indexed", str(big)) not in events.seen  # it did not wait behind the large file
        progress = watcher.progress()
        assert str(big) in progress["large_files"] and watcher.pending() >= 1
        events.wait("indexed", big, timeout=120)
        assert watcher.wait_idle(30)
    assert store.check_integrity() == []
    # a file saved waits at most for the embedder call in flight: the large file's calls stay short
    # even though the pace was learned on short notes (its first call is sized before any pace of its own)
    background = [cost for thread, cost in embedder.calls if thread.endswith("background")]
    assert len(background) > 10 and max(background[1:]) <= 2 * BATCH_SECONDS, background


@pytest.mark.parametrize("pause", [0.0, 0.4])
def test_folder_round_trip_out_and_back_is_caught_without_a_reconcile(
    store: Store, tmp_path: Path, docs: Path, pause: float
) -> None:
    """Move a subfolder out of the root, rename its parent, move the subfolder back, rename the
    parent again, editing on the way: the index matches the disk long before a periodic reconcile."""
    root = docs.resolve()
    (root / "parent" / "sub").mkdir(parents=True)
    (root / "parent" / "sub" / "a.txt").write_text("alpha original text\n")
    (root / "parent" / "b.txt").write_text("bravo text\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    indexer = Indexer(store, HashEmbedder())
    indexer.add_root(root)
    with Watcher(indexer, debounce=0.1, reconcile_interval=3600) as watcher:
        assert watcher.wait_idle(30)
        steps = [
            lambda: os.rename(root / "parent" / "sub", outside / "sub"),
            lambda: (outside / "sub" / "made-outside.txt").write_text("delta written outside\n"),
            lambda: os.rename(root / "parent", root / "parent2"),
            lambda: os.rename(outside / "sub", root / "parent2" / "sub"),
            lambda: os.rename(root / "parent2", root / "parent"),
            lambda: (root / "parent" / "sub" / "new.txt").write_text("charlie new file\n"),
            lambda: (root / "parent" / "sub" / "a.txt").write_text("alpha edited text\n"),
        ]
        for step in steps:
            step()
            if pause:
                time.sleep(pause)  # events apart, as a person would make them

        def on_disk() -> dict[str, str]:
            return {str(p): p.read_text().strip() for p in root.rglob("*.txt")}

        def indexed() -> dict[str, str]:
            return {
                d.path: " ".join(c.text for c in store.document_chunks(d.path)) for d in store.documents()
            }

        wait_for(lambda: watcher.wait_idle(1) and indexed() == on_disk(), timeout=30)
    assert store.check_integrity() == []


def _index_equals_disk(store: Store, root: Path) -> bool:
    on_disk = {str(p): p.read_text() for p in root.rglob("*") if p.is_file()}
    indexed = {d.path: "".join(c.text for c in store.document_chunks(d.path)) for d in store.documents()}
    return set(indexed) == set(on_disk) and all(on_disk[p].strip() in indexed[p] for p in on_disk)


def test_renames_and_saves_right_after_a_folder_moves_in_leave_no_stale_document(
    watched, store: Store, tmp_path: Path
) -> None:
    """Found by scripts/watch_endurance.py (seeds 7 and 11): a file renamed and then saved over with
    a temporary file (or saved, then renamed) within the debounce window left its old document in
    the index; here right after its folder moved into the root, and a file deleted beside it."""
    docs, watcher, _ = watched
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("keep", "save-then-rename", "rename-then-save", "delete", "vim"):
        (outside / f"{name}.txt").write_text(f"the {name} note about kites\n")
    (docs / "root-note.txt").write_text("a note about tides at the root\n")
    assert wait_for(lambda: watcher.wait_idle(1) and _index_equals_disk(store, docs), timeout=30)

    moved = docs / "back1"
    os.rename(outside, moved)
    (moved / ".tmp1").write_text("saved over, then renamed\n")
    os.replace(moved / ".tmp1", moved / "save-then-rename.txt")
    os.replace(moved / "save-then-rename.txt", docs / "renamed-away.txt")
    os.replace(moved / "rename-then-save.txt", moved / "renamed.txt")
    (moved / ".tmp2").write_text("renamed, then saved over\n")
    os.replace(moved / ".tmp2", moved / "renamed.txt")
    (moved / "delete.txt").unlink()
    os.replace(moved / "vim.txt", moved / "vim.txt~")
    (moved / "vim.txt").write_text("written the way vim saves\n")
    (moved / "vim.txt~").unlink()
    os.replace(docs / "root-note.txt", docs / "root-renamed.txt")  # the same at the root, long indexed
    (docs / ".tmp3").write_text("the root note, saved over after its rename\n")
    os.replace(docs / ".tmp3", docs / "root-renamed.txt")

    assert wait_for(lambda: watcher.wait_idle(1) and _index_equals_disk(store, docs), timeout=30)
    assert store.check_integrity() == []


def test_coalesced_moves_look_again_at_every_displaced_path(
    indexer: Indexer, store: Store, docs: Path
) -> None:
    """The exact event sequences, fed in one debounce window (no OS timing involved)."""
    root = docs.resolve()
    for name in ("a", "c", "e"):
        (root / f"{name}.txt").write_text(f"note {name}\n")
    indexer.add_root(root)
    watcher = Watcher(indexer, debounce=60, reconcile_interval=3600)  # never started: events by hand
    # a -> b, then an editor's save onto b: a's document must go
    os.replace(root / "a.txt", root / "b.txt")
    watcher.notify_move(str(root / "a.txt"), str(root / "b.txt"))
    (root / ".t1").write_text("b saved\n")
    watcher.notify(str(root / ".t1"))
    os.replace(root / ".t1", root / "b.txt")
    watcher.notify_move(str(root / ".t1"), str(root / "b.txt"))
    # an editor's save onto c, then c -> d: c's document must go
    (root / ".t2").write_text("c saved\n")
    watcher.notify(str(root / ".t2"))
    os.replace(root / ".t2", root / "c.txt")
    watcher.notify_move(str(root / ".t2"), str(root / "c.txt"))
    os.replace(root / "c.txt", root / "d.txt")
    watcher.notify_move(str(root / "c.txt"), str(root / "d.txt"))
    # e -> f -> e: the document stays, with the text on disk
    os.replace(root / "e.txt", root / "f.txt")
    watcher.notify_move(str(root / "e.txt"), str(root / "f.txt"))
    (root / "f.txt").write_text("note e, edited on the way\n")
    os.replace(root / "f.txt", root / "e.txt")
    watcher.notify_move(str(root / "f.txt"), str(root / "e.txt"))

    watcher._process(dict(watcher._pending))
    assert sorted(Path(d.path).name for d in store.documents()) == ["b.txt", "d.txt", "e.txt"]
    assert _index_equals_disk(store, root)


def test_a_store_that_cannot_be_written_is_one_clear_log_line_and_the_watcher_goes_on(
    watched, store: Store, monkeypatch, caplog
) -> None:
    """A full disk (or a lost database server) is logged as its message, which says what to do,
    without a traceback; the watcher keeps running and indexes the file once writes work again."""
    import logging

    from lorekeeper.server.store import StoreWriteError

    docs, watcher, _events = watched
    real = store.replace_document

    def full_disk(**kwargs):
        raise StoreWriteError(f"cannot write the index {store.path}: the disk is full; free space and retry")

    monkeypatch.setattr(store, "replace_document", full_disk)
    with caplog.at_level(logging.ERROR, logger="lorekeeper"):
        (docs / "blocked.md").write_text("# Blocked\nThe quartermaster counts ropes at noon.\n")
        assert wait_for(lambda: watcher.errors, 20)
        assert watcher.wait_idle(20)
    records = [r for r in caplog.records if "the disk is full" in r.getMessage()]
    assert records and all(r.exc_info is None for r in records), [r.getMessage() for r in caplog.records]
    assert "blocked.md" in records[0].getMessage()
    assert not any("Traceback" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(store, "replace_document", real)
    (docs / "blocked.md").write_text("# Blocked\nThe quartermaster counts ropes at dusk.\n")
    assert wait_for(lambda: store.get_document(docs / "blocked.md") is not None, 20)
