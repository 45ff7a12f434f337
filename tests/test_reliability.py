"""The index's own consistency check, and the reliability scripts run end to end on a small scale.

``Store.check_integrity`` is what the crash trials rely on, so it is shown to catch each kind of
damage it claims to. The scripts (crash_trials.py, watch_endurance.py, load_mcp.py) run with tiny
sizes and the fake models: their figures belong to their full runs; here they must just work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import HashEmbedder

from lorekeeper.server.indexer import Indexer
from lorekeeper.server.store import Store

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def indexed(tmp_path: Path) -> Store:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"n{i}.md").write_text(f"# Note {i}\n\n" + "word " * 400 + f"\n\nend of note {i}\n")
    store = Store.open(tmp_path / "i.db")
    Indexer(store, HashEmbedder()).add_root(docs)
    yield store
    store.close()


@pytest.mark.parametrize(
    ("damage", "reported"),
    [
        ("DELETE FROM chunk_vectors WHERE rowid = (SELECT MIN(id) FROM chunks)", "chunks without a vector row"),
        ("DELETE FROM chunks_fts WHERE rowid = (SELECT MIN(id) FROM chunks)", "chunks without a keyword row"),
        ("INSERT INTO chunks_fts(rowid, text, headings) VALUES (999999, 'stray', '')", "keyword rows without a chunk"),
        ("UPDATE chunks SET seq = 0 WHERE id = (SELECT MAX(id) FROM chunks)", "not one version"),
        ("UPDATE documents SET chunk_count = chunk_count + 1 WHERE id = (SELECT MIN(id) FROM documents)",
         "chunk_count disagrees"),
    ],
)  # fmt: skip
def test_check_integrity_names_each_kind_of_damage(indexed: Store, damage: str, reported: str) -> None:
    assert indexed.check_integrity() == []
    with indexed._transaction() as conn:
        conn.execute(damage)
    problems = indexed.check_integrity()
    assert any(reported in p for p in problems), problems


def _run(script: str, *args: str, tmp_path: Path, ok: tuple[int, ...] = (0,), timeout: float = 900) -> str:
    env = dict(os.environ, LOREKEEPER_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode in ok, (done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
def test_crash_trials_run_and_pass_on_a_small_folder(tmp_path: Path) -> None:
    out = _run(
        "crash_trials.py", "--files", "60", "--trials", "2", "--seed", "7", "--fast", tmp_path=tmp_path
    )
    trials = [line for line in out.splitlines() if " trial " in line]
    assert "seed 7" in out and len(trials) == 6 and all(line.endswith(": ok") for line in trials), out


@pytest.mark.slow
def test_watch_endurance_runs_and_reports_on_a_small_folder(tmp_path: Path) -> None:
    """It exits 1 when the live index differs from a fresh one, listing the differences: that is
    the script doing its job (the full run's figures are in the README), so both are accepted here."""
    out = _run("watch_endurance.py", "--ops", "150", "--files", "40", "--probes", "2", "--seed", "3",
               tmp_path=tmp_path, ok=(0, 1))  # fmt: skip
    report = json.loads(out[out.index("{") :])
    assert report["operations"] == 150 and sum(report["kinds"].values()) == 150
    assert report["settled"] and len(report["examples"]) == min(report["differences"], 25)


@pytest.mark.slow
def test_load_mcp_runs_against_a_real_server(tmp_path: Path) -> None:
    out = _run("load_mcp.py", "--seconds", "6", "--files", "40", "--fast", "--seed", "5", tmp_path=tmp_path)
    for phase in ("http", "stdio"):
        assert f'"phase": "{phase}"' in out
    assert '"errors": 0' in out and '"database_is_locked": 0' in out
