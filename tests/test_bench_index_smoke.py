"""The index benchmark runs end to end on a tiny corpus and reports every figure the README quotes.

The numbers themselves are not asserted (they belong to the benchmark, measured against its own
baselines); what a user relies on is that one run produces all of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_index.py"


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_index_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [sys.executable, str(SCRIPT), "--quick", "--files", "8", "--slices", "2", "--latency-runs", "3",
            "--chunks-small", "100", "--chunks-large", "200", "--queries", "2", "--rounds", "1",
            "--workdir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    env = dict(os.environ, LOREKEEPER_HOME=str(tmp_path / "home"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))

    t = result["throughput"]
    assert t["corpus_files"] == 8 and t["indexed_files"] > 0 and t["chunks"] > 0
    assert t["embedded_chunks"] == t["baseline_texts"]  # the baseline embeds exactly what the index did
    assert t["slices_with_mismatched_texts"] == 0  # texts cut ahead of indexing equal the indexed ones
    for key in ("index_files_per_s", "index_chunks_per_s", "index_mb_per_s", "baseline_chunks_per_s", "model_free_share",
                "ratio_wall", "ratio_cpu"):  # fmt: skip
        assert _positive(t[key]), key

    lat = result["latency"]
    assert lat["runs"] == 3 and not lat["watcher_errors"]
    for key in ("indexed_p50_s", "indexed_p95_s", "searchable_p50_s", "searchable_p95_s"):
        assert _positive(lat[key]), key
    assert lat["searchable_p50_s"] >= lat["indexed_p50_s"]

    sizes = result["search"]["sizes"]
    assert sizes["small"]["chunks"] >= 100 and sizes["large"]["chunks"] >= 200
    for fig in sizes.values():
        assert fig["vec0_recall"] >= 0.99  # sqlite-vec scans exactly, like numpy (ties aside)
        for mode in ("numpy", "vector", "keyword", "hybrid"):
            assert _positive(fig[mode]["p50_ms"]) and _positive(fig[mode]["p95_vs_numpy"]), mode
    assert "numpy X @ q" in done.stdout and "Save-to-searchable" in done.stdout
    assert not (tmp_path / "work").exists()  # the work folder is cleaned up
