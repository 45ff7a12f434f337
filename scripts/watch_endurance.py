"""Watcher endurance: thousands of file operations in bursts, then the live index must equal a fresh
index of the same folder, document for document and chunk for chunk.

A folder of real files (see reliability_common.py) is indexed and watched by a running ``Watcher``
(its periodic reconcile is switched off, so only file events count). Then ``--ops`` operations run in
bursts of random size with short pauses: files created, edited in place, appended to, saved the way
editors save (a temporary file renamed over the original; vim's rename-to-backup, write, delete),
renamed, moved between folders and deleted; whole folders moved out of the root and back in; large
files written among the small ones. After the last burst the watcher is given time to settle, and
the live index is compared with a fresh index of the folder built from scratch: the same documents,
the same content hashes, the same chunk texts in the same order. Every difference is printed.

After some bursts that wrote a large file, a small file is saved and the time until a search finds
it is measured ("small after large").

    python scripts/watch_endurance.py --ops 10000 --files 600            # hash embedder, minutes
    python scripts/watch_endurance.py --ops 2000 --files 300 --real      # the real embedder
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from reliability_common import FAKES, build_corpus, percentiles

LARGE_BYTES = 1_500_000


class Churn:
    """Random file operations on ``root``; ``staging`` (outside the root) holds folders moved out."""

    def __init__(self, root: Path, staging: Path, rng: random.Random, texts: list[str]) -> None:
        self.root, self.staging, self.rng, self.texts = root, staging, rng, texts
        self.counts: Counter[str] = Counter()
        self.serial = 0
        self.large_written = False

    def _files(self) -> list[Path]:
        return [Path(d, f) for d, _, names in os.walk(self.root) for f in names]

    def _dirs(self) -> list[Path]:
        return [Path(d) for d, _, _ in os.walk(self.root) if Path(d) != self.root]

    def _text(self) -> str:
        self.serial += 1
        return self.rng.choice(self.texts) + f"\n\nchurn word cw{self.serial}x\n"

    def _new_path(self, suffix: str = ".txt") -> Path:
        folders = [self.root, *self._dirs()]
        return self.rng.choice(folders) / f"c{self.serial}-{self.rng.randrange(10**6)}{suffix}"

    def create(self) -> None:
        self._new_path(self.rng.choice([".txt", ".md", ".py"])).write_text(self._text(), encoding="utf-8")

    def edit(self, path: Path) -> None:
        path.write_text(self._text(), encoding="utf-8")

    def append(self, path: Path) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"\nappended cw{self.serial}x line\n")
        self.serial += 1

    def atomic_save(self, path: Path) -> None:
        temp = path.with_name(f".{path.name}.{self.rng.randrange(10**6)}.tmp")
        temp.write_text(self._text(), encoding="utf-8")
        os.replace(temp, path)

    def vim_save(self, path: Path) -> None:
        backup = path.with_name(path.name + "~")
        os.replace(path, backup)
        path.write_text(self._text(), encoding="utf-8")
        backup.unlink()

    def rename(self, path: Path) -> None:
        os.replace(path, self._new_path(path.suffix))

    def delete(self, path: Path) -> None:
        path.unlink()

    def large(self) -> None:
        body = "\n\n".join(self.rng.choice(self.texts) for _ in range(400))
        self._new_path(".txt").write_text(body[:LARGE_BYTES] + self._text(), encoding="utf-8")
        self.large_written = True

    def dir_out(self) -> None:
        dirs = [d for d in self._dirs() if d.parent == self.root]
        if dirs:
            os.rename(self.rng.choice(dirs), self.staging / f"out{self.serial}")
            self.serial += 1

    def dir_in(self) -> None:
        away = sorted(self.staging.iterdir())
        if away:
            os.rename(self.rng.choice(away), self.root / f"back{self.serial}")
            self.serial += 1

    def one(self) -> None:
        files = self._files()
        kinds = ["create", "edit", "append", "atomic_save", "vim_save", "rename", "delete"] * 6
        kinds += ["dir_out", "dir_in", "large"]
        kind = self.rng.choice(kinds) if files else "create"
        if kind in ("edit", "append", "atomic_save", "vim_save", "rename", "delete"):
            getattr(self, kind)(self.rng.choice(files))
        else:
            getattr(self, kind)()
        self.counts[kind] += 1


def _compare(live, fresh) -> list[str]:
    """Every difference between two stores: documents, statuses, content hashes, chunk texts."""
    a = {d.path: d for d in live.documents()}
    b = {d.path: d for d in fresh.documents()}
    problems = [f"only in the live index (stale): {p}" for p in sorted(set(a) - set(b))]
    problems += [f"missing from the live index: {p}" for p in sorted(set(b) - set(a))]
    for path in sorted(set(a) & set(b)):
        if (a[path].status, a[path].content_hash) != (b[path].status, b[path].content_hash):
            problems.append(f"{path}: live {a[path].status}/{a[path].content_hash} != fresh "
                            f"{b[path].status}/{b[path].content_hash}")  # fmt: skip
        elif [c.text for c in live.document_chunks(path)] != [c.text for c in fresh.document_chunks(path)]:
            problems.append(f"{path}: chunk texts differ")
    return problems + [f"live index: {p}" for p in live.check_integrity()]


def _searchable_after(store, root: Path, word: str, limit: float = 30.0) -> float | None:
    started = time.monotonic()
    (root / f"probe-{word}.txt").write_text(f"a small note with {word} in it\n", encoding="utf-8")
    while time.monotonic() - started < limit:
        if store.keyword_search(word, k=1):
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def _embedder(real: bool):
    from lorekeeper import plugins

    if real:
        return plugins.get_embedder()
    sys.path.insert(0, str(FAKES))
    from fakes import HashEmbedder

    return HashEmbedder()


def _bursts(args: argparse.Namespace, churn: Churn, store, rng: random.Random) -> list[float]:
    """Run the operations; return the small-after-large latencies (None = not found in time)."""
    done, probes = 0, []
    started = time.monotonic()
    while done < args.ops:
        size = min(args.ops - done, rng.randint(1, args.max_burst))
        churn.large_written = False
        for _ in range(size):
            churn.one()
        done += size
        if churn.large_written and len(probes) < args.probes:
            probes.append(_searchable_after(store, churn.root, f"probe{len(probes)}zz"))
        time.sleep(rng.uniform(0, args.max_pause))
        if done // 1000 != (done - size) // 1000:
            print(f"  {done} operations in {time.monotonic() - started:.0f} s", flush=True)
    return probes


def run(args: argparse.Namespace, work: Path) -> dict:
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.settings import Settings
    from lorekeeper.server.store import Store
    from lorekeeper.server.watcher import Watcher

    root, staging = work / "root", work / "staging"
    staging.mkdir(parents=True)
    corpus = build_corpus(root, args.files, args.seed, per_folder=25)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in list(corpus)[:200]]
    settings = Settings.load({"db": str(work / "live.db")}, home=work / "home")
    embedder = _embedder(args.real)
    rng = random.Random(args.seed)
    with Store.open(work / "live.db") as live:
        indexer = Indexer(live, embedder, settings=settings)
        indexer.add_root(root)
        watcher = Watcher(indexer, settings=settings, reconcile_interval=10**9)
        watcher.start()
        watcher.wait_idle(600)
        churn = Churn(root.resolve(), staging, rng, texts)
        started = time.monotonic()
        probes = _bursts(args, churn, live, rng)
        churned = time.monotonic() - started
        settled = watcher.wait_idle(args.settle)
        settle_s = time.monotonic() - started - churned
        watcher.stop()
        with Store.open(work / "fresh.db") as fresh:
            Indexer(fresh, embedder, settings=settings).add_root(root)
            problems = _compare(live, fresh)
            documents = len(fresh.documents())
    found = [p for p in probes if p is not None]
    return {
        "seed": args.seed, "operations": args.ops, "kinds": dict(churn.counts), "files_at_end": documents,
        "churn_seconds": round(churned, 1), "settle_seconds": round(settle_s, 1), "settled": settled,
        "small_after_large_s": {k: round(v, 3) for k, v in percentiles(found, (50, 95)).items()}
        | {"probes": len(probes), "not_found_in_30s": len(probes) - len(found)},
        "differences": len(problems), "examples": problems[:25], "watcher_errors": list(watcher.errors)[:10],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=10_000, help="file operations in all")
    parser.add_argument("--files", type=int, default=600, help="real files in the folder at the start")
    parser.add_argument("--max-burst", type=int, default=200, help="largest burst of operations")
    parser.add_argument("--max-pause", type=float, default=0.3, help="longest pause between bursts (s)")
    parser.add_argument("--probes", type=int, default=20, help="small-after-large measurements")
    parser.add_argument("--settle", type=float, default=600, help="seconds the watcher may take to catch up")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--real", action="store_true", help="the real embedder instead of the hash one")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"watch endurance: seed {args.seed}, {args.ops} operations on {args.files} files", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-endurance-"))
    try:
        report = run(args, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if report["differences"] == 0 and report["settled"] else 1


if __name__ == "__main__":
    sys.exit(main())
