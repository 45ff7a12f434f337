"""How long a small file saved under a running watcher takes to become searchable, with and without
a large file being embedded at the same time.

A temporary folder is watched (``Watcher``, the real embedder unless ``--fake-embedder``). First
``--saves`` small files are saved one after another with nothing else going on ("idle"). Then a
large text file (``--big-mb``, built from the changelogs in /usr/share/doc, else generated) is
written, and once the embedder is working on it the same number of small files are saved
("busy"). Each small file's latency is the time from its save to the moment a keyword search finds
its unique word. The large file's own time to searchable is reported too. Bounded by ``--timeout``.

    python scripts/bench_watch_interleave.py                 # 5 saves each way, a 1.2 MB file
    python scripts/bench_watch_interleave.py --saves 3 --big-mb 0.5 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def big_text(megabytes: float, salt: str) -> str:
    """Real changelog text of about ``megabytes``, every paragraph made unique by ``salt`` (so no
    vector comes from the embedding cache)."""
    parts: list[str] = []
    size = 0
    for path in sorted(Path("/usr/share/doc").glob("*/changelog*.gz")):
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        parts.append(text)
        size += len(text)
        if size >= megabytes * 2**20:
            break
    if size < megabytes * 2**20:  # no system documentation here: generated prose
        words = "harbour ferry tide timetable lighthouse keeper weather log release fixed".split()
        while size < megabytes * 2**20:
            line = " ".join(words[(size + i) % len(words)] for i in range(12)) + ".\n"
            parts.append(line)
            size += len(line)
    text = "".join(parts)[: int(megabytes * 2**20)]
    return "\n\n".join(f"[{salt}] {para}" for para in text.split("\n\n"))


class Timing:
    """Wraps an embedder and notes when it was last called (to know the large file is in flight)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        for name in ("model_id", "dimension", "max_tokens"):
            setattr(self, name, getattr(inner, name))

    def embed(self, texts):
        self.calls += 1
        return self.inner.embed(texts)

    def embed_query(self, text):
        return self.inner.embed_query(text)

    def token_spans(self, text):
        return self.inner.token_spans(text)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)


def searchable(store, word: str) -> bool:
    from lorekeeper.server.search import search

    return bool(search(store, None, word, k=1, mode="keyword"))


def save_and_time(store, folder: Path, name: str, deadline: float) -> float | None:
    word = f"zq{name.replace('-', '')}marker"
    start = time.monotonic()
    (folder / f"{name}.md").write_text(f"# {name}\nA small note with the word {word} in it.\n")
    while time.monotonic() < deadline:
        if searchable(store, word):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def save_series(store, folder: Path, prefix: str, count: int, gap: float, deadline: float,
                stop: threading.Event | None = None) -> list[float | None]:  # fmt: skip
    """Save ``count`` small files ``gap`` seconds apart and time each; stop early once ``stop`` is set."""
    seconds: list[float | None] = []
    for i in range(count):
        if stop is not None and stop.is_set():
            break
        seconds.append(save_and_time(store, folder, f"{prefix}-{i}", deadline))
        time.sleep(gap)
    return seconds


def summary(values: list[float | None]) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "none searchable before the timeout"
    return (f"median {statistics.median(done):.2f} s, max {max(done):.2f} s ({len(done)}/{len(values)} "
            f"searchable; each: {', '.join(f'{v:.2f}' if v is not None else 'timeout' for v in values)})")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--saves", type=int, default=5, help="small files saved each way (default 5)")
    parser.add_argument("--big-mb", type=float, default=1.2, help="size of the large file (default 1.2)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between two small saves")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    parser.add_argument("--fake-embedder", action="store_true", help="the hashing test embedder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def make_embedder(fake: bool):
    """The hashing test embedder, or the real one."""
    from lorekeeper import plugins

    if fake:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from fakes import HashEmbedder

        return HashEmbedder()
    return plugins.get_embedder()


def measure(args: argparse.Namespace, embedder: Timing, folder: Path, store, indexer, deadline: float):
    """Time the idle saves, then the busy saves while the large file embeds; return (idle, busy,
    seconds until the large file was indexed or None, its chunks)."""
    from lorekeeper.server.watcher import Watcher

    big_seconds = None
    big_done = threading.Event()
    store.add_listener(
        lambda event, path: big_done.set() if path.endswith("big.txt") and event == "indexed" else None
    )
    watcher = Watcher(indexer, debounce=0.2, reconcile_interval=3600)
    watcher.start()
    try:
        watcher.wait_idle(60)
        idle = save_series(store, folder, "idle", args.saves, args.gap, deadline)
        text = big_text(args.big_mb, salt=str(time.time()))
        calls = embedder.calls
        big_start = time.monotonic()
        (folder / "big.txt").write_text(text)
        while embedder.calls == calls and time.monotonic() < deadline:
            time.sleep(0.02)  # the embedder is now working on the large file
        busy = save_series(store, folder, "busy", args.saves, args.gap, deadline, stop=big_done)
        if big_done.wait(max(0.0, deadline - time.monotonic())):
            big_seconds = time.monotonic() - big_start
        chunks = len(store.document_chunks((folder / "big.txt").resolve()))
    finally:
        watcher.stop()
    return idle, busy, big_seconds, chunks


def main() -> None:
    args = parse_args()

    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.settings import process_environment
    from lorekeeper.server.store import Store

    process_environment()
    inner = make_embedder(args.fake_embedder)
    embedder = Timing(inner)
    embedder.embed(["warm up the model before anything is timed"])
    deadline = time.monotonic() + args.timeout
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-interleave-"))
    folder = work / "docs"
    folder.mkdir()
    (folder / "start.md").write_text("# Start\nThe watched folder.\n")
    store = Store.open(work / "index.db")
    try:
        indexer = Indexer(store, embedder)
        indexer.add_root(folder)
        idle, busy, big_seconds, chunks = measure(args, embedder, folder, store, indexer, deadline)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"embedder: {inner.model_id}; large file: {args.big_mb:g} MB, {chunks} chunks, "
          f"searchable after {big_seconds:.1f} s" if big_seconds else "large file: not searchable before the timeout")  # fmt: skip
    print(f"small file saved, nothing else running:       {summary(idle)}")
    print(f"small file saved while the large one embeds:  {summary(busy)}")
    if args.json:
        args.json.write_text(json.dumps({"idle": idle, "busy": busy, "big_seconds": big_seconds, "big_chunks": chunks,
                                         "big_mb": args.big_mb, "embedder": inner.model_id,
                                         "load": os.getloadavg()[0]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
