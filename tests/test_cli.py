"""The `lorekeeper` command as a user runs it: a real subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lorekeeper.server.indexer import Indexer
from lorekeeper.server.search import search
from lorekeeper.server.store import Store


def lk(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorekeeper.server.cli", "--db", str(db), *args],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip


@pytest.mark.slow
def test_add_search_status_reindex_remove(tmp_path: Path, docs: Path) -> None:
    db = tmp_path / "cli.db"
    (docs / "bees.md").write_text("# Bees\nHoney bees communicate the direction of flowers by dancing.\n")
    (docs / "ants.txt").write_text("Leafcutter ants grow fungus gardens underground.\n")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")

    added = lk("add", str(docs), db=db)
    assert added.returncode == 0, added.stderr
    assert "2 indexed" in added.stdout and "1 failed" in added.stdout

    found = lk("search", "how do bees tell each other where flowers are", "-k", "2", "--json", db=db)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["path"] == str((docs / "bees.md").resolve())
    assert hits[0]["location"] == "lines 1-2" and hits[0]["heading_path"] == ["Bees"]

    only_txt = json.loads(lk("search", "bees", "--type", "txt", "--json", db=db).stdout)
    assert {Path(h["path"]).name for h in only_txt} == {"ants.txt"}

    status = lk("status", "--json", db=db)
    info = json.loads(status.stdout)
    assert info["documents"] == 2 and info["roots"][0]["failed"] == 1
    assert info["failed"][0]["path"].endswith("broken.pdf") and info["failed"][0]["error"]
    readable = lk("status", db=db).stdout
    assert "broken.pdf" in readable and str(docs.resolve()) in readable

    reindexed = lk("reindex", db=db)
    assert reindexed.returncode == 0 and "2 unchanged" in reindexed.stdout

    removed = lk("remove", str(docs), db=db)
    assert removed.returncode == 0
    assert json.loads(lk("status", "--json", db=db).stdout)["documents"] == 0


@pytest.mark.slow
def test_bad_arguments_give_clear_errors(tmp_path: Path, docs: Path) -> None:
    db = tmp_path / "cli.db"
    missing = lk("add", str(tmp_path / "nope"), db=db)
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    a_file = docs / "one.txt"
    a_file.write_text("x")
    assert "give the folder" in lk("add", str(a_file), db=db).stderr
    assert not db.exists()  # a mistyped folder to add leaves no index behind
    assert "no lorekeeper index" in lk("remove", str(docs), db=db).stderr
    Store.open(db).close()
    assert "out of range" in lk("search", "x", "-k", "0", db=db).stderr
    assert "query is empty" in lk("search", "  ", db=db).stderr
    assert "is not a date" in lk("search", "x", "--since", "yesterday", db=db).stderr
    assert "not a registered folder" in lk("remove", str(docs), db=db).stderr
    not_db = tmp_path / "notes.txt"
    not_db.write_text("plain text, not an index" * 50)
    bad_db = lk("status", db=not_db)
    assert bad_db.returncode == 1 and "--db" in bad_db.stderr


def _one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_db_in_a_missing_folder_is_an_error_and_creates_nothing(tmp_path: Path, docs: Path) -> None:
    db = tmp_path / "nope" / "sub" / "index.db"
    for args in (
        ["search", "bees"],
        ["status"],
        ["add", str(docs)],
        ["watch"],
        ["watch", str(docs)],
        ["serve"],
    ):
        proc = lk(*args, db=db)
        _one_clear_line(proc, str(db), "--db")
        assert "does not exist" in proc.stderr
    assert not (tmp_path / "nope").exists()


def test_ask_with_a_model_that_is_not_a_gguf_file(tmp_path: Path, docs: Path) -> None:
    db = tmp_path / "cli.db"
    Store.open(db).close()
    not_a_model = tmp_path / "notamodel.txt"
    not_a_model.write_text("hello\n")
    _one_clear_line(lk("ask", "who keeps the lighthouse", "--model", str(not_a_model), db=db),
                    str(not_a_model), "not a GGUF model", ".gguf")  # fmt: skip
    _one_clear_line(
        lk("ask", "x", "--model", str(tmp_path / "absent.gguf"), db=db), "absent.gguf", "no such file"
    )
    _one_clear_line(lk("ask", "x", "--model", str(docs), db=db), str(docs), "is a folder")


def test_readers_do_not_wait_for_the_writer(indexer: Indexer, store: Store, docs: Path, embedder) -> None:
    """A search answers while another connection holds the write lock (WAL mode)."""
    (docs / "owls.md").write_text("# Owls\nBarn owls hunt by sound in complete darkness.\n")
    indexer.add_root(docs)
    writer = Store.open(store.path)
    writer._writer.execute("BEGIN IMMEDIATE")
    writer._writer.execute("UPDATE meta SET value = value WHERE key = 'embed_model'")
    result: list = []
    thread = threading.Thread(target=lambda: result.append(search(store, embedder, "owls hunting", k=1)))
    thread.start()
    thread.join(timeout=10)
    try:
        assert not thread.is_alive(), "search blocked behind an open write transaction"
        assert result[0][0].path.endswith("owls.md")
    finally:
        writer._writer.execute("ROLLBACK")
        writer.close()


def test_repeated_text_in_one_file_comes_back_once(
    indexer: Indexer, store: Store, docs: Path, embedder
) -> None:
    """A disclaimer pasted three times into one file is one hit, not three."""
    boiler = "Confidential: do not forward this message outside the cooperative. " * 12
    parts = [
        boiler,
        "The board approved the new roof. " * 25,
        boiler,
        "Costs rose again this quarter. " * 25,
        boiler,
    ]
    (docs / "memo.txt").write_text("\n\n".join(parts))
    indexer.add_root(docs)
    chunks = store.document_chunks(docs.resolve() / "memo.txt")
    assert sum(c.text == boiler.strip() for c in chunks) == 3
    hits = search(store, embedder, "confidential do not forward", k=10)
    assert sum(h.text == boiler.strip() for h in hits) == 1


DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo" / "docs"


@pytest.mark.slow
def test_readme_command_one_answers_the_demo_question_from_the_right_passage(tmp_path: Path) -> None:
    """README command 1 on the embedded models: the answer holds the handbook's figure (25 days, not
    the 28 that follows it in the same passage) and the handbook is the source marked as supporting
    it. Temperature 0, so the run is repeatable."""
    db = tmp_path / "demo.db"
    assert lk("add", str(DEMO), db=db).returncode == 0
    asked = lk(
        "ask", "How many days of paid holiday do new staff get?", "--temperature", "0", "--json", db=db
    )
    assert asked.returncode == 0, asked.stderr
    result = json.loads(asked.stdout)
    assert "25 days" in result["answer"] and "28" not in result["answer"]
    cited = {Path(s["path"]).name for s in result["sources"] if s["cited"]}
    assert cited == {"handbook.md"}
