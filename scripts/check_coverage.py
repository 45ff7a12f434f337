"""Which files of a real folder lorekeeper indexes, and why it leaves the others out.

Copies a bounded sample of files (every k-th file, by path, so the sample spreads over the folder)
from a folder of real documents - by default the system's shared documentation, /usr/share/doc,
with its changelogs, Debian copyright files and gzip-compressed texts - into a temporary folder,
indexes it with ``Indexer.add_root`` into a temporary index, and prints how many files were
indexed, failed, skipped and ignored, with the reasons counted and a few examples of each.

    python scripts/check_coverage.py                     # 400 files of /usr/share/doc
    python scripts/check_coverage.py --source ~/Notes --files 1000 --json out.json
    python scripts/check_coverage.py --fake-embedder        # the same counts, minutes faster
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def sample(source: Path, count: int) -> list[Path]:
    found = sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    if not found:
        sys.exit(f"error: no files under {source}")
    step = max(1, len(found) // count)
    return found[::step][:count]


def reason_kind(status: str, reason: str, kind: str) -> str:
    """A short name for a reason, to count them: the kind recorded for ignored files, else the
    reason without the file's own name and numbers."""
    if kind:
        return kind
    text = re.sub(r"/\S+", "FILE", reason)
    return re.sub(r"\d[\d.,]*", "N", text)[:90]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=Path("/usr/share/doc"))
    parser.add_argument("--files", type=int, default=400, help="files to copy (default 400)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--examples", type=int, default=3, help="example paths shown per reason")
    parser.add_argument("--fake-embedder", action="store_true",
                        help="the hashing test embedder: the same counts in a fraction of the time")  # fmt: skip
    args = parser.parse_args()

    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.settings import Settings, process_environment
    from lorekeeper.server.store import Store

    process_environment()
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-coverage-"))
    try:
        folder = work / "docs"
        picked = sample(args.source, args.files)
        for path in picked:
            target = folder / path.relative_to(args.source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        print(f"copied {len(picked)} files of {args.source} to {folder}")
        store = Store.open(work / "index.db")
        settings = Settings.load(home=work / "home")
        started = time.monotonic()
        embedder = None
        if args.fake_embedder:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from fakes import HashEmbedder

            embedder = HashEmbedder()
        report = Indexer(store, embedder, settings=settings).add_root(folder)
        seconds = time.monotonic() - started
        entries = store.files("all")
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_status = Counter(e.status for e in entries if not e.is_dir)
    folders = sum(1 for e in entries if e.is_dir)
    reasons: dict[str, Counter] = {}
    examples: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        if entry.status == "indexed":
            continue
        kind = reason_kind(entry.status, entry.reason, entry.kind)
        reasons.setdefault(entry.status, Counter())[kind] += 1
        examples.setdefault((entry.status, kind), []).append(
            f"{os.path.relpath(entry.path, folder)}: {entry.reason}"
        )
    gz_indexed = sum(1 for e in entries if e.status == "indexed" and e.path.endswith(".gz"))
    no_suffix = sum(1 for e in entries if e.status == "indexed" and not Path(e.path).suffix)
    print(f"indexed in {seconds:.0f} s: {report.embedded_chunks} chunks embedded")
    print(f"{len(picked)} files: " + ", ".join(f"{n} {status}" for status, n in by_status.most_common()))
    print(f"  indexed .gz files: {gz_indexed}; indexed files without an extension: {no_suffix}")
    if folders:
        print(f"  plus {folders} folders left out whole")
    for status, counter in reasons.items():
        print(f"{status}:")
        for kind, n in counter.most_common():
            print(f"  {n:5}  {kind}")
            for line in examples[(status, kind)][: args.examples]:
                print(f"           e.g. {line}"[:200])
    if args.json:
        args.json.write_text(json.dumps({
            "source": str(args.source), "files": len(picked), "by_status": dict(by_status),
            "folders_ignored": folders, "gz_indexed": gz_indexed, "no_suffix_indexed": no_suffix,
            "reasons": {s: dict(c) for s, c in reasons.items()}, "seconds": seconds,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
