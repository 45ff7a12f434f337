"""scripts/bench_finetune.py keeps what it measured: a side that outlasts --side-timeout is recorded
and the others still run; a stopped run (SIGTERM, as `timeout` sends) still prints its report.

Its figures are not asserted here (they are the benchmark's); a GPU run that hit its time limit once
came back with nothing at all, which is what these guard against.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_finetune.py"

pytestmark = pytest.mark.slow


def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for module in (json, shutil):  # real text nobody on the project wrote
        (folder / f"{module.__name__}.txt").write_text(Path(module.__file__).read_text(encoding="utf-8"))
    return folder


def command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--steps", "2", "--warmup", "1", "--seq-len", "64", "--batch-size", "1",
            "--files", "2", "--corpus", str(corpus(tmp_path)), "--cpu", *extra]  # fmt: skip


def test_a_side_over_its_timeout_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        command(tmp_path, "--side-timeout", "0.5", "--out", str(out), "--sides", "plain", "lorekeeper:nogc"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    for side in ("plain", "lorekeeper:nogc"):
        assert report[side]["error"] == "no result after 0.5 s (--side-timeout)"
        assert f"{side}: FAILED, no result" in done.stderr
    assert "not_measured" not in report and "stopped" not in report


def test_a_stopped_run_prints_what_it_has_and_leaves_no_side_running(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        command(tmp_path, "--sides", "plain", "lorekeeper"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    try:
        wait_for(lambda: sides_running(scratch), timeout=120)  # stopped while its first side trains
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    report = json.loads(stdout)
    assert report["stopped"] is True
    assert report["not_measured"] == ["plain", "lorekeeper"]
    assert report["settings"]["sides"] == ["plain", "lorekeeper"]
    assert not list(scratch.glob("bench-finetune-*")), "its scratch folder is removed"
    assert not sides_running(scratch), "the side it was running is stopped too"


def sides_running(scratch: Path) -> list[str]:
    """Side processes (their command line names data under ``scratch``), from /proc."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "--which=" in text and str(scratch) in text:
            found.append(text)
    return found
