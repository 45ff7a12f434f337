"""What the indexer must never do: read outside the watched folders, keep text a file no longer
has, leave the index readable by others, blow up on one file, or leave a file out without a word.

The embedder is the hashing fake (``tests/fakes.py``): these are properties of reading, storing and
recording, not of the model.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
from fakes import HashEmbedder

from lorekeeper.server.indexer import Indexer
from lorekeeper.server.search import search
from lorekeeper.server.settings import Settings
from lorekeeper.server.store import Store

TESTS = Path(__file__).parent
SECRET = "TOPSECRET-marker root:x:0:0 lives outside the folder"


@pytest.fixture
def fake_indexer(store: Store) -> Indexer:
    return Indexer(store, HashEmbedder())


def chunk_texts(store: Store) -> list[str]:
    return [row[0] for row in store._read().execute("SELECT text FROM chunks")]


# -- the symlink race ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_file_flipping_to_a_symlink_never_lets_outside_text_in(fake_indexer: Indexer, store: Store,
                                                                  docs: Path, tmp_path: Path) -> None:  # fmt: skip
    """A file flipped between a regular file and a symlink out of the folder while it is indexed
    again and again: the outside text never reaches the index, under the file's name or any other."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(SECRET + "\n")
    race = docs / "race.txt"
    race.write_text("An ordinary note about sailing boats.\n")
    fake_indexer.add_root(docs)
    stop = threading.Event()

    def flip() -> None:
        temp = docs / "race.tmp"
        while not stop.is_set():
            os.symlink(outside / "passwd", temp)
            os.replace(temp, race)  # now a link out of the folder
            temp.write_text(f"An ordinary note about sailing boats, {time.monotonic()}.\n")
            os.replace(temp, race)  # a regular file again

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        deadline = time.monotonic() + 8
        calls = 0
        while time.monotonic() < deadline:
            fake_indexer.index_file(race)
            calls += 1
            assert not any("TOPSECRET" in text for text in chunk_texts(store)), f"leaked after {calls} calls"
    finally:
        stop.set()
        flipper.join()
    assert calls > 50
    # ends as a link out of the folder: recorded as skipped, with no chunks left
    os.symlink(outside / "passwd", docs / "race.tmp")
    os.replace(docs / "race.tmp", race)
    fake_indexer.reconcile()
    doc = store.get_document(race)
    assert doc.status == "skipped" and "outside the watched folders" in doc.error
    assert doc.chunk_count == 0 and store.document_chunks(race) == []
    assert not any("TOPSECRET" in text for text in chunk_texts(store))
    assert store.check_integrity() == []


def test_document_text_reads_through_the_same_check(
    fake_indexer: Indexer, docs: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text(SECRET)
    (docs / "note.txt").write_text("Plain note.\n")
    fake_indexer.add_root(docs)
    os.symlink(tmp_path / "secret.txt", docs / "link.txt")
    from lorekeeper.plugins.base import LoaderError

    assert fake_indexer.document_text(docs / "note.txt") == "Plain note."
    with pytest.raises(LoaderError, match="outside the watched folders"):
        fake_indexer.document_text(docs / "link.txt")
    with pytest.raises(LoaderError, match="not inside a watched folder"):
        fake_indexer.document_text(tmp_path / "secret.txt")


@pytest.mark.parametrize("change", ["symlink out", "too large", "binary", "deleted", "bad save"])
def test_a_document_that_stops_loading_drops_its_chunks_unless_it_is_a_bad_save(
    change: str, store: Store, docs: Path, tmp_path: Path
) -> None:
    indexer = Indexer(store, HashEmbedder(), settings=Settings.load({"max_file_mb": 0.05}))
    path = docs / ("report.docx" if change == "bad save" else "note.txt")
    if change == "bad save":
        import docx

        document = docx.Document()
        document.add_paragraph("The lighthouse log for March.")
        document.save(str(path))
    else:
        path.write_text("The lighthouse log for March.\n")
    indexer.add_root(docs)
    assert store.get_document(path).chunk_count == 1
    if change == "symlink out":
        (tmp_path / "elsewhere.txt").write_text("Elsewhere.\n")
        path.unlink()
        os.symlink(tmp_path / "elsewhere.txt", path)
    elif change == "too large":
        path.write_text("lighthouse " * 6000)
    elif change == "binary":
        path.write_bytes(b"\x00\x01lighthouse\x00" * 10)
    elif change == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"PK\x03\x04 half-written")
    indexer.reconcile()
    doc = store.get_document(path)
    hits = search(store, None, "lighthouse", mode="keyword")
    if change == "deleted":
        assert doc is None and hits == []
    elif change == "bad save":  # the last good version stays searchable until the next good save
        assert doc.status == "failed" and doc.chunk_count == 1 and len(hits) == 1
    else:
        assert doc.status in ("failed", "skipped") and doc.chunk_count == 0 and hits == []
    assert store.check_integrity() == []


# -- permissions of the index ----------------------------------------------------------------------


def test_the_index_is_private_and_an_open_one_is_made_private(tmp_path: Path, caplog) -> None:
    db = tmp_path / "private" / "index.db"
    store = Store.open(db)
    store.set_meta("probe", "x")
    for part in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert stat.S_IMODE(part.stat().st_mode) == 0o600, part
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    store.close()

    os.chmod(db, 0o644)
    for part in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        if part.exists():
            os.chmod(part, 0o644)
    with caplog.at_level(logging.WARNING, logger="lorekeeper.server.store"):
        Store.open(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


# -- files without a known extension, .gz, and the listing of what is left out ---------------------


def test_files_by_content_gz_and_every_file_left_out_is_listed(fake_indexer: Indexer, store: Store,
                                                               docs: Path) -> None:  # fmt: skip
    (docs / "copyright").write_text(
        "Format: https://www.debian.org/doc/\nLicense: GPL-2+ for the ferry timetable\n"
    )
    (docs / "README.Debian").write_text("Debian notes: the ferry package starts its daemon at boot.\n")
    (docs / "changelog.Debian.gz").write_bytes(
        gzip.compress(b"ferry (1.2-1) unstable; urgency=low\n  * Fix the timetable\n")
    )
    (docs / "notes.md.gz").write_bytes(gzip.compress(b"# Tides\nThe ferry waits for the high tide.\n"))
    (docs / "blob").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (docs / "bomb.gz").write_bytes(gzip.compress(b"\n" * (60 * 2**20)))
    (docs / "broken.gz").write_bytes(b"\x1f\x8b not really gzip")
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (docs / "pack.tar.gz").write_bytes(b"\x1f\x8b")
    (docs / ".git").mkdir()
    (docs / ".git" / "config").write_text("[core]\n")
    fake_indexer.add_root(docs)
    fake_indexer.index_file(docs / ".git" / "config")  # as a watcher event inside an ignored folder

    indexed = {Path(e.path).name for e in store.files("indexed")}
    assert indexed == {"copyright", "README.Debian", "changelog.Debian.gz", "notes.md.gz"}
    assert search(store, None, "timetable", mode="keyword", k=5)[0].path.endswith("changelog.Debian.gz")
    assert store.get_document(docs.resolve() / "notes.md.gz").loader.startswith("markdown:")

    left_out = {Path(e.path).name: e for e in store.files("all") if e.status != "indexed"}
    assert left_out["blob"].status == "ignored" and "binary content" in left_out["blob"].reason
    assert left_out["bomb.gz"].status == "skipped" and "decompression bomb" in left_out["bomb.gz"].reason
    assert left_out["broken.gz"].status == "failed" and "gzip" in left_out["broken.gz"].reason
    assert left_out["photo.png"].status == "ignored" and "'*.png'" in left_out["photo.png"].reason
    assert "'*.tar.gz'" in left_out["pack.tar.gz"].reason
    assert left_out[".git"].is_dir and "'.git/'" in left_out[".git"].reason
    assert "config" not in left_out  # a folder left out is listed once, not file by file
    status = store.status()
    assert status.ignored == {"binary": 1, "ignore rule": 3}
    assert status.skipped_count == 1 and status.failed_count == 1

    # a file no longer there leaves the list; one that became text is indexed
    (docs / "photo.png").unlink()
    (docs / "blob").write_text("Now the blob is a note about the ferry.\n")
    fake_indexer.reconcile()
    names = {Path(e.path).name: e.status for e in store.files("all")}
    assert "photo.png" not in names and names["blob"] == "indexed"


def test_files_command_lists_what_is_left_out(tmp_path: Path, docs: Path) -> None:
    (docs / "note.txt").write_text("A note.\n")
    (docs / "blob").write_bytes(b"\x00" * 100)
    env = {**os.environ, "LOREKEEPER_HOME": str(tmp_path / "home"), "LOREKEEPER_EMBEDDER": "test-hash-64"}
    db = str(tmp_path / "cli.db")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from fakes import register_fakes
        register_fakes()
        from lorekeeper.server.cli import app
        app(sys.argv[1:])
        """
    )

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, "--db", db, *args], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip

    assert cli("add", str(docs)).returncode == 0
    listed = cli("files", "--ignored", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(Path(e["path"]).name, e["kind"]) for e in entries] == [("blob", "binary")]
    shown = cli("status")
    assert "1 binary" in shown.stdout and "files --ignored" in shown.stdout
    both = cli("files", "--ignored", "--failed")
    assert both.returncode != 0 and "one of" in both.stderr


# -- memory and time bounds on one file ------------------------------------------------------------


def _index_in_child(folder: Path, db: Path, settings: dict) -> dict:
    """Index ``folder`` in a fresh process; its peak RSS and the files' statuses."""
    code = textwrap.dedent(
        f"""
        import json, resource, sys
        sys.path.insert(0, {str(TESTS)!r})
        from fakes import HashEmbedder
        from lorekeeper.server.indexer import Indexer
        from lorekeeper.server.settings import Settings
        from lorekeeper.server.store import Store
        store = Store.open({str(db)!r})
        Indexer(store, HashEmbedder(), settings=Settings.load({settings!r})).add_root({str(folder)!r})
        files = {{e.path.rsplit("/", 1)[-1]: [e.status, e.reason] for e in store.files("all")}}
        print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "files": files}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _baseline_rss(tmp_path: Path) -> float:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("tiny\n")
    return _index_in_child(empty, tmp_path / "base.db", {})["rss_mb"]


@pytest.mark.slow
def test_one_huge_file_fails_within_a_memory_bound_and_the_rest_indexes(tmp_path: Path, docs: Path) -> None:
    """A one-line 60 MB text file (under a raised max_file_mb) and a DOCX of tiny paragraphs: each
    fails with the reason, peak memory stays near the baseline, the other files index."""
    (docs / "ok.txt").write_text("A small note that must still be indexed.\n")
    with open(docs / "oneline.log", "wb") as handle:
        block = b"0123456789abcdef " * 4096
        for _ in range((60 * 2**20) // len(block)):
            handle.write(block)
    paragraph = "<w:p><w:r><w:t>a</w:t></w:r></w:p>"
    _docx(docs / "tiny-paragraphs.docx", paragraph * 400_000)  # 14 MB of XML, under the bomb ratio
    result = _index_in_child(docs, tmp_path / "big.db", {"max_file_mb": 100, "max_chars_per_file": 200_000})
    files = result["files"]
    assert files["ok.txt"][0] == "indexed"
    assert files["oneline.log"][0] == "failed" and "max_chars_per_file" in files["oneline.log"][1]
    assert files["tiny-paragraphs.docx"][0] == "failed" and "characters" in files["tiny-paragraphs.docx"][1]
    baseline = _baseline_rss(tmp_path)
    assert result["rss_mb"] < baseline + 300, (result["rss_mb"], baseline)


@pytest.mark.slow
def test_a_zip_bomb_docx_is_refused_before_it_is_unpacked(tmp_path: Path, docs: Path) -> None:
    paragraph = "<w:p><w:r><w:t>a</w:t></w:r></w:p>"
    _docx(docs / "bomb.docx", paragraph * 6_000_000)  # 204 MB of XML in a few hundred kB
    assert (docs / "bomb.docx").stat().st_size < 4 * 2**20
    (docs / "ok.txt").write_text("Still indexed.\n")
    started = time.monotonic()
    result = _index_in_child(docs, tmp_path / "bomb.db", {})
    assert result["files"]["bomb.docx"][0] == "failed" and "zip bomb" in result["files"]["bomb.docx"][1]
    assert result["files"]["ok.txt"][0] == "indexed"
    assert result["rss_mb"] < _baseline_rss(tmp_path) + 200
    assert time.monotonic() - started < 300


def _docx(path: Path, body: str) -> None:
    """A minimal Word package whose body is ``body`` (paragraph XML), written compressed."""
    ns = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxml'
                         'formats.org/package/2006/content-types"/>')  # fmt: skip
        with archive.open("word/document.xml", "w", force_zip64=True) as stream:
            stream.write(f'<?xml version="1.0"?><w:document xmlns:w="{ns}"><w:body>'.encode())
            step = 1 << 20
            for start in range(0, len(body), step):
                stream.write(body[start : start + step].encode())
            stream.write(b"</w:body></w:document>")


# -- work kept across a kill -----------------------------------------------------------------------


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE)


def _kill_when(child: subprocess.Popen, db: Path, sql: str, at_least: int, timeout: float = 240) -> int:
    """SIGKILL ``child`` once ``sql`` counts at least ``at_least`` in the index; return the count."""
    deadline = time.monotonic() + timeout
    count = 0
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if db.exists():
                try:
                    probe = Store.open(db)
                    count = probe._read().execute(sql).fetchone()[0]
                    probe.close()
                except Exception:
                    count = 0
                if count >= at_least:
                    break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished before it could be killed"
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    return count


SLOW_FAKE = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from fakes import HashEmbedder
class Slow(HashEmbedder):
    def embed(self, texts):
        time.sleep(0.01 * len(texts))  # about as slow as the real model on a busy machine
        return super().embed(texts)
from lorekeeper.server.indexer import Indexer
from lorekeeper.server.store import Store
"""


def test_a_killed_run_keeps_the_vectors_of_a_large_file_done_so_far(tmp_path: Path, docs: Path) -> None:
    big = docs / "a-big.txt"
    big.write_text("\n\n".join(f"Paragraph {i} of the long harbour chronicle, " + "tide and wind " * 60
                               for i in range(400)))  # fmt: skip
    (docs / "b-note.txt").write_text("A small note.\n")
    db = tmp_path / "kill.db"
    child = _child(SLOW_FAKE + f"Indexer(Store.open({str(db)!r}), Slow()).add_root({str(docs)!r})\n")
    cached = _kill_when(child, db, "SELECT COUNT(*) FROM embedding_cache", 96)
    store = Store.open(db)
    try:
        assert store.check_integrity() == []
        assert store.get_document(big.resolve()) is None  # not committed: it was in the middle of it
        counting = _Counting()
        report = Indexer(store, counting).reconcile()
        assert report.indexed == 2
        total = store.get_document(big.resolve()).chunk_count
        assert counting.embedded <= total + 1 - cached  # what was done before the kill is not done again
        assert store.check_integrity() == []
    finally:
        store.close()


def test_an_interrupted_full_reindex_resumes_instead_of_starting_over(tmp_path: Path, docs: Path) -> None:
    for i in range(300):
        (docs / f"note{i:03}.txt").write_text(f"Note {i} about the harbour.\n\nMore about buoy {i}.\n")
    db = tmp_path / "full.db"
    store = Store.open(db)
    Indexer(store, HashEmbedder()).add_root(docs)
    store.close()
    # chunks are re-made by a full reindex; their vectors come from the cache, so make it slow here
    child = _child(SLOW_FAKE + textwrap.dedent(f"""
        import lorekeeper.server.prepare as prepare
        real = prepare.chunk_units
        def slow_chunks(*args, **kwargs):
            time.sleep(0.05)
            return real(*args, **kwargs)
        prepare.chunk_units = slow_chunks
        Indexer(Store.open({str(db)!r}), Slow()).reindex(full=True)
        """))  # fmt: skip
    sql = "SELECT COUNT(*) FROM documents WHERE content_hash IS NOT NULL"
    started = "SELECT CASE WHEN EXISTS (SELECT 1 FROM meta WHERE key = 'full_reindex') THEN (%s) ELSE 0 END"
    done = _kill_when(child, db, started % sql, 30)
    store = Store.open(db)
    try:
        assert store.check_integrity() == []
        report = Indexer(store, HashEmbedder()).reindex(full=True)
        assert report.indexed <= 300 - done + 2  # the files redone before the kill are not redone
        assert report.indexed + report.unchanged == 300
        assert store.get_meta("full_reindex") is None
        assert store._read().execute(sql).fetchone()[0] == 300
    finally:
        store.close()


class _Counting(HashEmbedder):
    embedded = 0

    def embed(self, texts):
        self.embedded += len(texts)
        return super().embed(texts)
