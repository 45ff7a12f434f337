"""What the reliability scripts share: a corpus of real files, the ``lorekeeper`` command as a
child process, and the checks an index must pass.

Used by ``crash_trials.py``, ``watch_endurance.py`` and ``load_mcp.py``. The corpus is real text
nobody here wrote (the Python standard library's sources and the system's shared documentation),
copied into a temporary folder with one marker word appended to each file, so a keyword search can
prove that every file is findable.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests"  # the hash embedder and scripted generator, for --fast runs
SOURCES = (Path(sysconfig.get_paths()["stdlib"]), Path("/usr/lib/python3"), Path("/usr/share/doc"))
SUFFIXES = (".py", ".txt", ".md", ".rst", ".html", ".htm")
MIN_BYTES, MAX_BYTES = 200, 64 * 1024


def marker(index: int) -> str:
    """A word that occurs in exactly one file of the corpus."""
    return f"lkmark{index:05d}q"


def _candidates(seed: int) -> list[Path]:
    found: list[Path] = []
    for source in SOURCES:
        if not source.is_dir():
            continue
        for directory, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test", "tests", "idlelib"))
            for name in sorted(filenames):
                path = Path(directory, name)
                if path.suffix.lower() not in SUFFIXES or path.is_symlink():
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if MIN_BYTES <= size <= MAX_BYTES:
                    found.append(path)
    random.Random(seed).shuffle(found)
    return found


def _with_marker(data: bytes, suffix: str, word: str) -> bytes:
    if suffix in (".html", ".htm"):  # inside the part of the page the loader reads
        for tag in (rb"main", rb"article", rb"body"):
            closings = list(re.finditer(rb"</" + tag + rb"\s*>", data, re.I))
            if closings and (tag != b"article" or len(closings) == 1):
                at = closings[-1].start()
                return data[:at] + f"\n<p>{word}</p>\n".encode() + data[at:]
        return data + f"\n<p>{word}</p>\n".encode()
    if suffix == ".py":
        return data.rstrip(b"\n") + f"\n# {word}\n".encode()
    return data.rstrip(b"\n") + f"\n\n{word}\n".encode()


def build_corpus(dest: Path, count: int, seed: int, per_folder: int = 40) -> dict[Path, str]:
    """Copy ``count`` real text files into ``dest`` (``per_folder`` to a subfolder), each with its
    marker word appended; return {copy: marker}."""
    corpus: dict[Path, str] = {}
    for source in _candidates(seed):
        if len(corpus) == count:
            break
        try:
            data = source.read_bytes()
        except OSError:
            continue
        if b"\x00" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        index = len(corpus)
        target = dest / f"g{index // per_folder:03d}" / f"{index:05d}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_with_marker(data, source.suffix.lower(), marker(index)))
        corpus[target.resolve()] = marker(index)
    if len(corpus) < count:
        raise SystemExit(f"only {len(corpus)} usable files found under {', '.join(map(str, SOURCES))}")
    return corpus


def child_env(home: Path, fast: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LOREKEEPER_HOME=str(home), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if fast:
        env.update(LOREKEEPER_EMBEDDER="test-hash-64", LOREKEEPER_GENERATOR="scripted")
    return env


def cli(fast: bool) -> list[str]:
    """The ``lorekeeper`` command; with ``fast``, with the test fakes registered (no model loads)."""
    if fast:
        return [sys.executable, str(FAKES / "serve_with_fakes.py")]
    return [sys.executable, "-m", "lorekeeper.server.cli"]


def run_cli(args: list[str], home: Path, fast: bool, timeout: float = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*cli(fast), *args], env=child_env(home, fast), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"lorekeeper {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_index(db: Path, expected: dict[Path, str] | None = None, *, search: bool = True) -> list[str]:
    """Problems with the index at ``db``: its own integrity checks, then (with ``expected``, the
    files that must be indexed and their marker words) that each is indexed exactly once with the
    bytes now on disk, that nothing else is, and that a keyword search for its marker finds it."""
    from lorekeeper.server.store import Store

    with Store.open(db, create=False) as store:
        problems = store.check_integrity()
        if expected is None:
            return problems
        docs = {d.path: d for d in store.documents()}
        want = {str(p) for p in expected}
        extra = sorted(set(docs) - want)
        missing = sorted(want - set(docs))
        if extra:
            problems.append(f"{len(extra)} documents that are not on disk, e.g. {extra[:3]}")
        if missing:
            problems.append(f"{len(missing)} files not indexed, e.g. {missing[:3]}")
        stale = [
            p
            for p in want & set(docs)
            if docs[p].status != "indexed" or docs[p].content_hash != file_sha256(Path(p))
        ]
        if stale:
            problems.append(f"{len(stale)} documents not indexed from the bytes on disk, e.g. {stale[:3]}")
        if search:
            problems += _marker_problems(store, expected)
    return problems


def _marker_problems(store, expected: dict[Path, str]) -> list[str]:
    unfound = []
    for path, word in expected.items():
        hits = store.keyword_search(word, k=3)
        paths = {hit.path for hit in store.chunk_hits([h[0] for h in hits]).values()}
        if paths != {str(path)}:
            unfound.append(f"{path.name} ({word}: {sorted(paths)[:2]})")
    return (
        [f"{len(unfound)} files whose marker search does not find them alone, e.g. {unfound[:3]}"]
        if unfound
        else []
    )


def percentiles(values: Iterable[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {f"p{p}": float("nan") for p in points}
    return {f"p{p}": ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] for p in points}
