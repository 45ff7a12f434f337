"""Every benchmark the project has, in one command, written to BENCHMARKS.md.

Each script under ``scripts/`` runs in its own subprocess and writes its figures as JSON; this
script reads them and writes ``BENCHMARKS.md``: every figure with the baseline measured in the same
run, the ratio, the target and whether it is met, then the machine (CPU model and the instruction
sets the native libraries use, cores, memory, load), the versions of the parts, the date, and each
benchmark's command with its wall time and the CPU time of its processes.

    python scripts/bench.py                      # all of them, one at a time: under 20 minutes
    python scripts/bench.py --quick              # a smoke run for CI: about 3 minutes
    python scripts/bench.py --only index,mcp --out results/BENCHMARKS.md

Sizes of the full run (two cores): indexing throughput on 200 real files (about 400 chunks, each
embedded twice: by the index and by the raw embedder), 10 saves under the watcher, search latency
at 10,000 and 100,000 chunks; 5 small saves while a 0.3 MB file embeds; MCP ``generate``, 4 runs of
96 tokens a side, and 100 ``retrieve`` calls on an index of at least 500 chunks; 8 fine-tuning steps (2 of
warm-up) of 2 x 128 tokens a side; GGUF parity after 6 training steps, over 300 positions; the
answer benchmark on 12 questions over all 118 manual pages; and ``ragft``,
``scripts/demo_rag_vs_ft.py`` on the same pages and index: 12 questions, 8 training steps.

``--quick`` runs every one of them on its real path (the real embedder and generator, llama.cpp,
real training steps, a real GGUF export) at the smallest sizes that still do so: 24 files, 2 saves,
a 60-chunk index and 16 tokens, 2 training steps of 64 tokens (1 for parity and the demo), 32
positions, 2 questions over 4 pages with 32-token answers. Two run side by side (the training ones
beside the others), so their figures share the CPU and mean little; nothing is skipped.

All children share one folder of derived files (``--cache``): the base model dequantized for
training and the embedder exported to ONNX are made once per run, by the first benchmark that needs
them. The answer benchmark's rendered pages and index are reused by ``ragft``.

A benchmark that fails or runs over its time limit is reported as such (with the end of its
output) and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon")
PARTS = ("lorekeeper", "torch", "transformers", "peft", "llama_cpp_python", "sqlean.py", "sqlite-vec",
         "sentence-transformers", "onnxruntime", "mcp", "watchdog", "gguf")  # fmt: skip


@dataclass
class Row:
    """One figure: what was measured, against what, and the target."""

    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None


@dataclass
class Bench:
    """A script, its arguments at full and quick size, and how its JSON becomes rows."""

    name: str
    script: str
    full: list[str]
    quick: list[str]
    rows: Callable[[dict], list[Row]]
    limit_s: int = 900
    json_from_stdout: bool = False
    lane: int = 0  # with --jobs 2: which of the two queues it runs in
    needs: tuple[str, ...] = ()  # benchmarks that must have finished first (when they run at all)


@dataclass
class Outcome:
    """What one benchmark gave: wall seconds, CPU seconds of its processes, its rows or its error."""

    bench: Bench
    seconds: float
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    cpu_seconds: float = 0.0
    load: float = 0.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def index_rows(r: dict) -> list[Row]:
    rows = []
    t = r.get("throughput")
    if t:
        rows.append(Row("indexing throughput (chunks/s), Indexer vs raw embedder on the same texts",
                        f"{t['index_chunks_per_s']:.1f}", f"{t['baseline_chunks_per_s']:.1f}",
                        f"{t['ratio_wall']:.2f}x", f">= {t['target_ratio']}x", t["ratio_wall"] >= t["target_ratio"]))  # fmt: skip
    lat = r.get("latency")
    if lat:
        rows.append(Row("save to searchable under the watcher, p95", _ms(lat["searchable_p95_s"]),
                        target=f"< {_ms(lat['target_p95_s'])}", met=lat["searchable_p95_s"] < lat["target_p95_s"]))  # fmt: skip
    s = r.get("search")
    if s:
        largest = max(s["sizes"].values(), key=lambda f: f["chunks"])
        for mode, target in (("vector", 2.0), ("hybrid", None)):
            f = largest[mode]
            rows.append(Row(f"search() {mode} p50 at {largest['chunks']:,} chunks vs exact numpy",
                            f"{f['p50_ms']:.1f} ms", f"{largest['numpy']['p50_ms']:.1f} ms",
                            f"{f['p50_vs_numpy']:.1f}x", f"<= {target}x" if target else "-",
                            f["p50_vs_numpy"] <= target if target else None))  # fmt: skip
    return rows


def watch_rows(r: dict) -> list[Row]:
    busy = [v for v in r["busy"] if v is not None]
    idle = [v for v in r["idle"] if v is not None]
    worst = max(busy) if len(busy) == len(r["busy"]) and busy else float("inf")
    calm = sorted(idle)[len(idle) // 2] if idle else float("nan")
    return [Row(f"small file saved while a {r['big_mb']:g} MB file embeds: slowest of {len(r['busy'])} saves",
                f"{worst:.2f} s", f"{calm:.2f} s (median, nothing else running)", f"{worst / calm:.1f}x",
                "<= 2 s", worst <= 2.0)]  # fmt: skip


def mcp_rows(r: dict) -> list[Row]:
    raw, mcp = r["raw"], r["mcp"]
    return [
        Row(
            "generate tokens/s through MCP vs raw llama.cpp (end to end)",
            f"{mcp['tokens_per_s']:.1f}",
            f"{raw['tokens_per_s']:.1f}",
            f"{r['ratio_tokens_per_s']:.2f}x",
            ">= 0.95x",
            r["ratio_tokens_per_s"] >= 0.95,
        ),  # fmt: skip
        Row(
            f"retrieve p50 through MCP at {r['chunks']:,} chunks vs in-process search()",
            f"{r['retrieve_mcp_ms']['p50']:.1f} ms",
            f"{r['retrieve_inprocess_ms']['p50']:.1f} ms",
            f"{r['retrieve_mcp_ms']['p50'] / max(r['retrieve_inprocess_ms']['p50'], 1e-9):.1f}x",
        ),  # fmt: skip
    ]


def finetune_rows(r: dict) -> list[Row]:
    lk, plain = r["lorekeeper"], r["plain"]
    return [
        Row(
            "fine-tuning tokens/s, lorekeeper vs a plain transformers+peft loop",
            f"{lk['tokens_per_s']:.1f}",
            f"{plain['tokens_per_s']:.1f}",
            f"{r['speedup_tokens_per_s']:.2f}x",
            ">= 1.0x (CPU)",
            r["speedup_tokens_per_s"] >= 1.0,
        ),  # fmt: skip
        Row(
            "fine-tuning peak memory, lorekeeper vs the plain loop",
            f"{lk['peak_memory_mb']:.0f} MB",
            f"{plain['peak_memory_mb']:.0f} MB",
            f"{r['memory_ratio']:.2f}x",
            "<= 1.0x",
            r["memory_ratio"] <= 1.0,
        ),
    ]


def parity_rows(r: dict) -> list[Row]:
    exact, q4, base = r["f16_plus_adapter"], r["q4_plus_adapter"], r["q4_base_alone"]
    return [
        Row(
            f"GGUF parity: F16 base + exported adapter vs the trained model, top-1 over {exact['positions']}",
            f"{exact['top1']:.1%}",
            target=">= 99%",
            met=exact["top1"] >= 0.99,
        ),  # fmt: skip
        Row(
            "GGUF parity: shipped Q4_1 base + adapter vs the trained model, top-1",
            f"{q4['top1']:.1%}",
            f"{base['top1']:.1%} (Q4_1 base alone vs its base)",
            f"{q4['top1'] - base['top1']:+.1%}",
            ">= baseline - 2 points",
            q4["top1"] >= base["top1"] - 0.02,
        ),  # fmt: skip
    ]


def answer_rows(r: dict) -> list[Row]:
    table = r["table"]
    base = table.get("retrieval only")
    rows = []
    for name, s in table.items():
        if name == "retrieval only" or "fallback" not in name and "default" not in name:
            continue
        rows.append(Row(f"answers: {name} accuracy / citation precision",
                        f"{s['accuracy']:.2f} / {s['citation_precision']:.2f}",
                        f"{base['accuracy']:.2f} / {base['citation_precision']:.2f} (best retrieved sentence)",
                        f"{s['accuracy'] - base['accuracy']:+.2f} accuracy", "loops 0", s["loops"] == 0))  # fmt: skip
    if not rows:
        for name, s in table.items():
            rows.append(Row(f"answers: {name} accuracy / citation precision / loops",
                            f"{s['accuracy']:.2f} / {s['citation_precision']:.2f} / {s['loops']:.2f}"))  # fmt: skip
    return rows


def ragft_rows(r: dict) -> list[Row]:
    """Token F1 of each answer configuration against the base model alone, and the advice."""
    summary = r["answers"]["summary"]
    base = summary["base"]
    rows = [
        Row(f"RAG vs fine-tuning, manual pages: {config} token F1 / contains ({s['questions']} questions)",
            f"{s['f1']:.2f} / {s['contains']:.2f}", f"{base['f1']:.2f} / {base['contains']:.2f} (base model alone)",
            f"{s['f1'] - base['f1']:+.2f} F1")
        for config, s in summary.items() if config != "base"
    ]  # fmt: skip
    rows.append(Row("RAG vs fine-tuning: recommendation", r["answers"]["recommendation"]))
    return rows


def benches(work: Path) -> list[Bench]:
    """Each benchmark at its full size and at its quick (smoke) size."""
    mcp, answers, ragft = str(work / "mcp"), str(work / "answers"), str(work / "ragft")
    return [
        Bench("index", "bench_index.py",
              ["--files", "200", "--slices", "4", "--latency-runs", "10", "--chunks-small", "10000",
               "--chunks-large", "100000", "--rounds", "2"],
              ["--quick", "--files", "24", "--slices", "2", "--latency-runs", "3", "--chunks-small", "300",
               "--chunks-large", "1000", "--queries", "4", "--rounds", "1"],
              index_rows, limit_s=900),
        Bench("watch", "bench_watch_interleave.py",
              ["--saves", "5", "--big-mb", "0.3", "--timeout", "400"],
              ["--saves", "2", "--big-mb", "0.05", "--gap", "0.2", "--timeout", "120"],
              watch_rows, limit_s=450),
        Bench("mcp", "bench_mcp.py",
              ["--chunks", "500", "--runs", "4", "--max-tokens", "96", "--queries", "100", "--workdir", mcp],
              ["--chunks", "60", "--runs", "1", "--max-tokens", "16", "--queries", "5", "--workdir", mcp],
              mcp_rows, limit_s=600),
        Bench("finetune", "bench_finetune.py",
              ["--steps", "8", "--warmup", "2", "--seq-len", "128", "--batch-size", "2"],
              ["--steps", "2", "--warmup", "1", "--seq-len", "64", "--batch-size", "1", "--files", "2"],
              finetune_rows, limit_s=600, json_from_stdout=True, lane=1),
        Bench("parity", "bench_parity.py",
              ["--steps", "6", "--positions", "300"],
              ["--steps", "1", "--positions", "32", "--rows", "8"],
              parity_rows, limit_s=600, lane=1, needs=("finetune",)),
        Bench("answers", "bench_answers.py",
              ["--models", "smollm2", "--context-sentences", "6", "--limit", "12", "--workdir", answers],
              ["--models", "smollm2", "--context-sentences", "6", "--limit", "2", "--pages", "4",
               "--max-tokens", "32", "--workdir", answers],
              answer_rows, limit_s=900),
        Bench("ragft", "demo_rag_vs_ft.py",
              ["--out", ragft, "--questions", "12", "--train-steps", "8", "--pages-from", answers],
              ["--out", ragft, "--questions", "2", "--train-steps", "1", "--max-seq-len", "64", "--batch-size", "1",
               "--max-tokens", "32", "--pages-from", answers],
              ragft_rows, limit_s=1200, needs=("answers", "finetune")),
    ]  # fmt: skip


_SAY = threading.Lock()


def say(line: str) -> None:
    """One whole line to stdout (two queues print side by side)."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _run_child(
    cmd: list[str], env: dict[str, str], limit_s: int, logs: Path
) -> tuple[int | None, str, str, float]:
    """Run ``cmd`` in its own session, output to files: (exit status or None if it ran past
    ``limit_s`` and was killed with everything it started, stdout, stderr, CPU seconds of it and of
    the processes it waited for). The CPU time is this child's own (``wait4``), so two benchmarks
    running side by side do not count each other's."""
    with open(logs.with_suffix(".out"), "w+b") as out, open(logs.with_suffix(".err"), "w+b") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(limit_s, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        try:  # what it left running (an MCP server, a training side) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        out.seek(0)
        err.seek(0)
        texts = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    return (None if killed.is_set() else proc.returncode), *texts, usage.ru_utime + usage.ru_stime


def _figures(bench: Bench, stdout: str, out: Path) -> dict:
    if not bench.json_from_stdout:
        return json.loads(out.read_text())
    return json.loads(stdout if stdout.startswith("{") else stdout[stdout.index("\n{") + 1 :])


def run_one(bench: Bench, quick: bool, work: Path, env: dict[str, str]) -> Outcome:
    out = work / f"{bench.name}.json"
    args = bench.quick if quick else bench.full
    cmd = [sys.executable, str(SCRIPTS / bench.script), *args]
    if not bench.json_from_stdout:
        cmd += ["--json", str(out)]
    started = time.monotonic()
    say(f"== {bench.name}: {' '.join(['python', 'scripts/' + bench.script, *args])}")
    status, stdout, stderr, cpu = _run_child(cmd, env, bench.limit_s, work / f"{bench.name}-log")

    def outcome(**kw) -> Outcome:
        return Outcome(bench, time.monotonic() - started, cpu_seconds=cpu, load=os.getloadavg()[0], **kw)

    if status is None:
        return outcome(error=f"over its limit of {bench.limit_s} s")
    if status != 0:
        tail = (stderr or stdout).strip().splitlines()[-6:]
        return outcome(error=f"exit status {status}: " + " / ".join(tail))
    try:
        return outcome(rows=bench.rows(_figures(bench, stdout, out)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return outcome(error=f"its figures could not be read ({type(exc).__name__}: {exc})")


def run_all(chosen: list[Bench], quick: bool, work: Path, env: dict[str, str], jobs: int) -> list[Outcome]:
    """Run the benchmarks in order, or with ``jobs`` 2 in two queues side by side (each by its
    ``lane``), a benchmark starting once those it ``needs`` are done: the shared cache (the
    dequantized base the training ones build) and the rendered pages are then ready for it."""
    done = {b.name: threading.Event() for b in chosen}
    outcomes: dict[str, Outcome] = {}

    def queue(lane: int) -> None:
        for bench in chosen:
            if jobs > 1 and bench.lane != lane:
                continue
            for need in bench.needs:
                if need in done:
                    done[need].wait()
            outcome = outcomes[bench.name] = run_one(bench, quick, work, env)
            done[bench.name].set()
            say(
                f"   {bench.name}: {outcome.error or 'done'} ({outcome.seconds:.0f} s, CPU {outcome.cpu_seconds:.0f} s)"
            )

    threads = [threading.Thread(target=queue, args=(lane,)) for lane in range(1, jobs)]
    for thread in threads:
        thread.start()
    queue(0)
    for thread in threads:
        thread.join()
    return [outcomes[b.name] for b in chosen]


def machine() -> list[str]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory = "?"
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))  # fmt: skip
        memory = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    present = [f for f in FLAGS if f in flags] or ["(not readable here)"]
    return [f"- CPU: {cpu}; {os.cpu_count()} logical cores; memory {memory}",
            f"- instruction sets: {', '.join(present)}",
            f"- system: {platform.platform()}; Python {platform.python_version()}"]  # fmt: skip


def versions() -> str:
    found = []
    for name in PARTS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "-C", str(SCRIPTS), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return "- versions: " + ", ".join(found) + (f"; commit {commit}" if commit else "")


def render(outcomes: list[Outcome], quick: bool, loads: tuple[float, float], command: str, work: Path,
           run: tuple[int, float]) -> str:  # fmt: skip
    """BENCHMARKS.md: the rows, the machine, each command (the temporary work folder shown as WORK);
    ``run`` is (jobs, wall seconds of the whole run)."""
    mark = {True: "met", False: "NOT met", None: "-"}
    lines = [
        "# lorekeeper benchmarks", "",
        f"Written by `{command}` on {datetime.date.today().isoformat()}"
        + (" (quick smoke run: sizes too small for the figures to mean much)" if quick else "") + ".",
        "Every ratio compares against a baseline measured in the same run on the same machine."
        + (" Nothing is skipped: each benchmark runs its real path (real models, llama.cpp, training "
           "steps) at the smallest size, see the commands below." if quick else ""), "",
        "| benchmark | figure | value | baseline | ratio | target | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for o in outcomes:
        if o.error:
            lines.append(f"| {o.bench.name} | failed after {o.seconds:.0f} s | {o.error} | | | | NOT met |")
        for r in o.rows:
            lines.append(f"| {o.bench.name} | {r.figure} | {r.value} | {r.baseline} | {r.ratio} | {r.target} | "
                         f"{mark[r.met]} |")  # fmt: skip
    lines += ["", "## Machine", "", *machine(), versions(),
              f"- load average: {loads[0]:.1f} at the start, {loads[1]:.1f} at the end", "",
              "## Commands and time", "",
              "Wall: seconds on the clock. CPU: user + system seconds of the benchmark's processes (`wait4` "
              "on its process), which other jobs on the machine barely change; on an idle machine "
              f"with {os.cpu_count()} cores the wall time lies between CPU / {os.cpu_count()} and CPU.", "",
              "| benchmark | wall | CPU | load after | command |", "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for o in outcomes:
        args = " ".join(o.bench.quick if quick else o.bench.full).replace(str(work), "WORK")
        lines.append(f"| {o.bench.name} | {o.seconds:.0f} s | {o.cpu_seconds:.0f} s | {o.load:.1f} | "
                     f"`python scripts/{o.bench.script} {args}` |")  # fmt: skip
    jobs, elapsed = run
    side = " (two at a time: training ones beside the others, so each shares the CPU)" if jobs > 1 else ""
    lines.append(f"| all{side} | {elapsed:.0f} s | {sum(o.cpu_seconds for o in outcomes):.0f} s | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run at the smallest sizes (about 3 minutes)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated: index, watch, mcp, finetune, parity, answers, ragft"
    )
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="where to write the report")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for the derived files every benchmark shares (the dequantized base model, "
                        "the exported ONNX embedder); default: a temporary one, built by the first benchmark "
                        "that needs it. Keep one between runs (CI can cache it) to skip that work.")  # fmt: skip
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                        help="2: two benchmarks at a time, training ones beside the others (default with "
                        "--quick; their figures then share the CPU); 1: one at a time (default)")  # fmt: skip
    args = parser.parse_args()
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: cannot create the folder {args.out.parent}: {exc}")
    with tempfile.TemporaryDirectory(prefix="lorekeeper-bench-all-") as tmp:
        work = Path(tmp)
        cache = (args.cache or work / "cache").resolve()
        env = dict(os.environ, LOREKEEPER_CACHE=str(cache))
        chosen = benches(work)
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {b.name for b in chosen})
        if unknown:
            parser.error(
                f"--only: unknown {', '.join(unknown)}; choose from {', '.join(b.name for b in chosen)}"
            )
        chosen = [b for b in chosen if not wanted or b.name in wanted]
        load_start, began = os.getloadavg()[0], time.monotonic()
        jobs = args.jobs or (2 if args.quick else 1)
        outcomes = run_all(chosen, args.quick, work, env, jobs)
        elapsed = time.monotonic() - began
    command = (
        "python scripts/bench.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if wanted else "")
        + (f" --jobs {args.jobs}" if args.jobs else "")
    )
    args.out.write_text(
        render(outcomes, args.quick, (load_start, os.getloadavg()[0]), command, work, (jobs, elapsed)),
        encoding="utf-8",
    )
    print(f"wrote {args.out}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
