"""scripts/bench.py: one smoke run writes BENCHMARKS.md with the figure, the machine and the time.

The figures themselves are not asserted (they belong to each benchmark); what a user and CI rely on
is that the one command produces the report, with each benchmark's command, wall and CPU time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_quick_writes_the_report_with_times(tmp_path: Path) -> None:
    out = tmp_path / "report" / "BENCHMARKS.md"  # its folder does not exist yet
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "watch", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "| watch | small file saved while a 0.05 MB file embeds" in text
    assert "- CPU: " in text and "- versions: " in text and "load average" in text
    row = re.search(
        r"^\| watch \| (\d+) s \| (\d+) s \| [\d.]+ \| `python scripts/bench_watch_interleave.py ", text, re.M
    )
    assert row, text
    wall, cpu = int(row.group(1)), int(row.group(2))
    assert wall >= 1 and cpu >= 1  # the child's own CPU time was counted (a real embedder ran)
    assert "Nothing is skipped" in text


def test_bench_names_an_unknown_benchmark() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "index,nope"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "--only: unknown nope; choose from index, watch, mcp" in done.stderr
    assert "Traceback" not in done.stderr
