"""Crash safety: kill lorekeeper with SIGKILL at random moments and prove nothing is lost or mixed.

Three kinds of trial, each repeated ``--trials`` times with its seed printed:

``add``       the folder is changed (files edited, added, deleted, renamed), then ``lorekeeper add``
              or ``reindex --full`` runs in a child process and is killed at a random moment;
``watch``     ``lorekeeper watch`` runs while this script edits, renames, adds and deletes files,
              and is killed in the middle of it;
``adapters``  a child registers fine-tuned adapters over and over (``AdapterRegistry.register``,
              the last step of ``finetune export``) and is killed mid-way.

After every kill: ``PRAGMA integrity_check`` is ok, every chunk has exactly one vector and one
keyword row and the other way round, no document has chunks of two versions
(``Store.check_integrity``). Then the command is run again to the end, and every file on disk must
be indexed exactly once, from the bytes on disk, and found by a keyword search for the marker word
it holds. For adapters: the record and the GGUF it names always belong together (the GGUF's hash
is in the record), and the next registration leaves no stray files.

    python scripts/crash_trials.py --files 1000 --trials 20 --fast     # a few minutes
    python scripts/crash_trials.py --files 1000 --trials 20            # with the real embedder

``--fast`` uses the test suite's hash embedder (tests/fakes.py) so a trial costs seconds, not a
model load; what is tested (transactions, files, the registry) is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from reliability_common import build_corpus, check_index, child_env, cli, marker, run_cli


class Folder:
    """The corpus on disk and what it should hold: {path: marker word}."""

    def __init__(self, root: Path, files: dict[Path, str]) -> None:
        self.root, self.files = root, dict(files)
        self.serial = len(files)
        self.lock = threading.Lock()

    def edit(self, rng: random.Random) -> None:
        path = rng.choice(sorted(self.files))
        text = path.read_text(encoding="utf-8", errors="replace")
        cut = rng.randrange(len(text) // 2 + 1)
        path.write_text(text[:cut] + f"\nedited {rng.random()}\n" + text[cut:], encoding="utf-8")

    def add(self, rng: random.Random) -> None:
        source = rng.choice(sorted(self.files))
        word = marker(self.serial)
        target = self.root / "new" / f"n{self.serial:05d}.txt"
        self.serial += 1
        target.parent.mkdir(exist_ok=True)
        body = source.read_text(encoding="utf-8", errors="replace").replace(self.files[source], word)
        target.write_text(body, encoding="utf-8")
        self.files[target.resolve()] = word

    def delete(self, rng: random.Random) -> None:
        path = rng.choice(sorted(self.files))
        path.unlink()
        del self.files[path]

    def rename(self, rng: random.Random) -> None:
        path = rng.choice(sorted(self.files))
        target = path.with_name(f"r{rng.randrange(10**6)}-{path.name}")
        os.replace(path, target)
        self.files[target] = self.files.pop(path)

    def change(self, rng: random.Random, count: int) -> None:
        with self.lock:
            for _ in range(count):
                getattr(self, rng.choice(("edit", "edit", "add", "delete", "rename")))(rng)


def _kill_after(proc: subprocess.Popen, seconds: float) -> tuple[bool, float]:
    """SIGKILL ``proc`` after ``seconds``; (whether it was killed, seconds it ran)."""
    started = time.monotonic()
    try:
        proc.wait(timeout=seconds)
        return False, time.monotonic() - started
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, seconds


def _report(kind: str, trial: int, seed: int, killed_at: float, killed: bool, problems: list[str]) -> bool:
    state = f"killed at {killed_at:5.2f} s" if killed else f"finished before {killed_at:5.2f} s"
    verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
    print(f"{kind:8} trial {trial:2d} seed {seed:10d}: {state}: {verdict}", flush=True)
    return not problems


def index_trial(ctx: dict, trial: int, seed: int) -> bool:
    rng = random.Random(seed)
    folder: Folder = ctx["folder"]
    folder.change(rng, rng.randint(5, 60))
    command = rng.choice((["add", str(folder.root)], ["reindex", "--full"], ["add", str(folder.root)]))
    proc = subprocess.Popen(
        [*cli(ctx["fast"]), "--db", str(ctx["db"]), *command],
        env=child_env(ctx["home"], ctx["fast"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # kill within the time this command took when it last ran to the end (at first: a full index)
    window = ctx["windows"].setdefault(command[0], ctx["kill_window"])
    at = rng.uniform(0.3, window)
    killed, ran = _kill_after(proc, at)
    if not killed:
        ctx["windows"][command[0]] = max(ran, 1.0)
    problems = [f"after the kill: {p}" for p in check_index(ctx["db"])]
    run_cli(["--db", str(ctx["db"]), "add", str(folder.root)], ctx["home"], ctx["fast"])
    problems += [f"after the restart: {p}" for p in check_index(ctx["db"], folder.files)]
    return _report("add", trial, seed, at, killed, problems)


def watch_trial(ctx: dict, trial: int, seed: int) -> bool:
    rng = random.Random(seed)
    folder: Folder = ctx["folder"]
    proc = subprocess.Popen(
        [*cli(ctx["fast"]), "--db", str(ctx["db"]), "watch"],
        env=child_env(ctx["home"], ctx["fast"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            folder.change(rng, 3)
            time.sleep(rng.uniform(0.0, 0.05))

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    at = rng.uniform(ctx["startup"], ctx["startup"] + min(15.0, ctx["kill_window"]))
    killed, _ = _kill_after(proc, at)
    stop.set()
    worker.join()
    problems = [f"after the kill: {p}" for p in check_index(ctx["db"])]
    run_cli(["--db", str(ctx["db"]), "add", str(folder.root)], ctx["home"], ctx["fast"])
    problems += [f"after the restart: {p}" for p in check_index(ctx["db"], folder.files)]
    return _report("watch", trial, seed, at, killed, problems)


# ---------------------------------------------------------------------------- adapters

ADAPTER = "crash"


def _register(directory: Path, gguf: Path) -> None:
    from lorekeeper.server.adapters import AdapterRecord, AdapterRegistry

    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    AdapterRegistry(directory).register(ADAPTER, gguf, AdapterRecord(name=ADAPTER, description=digest))


def adapter_child(directory: Path, ggufs: list[Path]) -> None:
    """Register the GGUFs in turn, for ever (until killed)."""
    while True:
        for gguf in ggufs:
            _register(directory, gguf)


def _adapter_problems(directory: Path, settled: bool) -> list[str]:
    from lorekeeper.server.adapters import AdapterRegistry

    registry = AdapterRegistry(directory)
    if ADAPTER not in registry.names():
        return ["the adapter is not registered any more"]
    record = registry.read(ADAPTER)
    gguf = directory / record.adapter_file
    problems = []
    if hashlib.sha256(gguf.read_bytes()).hexdigest() != record.description:
        problems.append(f"the record names {record.adapter_file}, whose bytes are another registration's")
    if settled:
        left = sorted(
            p.name for p in directory.iterdir() if p.name not in (f"{ADAPTER}.json", record.adapter_file)
        )
        if left:
            problems.append(f"files left behind after a clean registration: {left}")
    return problems


def adapter_trial(ctx: dict, trial: int, seed: int) -> bool:
    rng = random.Random(seed)
    directory, ggufs = ctx["adapters"], ctx["ggufs"]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--adapter-child", str(directory), *map(str, ggufs)],
        env=child_env(ctx["home"], True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    at = rng.uniform(ctx["startup"], ctx["startup"] + 3.0)
    killed, _ = _kill_after(proc, at)
    problems = [f"after the kill: {p}" for p in _adapter_problems(directory, settled=False)]
    _register(directory, rng.choice(ggufs))
    problems += [f"after the next registration: {p}" for p in _adapter_problems(directory, settled=True)]
    return _report("adapters", trial, seed, at, killed, problems)


# ---------------------------------------------------------------------------- the run


def _setup(args: argparse.Namespace, work: Path) -> dict:
    corpus = build_corpus(work / "docs", args.files, args.seed)
    ctx = {"fast": args.fast, "home": work / "home", "db": work / "index.db", "windows": {}}
    ctx["folder"] = Folder((work / "docs").resolve(), corpus)
    started = time.monotonic()
    run_cli(["--db", str(ctx["db"]), "add", str(ctx["folder"].root)], ctx["home"], args.fast)
    first = ctx["first"] = time.monotonic() - started
    problems = check_index(ctx["db"], ctx["folder"].files)
    print(f"indexed {len(corpus)} files in {first:.1f} s; fresh index: {'ok' if not problems else problems}")
    if problems:
        raise SystemExit("the first, uninterrupted index is already wrong: " + "; ".join(problems))
    started = time.monotonic()
    subprocess.run([*cli(args.fast), "--help"], env=child_env(ctx["home"], args.fast), capture_output=True)
    ctx["startup"] = time.monotonic() - started  # kill the watcher only once it can be running
    ctx["adapters"] = work / "adapters"
    ctx["ggufs"] = []
    for i, megabytes in enumerate((1, 6, 24)):
        gguf = work / f"adapter-{i}.gguf"
        gguf.write_bytes(b"GGUF" + os.urandom(megabytes * 2**20))
        ctx["ggufs"].append(gguf)
    _register(ctx["adapters"], ctx["ggufs"][0])
    return ctx


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--adapter-child":
        adapter_child(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="real files in the folder (at least 1000)")
    parser.add_argument("--trials", type=int, default=20, help="kills per kind of trial")
    parser.add_argument("--kinds", default="add,watch,adapters", help="which trials, comma-separated")
    parser.add_argument("--seed", type=int, default=None, help="seed of the whole run (printed)")
    parser.add_argument("--kill-window", type=float, default=None, help="latest kill, in seconds (default: "
                        "the time a first full index took)")  # fmt: skip
    parser.add_argument("--fast", action="store_true", help="hash embedder instead of the real model")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"crash trials: seed {args.seed}, {args.files} files, {args.trials} trials each of {args.kinds}")
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-crash-"))
    try:
        ctx = _setup(args, work)
        ctx["kill_window"] = args.kill_window or max(2.0, ctx["first"])
        return _run_trials(args, ctx)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")


def _run_trials(args: argparse.Namespace, ctx: dict) -> int:
    trials = {"add": index_trial, "watch": watch_trial, "adapters": adapter_trial}
    master = random.Random(args.seed)
    summary = {}
    started = time.monotonic()
    for kind in args.kinds.split(","):
        results = [trials[kind](ctx, t + 1, master.randrange(2**31)) for t in range(args.trials)]
        summary[kind] = {"trials": len(results), "failed": results.count(False)}
    print(json.dumps({"seed": args.seed, "files": args.files, "seconds": round(time.monotonic() - started),
                      "results": summary}))  # fmt: skip
    return 1 if any(s["failed"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
