"""CLI latency: wall time of ``lorekeeper search "..."`` as a user runs it, three ways, in one run.

1. ``torch``: the embedder on torch (``LOREKEEPER_EMBEDDER_RUNTIME=torch``), no server: the path every
   search took before the ONNX embedder (a keyword search never embeds, so it shows what is left).
2. ``onnx cold``: a fresh process with the ONNX embedder (the graph already exported), no server.
3. ``server``: a running ``lorekeeper serve --http`` for the same index answers the command.

The folder is real text nobody here wrote: up to ``--files`` small README/Markdown/text files from the
system's shared documentation folder (topped up with the standard library's sources), copied into a
temporary directory and indexed once. Every command is a fresh ``subprocess`` of the installed
``lorekeeper`` entry point, exactly what a shell runs; the three ways and both modes (keyword,
hybrid) are interleaved run by run, so a shared machine's drifting load falls on all of them alike.
The table gives p50 and p90 wall time, p50 CPU time of the child process (user+sys; contention
distorts it least), and the ratio of the torch p50 to each way's p50 (higher is faster). Each way's
hits must equal the others' (checked on ``--json`` output).

Run ``python scripts/bench_cli.py`` (about 10 minutes on two busy cores; the torch runs dominate) or
``--runs 3 --files 20`` for a quicker look.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERIES = ("how to report a bug", "license terms for redistribution", "configuration file options")
WAYS = ("torch", "onnx cold", "server")
MODES = ("keyword", "hybrid")


def corpus(target: Path, limit: int) -> int:
    """Copy up to ``limit`` small real text files into ``target``; returns how many."""
    target.mkdir(parents=True)
    found = []
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        name = path.name
        if (name.startswith("README") or name.endswith((".md", ".txt"))) and path.is_file():
            if 500 < path.stat().st_size < 60_000:
                found.append(path)
    found += sorted((Path(os.__file__).parent).glob("*.py"))[:limit]
    for i, path in enumerate(found[:limit]):
        suffix = path.suffix if path.suffix in (".md", ".txt", ".py") else ".txt"
        shutil.copyfile(path, target / f"{i:03d}-{path.parent.name}-{path.stem}{suffix}")
    return min(limit, len(found))


def lorekeeper() -> list[str]:
    exe = shutil.which("lorekeeper")
    return [exe] if exe else [sys.executable, "-m", "lorekeeper.server.cli"]


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, child CPU s, stdout) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: list[str], env: dict, port: int) -> subprocess.Popen:
    server = subprocess.Popen([*base, "serve", "--http", "--port", str(port), "--no-watcher"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 300 s") from None
            time.sleep(0.2)


def hits_of(stdout: str) -> list[tuple[str, int]]:
    return [(h["path"], h["chunk_id"]) for h in json.loads(stdout)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per way and mode (default 5)")
    ap.add_argument("--files", type=int, default=40, help="files in the folder (default 40)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorekeeper-bench-cli-"))
    try:
        n_files = corpus(work / "docs", args.files)
        port = free_port()
        env = dict(os.environ, LOREKEEPER_HOME=str(work / "home"), LOREKEEPER_HTTP_PORT=str(port),
                   OMP_WAIT_POLICY="PASSIVE")  # fmt: skip
        env.pop("LOREKEEPER_TOKEN", None)
        base = [*lorekeeper(), "--db", str(work / "index.db")]
        start = time.perf_counter()
        timed([*base, "add", str(work / "docs")], env)  # exports the ONNX graph once, then indexes
        print(f"indexed {n_files} files in {time.perf_counter() - start:.1f} s (ONNX export included)")
        ways = {
            "torch": dict(env, LOREKEEPER_EMBEDDER_RUNTIME="torch", LOREKEEPER_REUSE_SERVER="false"),
            "onnx cold": dict(env, LOREKEEPER_EMBEDDER_RUNTIME="auto", LOREKEEPER_REUSE_SERVER="false"),
            "server": dict(env, LOREKEEPER_REUSE_SERVER="true"),
        }
        server = start_server(base, env, port)
        try:
            timed([*base, "search", "warm the server up", "--json"], ways["server"])  # its model loads
            walls, cpus, answers = run_rounds(base, ways, args.runs)
        finally:
            server.terminate()
            server.wait(timeout=60)
        report(walls, cpus, answers, args.runs, n_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_rounds(base: list[str], ways: dict, runs: int) -> tuple[dict, dict, dict]:
    walls: dict = {(w, m): [] for w in WAYS for m in MODES}
    cpus: dict = {(w, m): [] for w in WAYS for m in MODES}
    answers: dict = {}
    for run in range(runs):
        query = QUERIES[run % len(QUERIES)]
        for mode in MODES:
            for way in WAYS if run % 2 == 0 else reversed(WAYS):
                cmd = [*base, "search", query, "--mode", mode, "-k", "5", "--json"]
                wall, cpu, out = timed(cmd, ways[way])
                walls[way, mode].append(wall)
                cpus[way, mode].append(cpu)
                answers.setdefault((mode, query), {})[way] = hits_of(out)
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return walls, cpus, answers


def report(walls: dict, cpus: dict, answers: dict, runs: int, n_files: int) -> None:
    load = os.getloadavg()
    print(f"\nlorekeeper search, {runs} runs per cell, {n_files} files, load average {load[0]:.1f}")
    print(f"{'mode':8} {'way':10} {'p50 wall s':>10} {'p90 wall s':>10} {'p50 CPU s':>9} {'vs torch':>9}")
    for mode in MODES:
        ref = statistics.median(walls["torch", mode])
        for way in WAYS:
            wall = sorted(walls[way, mode])
            p50, p90 = statistics.median(wall), wall[min(len(wall) - 1, int(0.9 * len(wall)))]
            cpu = statistics.median(cpus[way, mode])
            print(f"{mode:8} {way:10} {p50:10.2f} {p90:10.2f} {cpu:9.2f} {ref / p50:8.1f}x")
    differ = [key for key, by_way in answers.items() if len({json.dumps(v) for v in by_way.values()}) > 1]
    print("hits: the same every way" if not differ else f"hits differ between ways for {differ}")


if __name__ == "__main__":
    main()
