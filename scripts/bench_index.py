"""Index benchmark: what the index costs on top of the embedder, how fast a save becomes searchable,
and how search latency compares with exact numpy search.

Three measurements in one run, each against a baseline taken in the same run on the same machine:

1. Throughput. A few thousand small real text files (the Python standard library's sources, the
   Python documentation from Debian's ``python3-doc``, the system's shared documentation folder and
   the installed third-party packages' sources, taken in turn) are copied into a temporary folder,
   split into slices, and each slice is indexed with
   ``Indexer.add_root``. Next to each slice, the raw embedder embeds the exact texts the index sends
   to it (``chunk.embed_text`` of every chunk not embedded before) in batches of the indexer's own
   batch size: after indexing on even slices, before it on odd ones (texts cut beforehand the way
   the indexer cuts them, checked against the index afterwards). Alternating slices and order
   spreads the drifting load of a shared machine over both sides. The ratio is raw-embedding time
   over indexing time (1.0 = the index adds nothing; target >= 0.9); the same ratio in process CPU
   time is reported beside it.
2. Save-to-searchable latency under a running ``Watcher`` on that index: new files, in-place
   modifications and editor-style saves (temporary file renamed over the original). Measured from the
   moment before the write until the store's listener fires "indexed", and until ``search()``
   returns the file for the marker word it contains (target p95 < 1 s).
3. Search latency at two index sizes (default 10k and 100k chunks) in vector, keyword and hybrid
   mode, against exact numpy search (``X @ q`` then top-k) over the very same vectors. Embedding
   100k chunks would take most of an hour, so the search index is filled with real text chunks
   (every chunk of part 1 with its real vector first, then more chunks cut from further real files)
   and, for the chunks the model never saw, vectors synthesised from real ones: a random real vector
   plus 0.35 of another random real vector plus Gaussian noise of norm ~0.35, re-normalised. They
   keep the real vectors' anisotropy and cluster structure, which is what a k-NN scan's cost and
   the fusion's work depend on. Query vectors are embedded once up front (their cost is reported
   separately), so the search figures are the index's own work.

Run ``python scripts/bench_index.py`` (10-30 minutes on two cores) or ``--quick`` (about two
minutes, for smoke tests). ``--json OUT`` writes every figure to a file.

The three measurements share the corpus, the index and the report, so the script stays one file
(about 1,100 lines, each step its own short function) that anyone runs with one command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("bench_index")

MIN_FILE_BYTES = 200
SYNTH_MIX = 0.35  # weight of the second real vector, and norm of the noise, in a synthetic vector
SEARCH_K = 10
QUERIES = [
    "how do I parse command line arguments",
    "read rows from a csv file",
    "license terms for redistribution in binary form",
    "thread safe queue between producer and consumer",
    "regular expression named groups",
    "format a date with strftime",
    "compress data with gzip",
    "unit test assertions for exceptions",
    "socket timeout while connecting",
    "encode custom objects as json",
    "asyncio run the event loop until a task completes",
    "pass environment variables to a subprocess",
    "GNU General Public License version 2 or later",
    "changelog of bug fixes in the new release",
    "unicode normalization of strings",
    "sqlite3 connection commit and rollback",
    "logging handler that rotates files",
    "decimal rounding and precision",
    "hash a password securely",
    "simple http server request handler",
    "parse xml with element tree",
    "temporary directory cleaned up afterwards",
    "pickle is not secure against malicious data",
    "random sample without replacement",
    "dataclass field default factory",
    "generic type hints and aliases",
    "signal handler for keyboard interrupt",
    "email message with attachments",
    "copy a directory tree",
    "time zone aware datetime objects",
    "group consecutive items with itertools",
    "context manager exit on exception",
    "recursive glob over a path",
    "decode bytes replacing invalid characters",
    "heap based priority queue",
    "insert into a sorted list with bisect",
    "memoryview and the buffer protocol",
    "register a virtual subclass of an abstract base class",
    "weak references for caches",
    "extract files from a zip archive",
]


@dataclass
class Settings:
    files: int
    max_file_kb: int
    slices: int
    latency_runs: int
    chunks_small: int
    chunks_large: int
    queries: int
    rounds: int
    seed: int
    workdir: Path
    keep: bool


# -- corpus ------------------------------------------------------------------------------------


def _pool_roots() -> dict[str, list[Path]]:
    """Folders of real text that exist on this machine, by kind."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = Path("/usr/share/doc")
    html = sorted({p.resolve() for p in docs.glob("python3*/html") if p.is_dir()})
    site = Path(sysconfig.get_paths()["purelib"])
    return {"stdlib": [stdlib], "pydoc": html, "sharedoc": [docs], "sitepkgs": [site]}


def _candidate_files(kind: str, roots: list[Path]) -> Iterator[Path]:
    from lorekeeper import plugins

    for top in roots:
        for directory, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(
                d for d in dirnames if d not in ("site-packages", "__pycache__", "_static", "_images")
            )
            if kind == "sitepkgs" and "lorekeeper" in directory:
                continue  # real text nobody here wrote: leave this project out
            # the Python HTML docs are their own pool; keep them out of the shared-doc pool
            if kind == "sharedoc" and ("-doc/html" in directory or directory.endswith("-doc")):
                dirnames[:] = []
                continue
            for name in sorted(filenames):
                path = Path(directory, name)
                if kind in ("stdlib", "sitepkgs") and path.suffix != ".py":
                    continue
                if name.endswith((".gz", ".xz", ".bz2")) or path.is_symlink():
                    continue
                if plugins.loader_for(path) is None:
                    continue
                yield path


def collect_corpus(limit: int | None, max_bytes: int | None, seed: int) -> list[tuple[str, Path]]:
    """(pool kind, path) of real text files, the pools interleaved so every slice mixes them."""
    rng = random.Random(seed)
    pools: dict[str, list[Path]] = {}
    for kind, roots in _pool_roots().items():
        files = []
        for path in _candidate_files(kind, roots):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if (
                size >= MIN_FILE_BYTES
                and (max_bytes is None or size <= max_bytes)
                and os.access(path, os.R_OK)
            ):
                files.append(path)
        rng.shuffle(files)
        pools[kind] = files
    mixed: list[tuple[str, Path]] = []
    iters = {k: iter(v) for k, v in pools.items()}
    while iters and (limit is None or len(mixed) < limit):
        for kind in list(iters):
            nxt = next(iters[kind], None)
            if nxt is None:
                del iters[kind]
                continue
            mixed.append((kind, nxt))
            if limit is not None and len(mixed) >= limit:
                break
    return mixed


def _relative(kind: str, path: Path) -> Path:
    roots = _pool_roots()[kind]
    for top in roots:
        try:
            return Path(kind) / path.resolve().relative_to(top.resolve())
        except ValueError:
            continue
    return Path(kind) / path.name


def copy_corpus(files: list[tuple[str, Path]], dest: Path, slices: int) -> list[tuple[Path, int, int]]:
    """Copy files into ``slices`` folders; return (folder, files, bytes) of each."""
    out = []
    for index in range(slices):
        folder = dest / f"slice{index}"
        folder.mkdir(parents=True)
        count = size = 0
        for kind, src in files[index::slices]:
            target = folder / _relative(kind, src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            count += 1
            size += target.stat().st_size
        out.append((folder, count, size))
    return out


# -- statistics --------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


class Clock:
    """Wall and process CPU time (all threads) of a block of work."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


# -- part 1: throughput ------------------------------------------------------------------------


def _embed_in_batches(embedder, texts: list[str], batch: int) -> None:
    for start in range(0, len(texts), batch):
        embedder.embed(texts[start : start + batch])


def _expected_texts(folder: Path, embedder, seen: set[str]) -> list[str]:
    """What indexing ``folder`` will send to the embedder: its files cut the way the indexer cuts
    them, less chunks embedded before (the indexer's cache holds those)."""
    from lorekeeper import plugins
    from lorekeeper.server.chunker import chunk_units
    from lorekeeper.server.prepare import OVERLAP_TOKENS

    texts: dict[str, str] = {}
    for directory, _dirs, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = Path(directory, name)
            loader = plugins.loader_for(path)
            if loader is None:
                continue
            try:
                units = loader.load(path)
            except Exception:  # the indexer records it as failed and embeds nothing for it
                continue
            chunks = chunk_units(
                units,
                token_spans=embedder.token_spans,
                max_tokens=embedder.max_tokens - 2,
                overlap_tokens=OVERLAP_TOKENS,
            )
            for chunk in chunks:
                if chunk.chunk_hash not in seen:
                    texts.setdefault(chunk.chunk_hash, chunk.embed_text)
    return list(texts.values())


class ModelFreeEmbedder:
    """The real embedder's tokenizer and shape with the model taken out: cheap pseudo-random unit
    vectors. Indexing with it times everything the index does around the model."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens

    def embed(self, texts) -> np.ndarray:
        seed = hash(tuple(texts)) & 0xFFFFFFFF
        out = np.random.default_rng(seed).standard_normal((len(texts), self.dimension)).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.inner.token_spans(text)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)


def _index_without_model(settings: Settings, embedder, folders: list[Path]) -> Clock:
    """Index the same folders into a fresh store with the model taken out."""
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    with Store.open(settings.workdir / "model-free.db") as store:
        indexer = Indexer(store, ModelFreeEmbedder(embedder))
        with Clock() as clock:
            for folder in folders:
                indexer.add_root(folder)
    log.info("the same folders indexed without the model in %.1f s", clock.wall)
    return clock


@dataclass
class SliceRun:
    """One slice indexed and embedded raw, in the order its number picks."""

    index: Clock
    baseline: Clock
    report: object
    chunks: int
    baseline_texts: int
    baseline_first: bool
    matched: bool


def _prepare_corpus(settings: Settings) -> tuple[list[tuple[Path, int, int]], dict[str, int]]:
    """Copy the real text files into slices; return the slices and the file count of each pool."""
    files = collect_corpus(settings.files, settings.max_file_kb * 1024, settings.seed)
    if len(files) < settings.files:
        log.warning(
            "only %d real text files of at most %d KB found (asked for %d)",
            len(files),
            settings.max_file_kb,
            settings.files,
        )
    corpus = settings.workdir / "corpus"
    slices = copy_corpus(files, corpus, settings.slices)
    kinds: dict[str, int] = {}
    for kind, _ in files:
        kinds[kind] = kinds.get(kind, 0) + 1
    log.info(
        "corpus: %d files (%s), %.1f MB in %d slices",
        len(files),
        kinds,
        sum(s[2] for s in slices) / 1e6,
        len(slices),
    )
    return slices, kinds


def _new_indexed_texts(store, folder: Path, seen: set[str]) -> tuple[int, list[str]]:
    """(chunks under ``folder``, embed texts of those not seen before); marks them seen."""
    from lorekeeper.server.chunker import embed_text

    indexed_texts = []
    chunks = 0
    for chunk in store.iter_chunks(root=str(folder)):
        chunks += 1
        if chunk.chunk_hash not in seen:
            seen.add(chunk.chunk_hash)
            indexed_texts.append(embed_text(chunk.text, chunk.heading_path))
    return chunks, indexed_texts


def _measure_slice(number: int, folder: Path, store, embedder, indexer, seen: set[str]) -> SliceRun:
    from lorekeeper.server.indexer import EMBED_BATCH_CHUNKS

    # Odd slices embed first (their texts cut beforehand exactly as the indexer cuts them), even
    # slices index first: neither side always runs second on a machine whose load drifts.
    baseline_first = number % 2 == 1
    if baseline_first:
        texts = _expected_texts(folder, embedder, seen)
        with Clock() as base:
            _embed_in_batches(embedder, texts, EMBED_BATCH_CHUNKS)
    with Clock() as idx:
        report = indexer.add_root(folder)
    chunks, indexed_texts = _new_indexed_texts(store, folder, seen)
    matched = True
    if baseline_first:
        if sorted(texts) != sorted(indexed_texts):
            matched = False
            log.warning("slice %s: the texts cut beforehand differ from the indexed ones", folder.name)
    else:
        texts = indexed_texts
        with Clock() as base:
            _embed_in_batches(embedder, texts, EMBED_BATCH_CHUNKS)
    if report.embedded_chunks != len(texts):
        log.warning(
            "slice %s: the indexer embedded %d texts, the baseline %d",
            folder.name,
            report.embedded_chunks,
            len(texts),
        )
    return SliceRun(idx, base, report, chunks, len(texts), baseline_first, matched)


def _slice_record(folder: Path, n_files: int, run: SliceRun) -> dict:
    """The per-slice figures, logged as they come."""
    idx, base, report = run.index, run.baseline, run.report
    log.info(
        "%s: %d files, %d chunks (%d embedded) indexed in %.1f s; raw embedding %.1f s; ratio %.3f",
        folder.name,
        n_files,
        run.chunks,
        report.embedded_chunks,
        idx.wall,
        base.wall,
        base.wall / idx.wall,
    )
    return dict(
        slice=folder.name,
        files=n_files,
        chunks=run.chunks,
        embedded=report.embedded_chunks,
        order="embed, index" if run.baseline_first else "index, embed",
        index_s=idx.wall,
        baseline_s=base.wall,
        ratio=base.wall / idx.wall,
    )


def _add_slice_totals(totals: dict, run: SliceRun, n_files: int, n_bytes: int) -> None:
    for key, value in (
        ("index_wall", run.index.wall),
        ("index_cpu", run.index.cpu),
        ("base_wall", run.baseline.wall),
        ("base_cpu", run.baseline.cpu),
        ("files", n_files),
        ("bytes", n_bytes),
        ("chunks", run.chunks),
        ("embedded", run.report.embedded_chunks),
        ("baseline_texts", run.baseline_texts),
        ("indexed", run.report.indexed),
        ("failed", run.report.failed),
        ("skipped", run.report.skipped),
    ):
        totals[key] = totals.get(key, 0) + value


def _throughput_figures(
    settings: Settings, totals: dict, kinds: dict, per_slice: list[dict], mismatched: int, model_free: Clock
) -> dict:
    from lorekeeper.server.indexer import EMBED_BATCH_CHUNKS

    iw, bw = totals["index_wall"], totals["base_wall"]
    return {
        "model_free_index_seconds": model_free.wall,
        "model_free_index_cpu_seconds": model_free.cpu,
        "model_free_share": model_free.wall / iw,
        "corpus_files": totals["files"],
        "corpus_mb": totals["bytes"] / 1e6,
        "corpus_kinds": kinds,
        "max_file_kb": settings.max_file_kb,
        "indexed_files": totals["indexed"],
        "failed_files": totals["failed"],
        "skipped_files": totals["skipped"],
        "chunks": totals["chunks"],
        "embedded_chunks": totals["embedded"],
        "baseline_texts": totals["baseline_texts"],
        "embed_batch": EMBED_BATCH_CHUNKS,
        "index_seconds": iw,
        "index_cpu_seconds": totals["index_cpu"],
        "baseline_seconds": bw,
        "baseline_cpu_seconds": totals["base_cpu"],
        "index_files_per_s": totals["files"] / iw,
        "index_chunks_per_s": totals["chunks"] / iw,
        "index_embedded_chunks_per_s": totals["embedded"] / iw,
        "index_mb_per_s": totals["bytes"] / 1e6 / iw,
        "baseline_chunks_per_s": totals["baseline_texts"] / bw,
        "baseline_mb_per_s": totals["bytes"] / 1e6 / bw,
        "ratio_wall": bw / iw,
        "slices_with_mismatched_texts": mismatched,
        "ratio_cpu": totals["base_cpu"] / totals["index_cpu"],
        "slices": per_slice,
        "target_ratio": 0.9,
    }


def bench_throughput(settings: Settings, store, embedder, indexer) -> dict:
    slices, kinds = _prepare_corpus(settings)
    seen: set[str] = set()
    totals: dict = {}
    per_slice = []
    mismatched = 0
    for number, (folder, n_files, n_bytes) in enumerate(slices):
        run = _measure_slice(number, folder, store, embedder, indexer, seen)
        mismatched += 0 if run.matched else 1
        per_slice.append(_slice_record(folder, n_files, run))
        _add_slice_totals(totals, run, n_files, n_bytes)
    model_free = _index_without_model(settings, embedder, [folder for folder, _, _ in slices])
    return _throughput_figures(settings, totals, kinds, per_slice, mismatched, model_free)


# -- part 2: save-to-searchable latency --------------------------------------------------------


SAVE_ACTIONS = ("new", "modify", "editor-save")


class IndexedSignal:
    """A store listener noting when each awaited path fires "indexed"."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.waiting: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def __call__(self, event: str, path: str) -> None:
        if event != "indexed":
            return
        with self.lock:
            flag = self.waiting.get(path)
            if flag is not None and not flag.is_set():
                self.arrived[path] = time.perf_counter()
                flag.set()

    def expect(self, key: str) -> threading.Event:
        with self.lock:
            self.waiting[key] = threading.Event()
            self.arrived.pop(key, None)
        return self.waiting[key]

    def forget(self, key: str) -> None:
        with self.lock:
            self.waiting.pop(key, None)


def _latency_paragraphs(store, folder: Path, rng: random.Random) -> list[str]:
    paragraphs = [c.text[:600] for c in store.iter_chunks(root=str(folder)) if len(c.text) > 200]
    paragraphs = paragraphs or ["A short note saved from an editor, as people do all day."]
    rng.shuffle(paragraphs)
    return paragraphs


def _write_like(action: str, target: Path, body: str) -> None:
    """Save ``body`` to ``target`` in place, or editor-style (a temporary file renamed over it)."""
    if action == "editor-save":
        temp = target.with_name(f".{target.name}.tmp")
        temp.write_text(body, encoding="utf-8")
        os.replace(temp, target)
    else:
        target.write_text(body, encoding="utf-8")


def _seconds_until_found(store, embedder, marker: str, key: str, began: float) -> float | None:
    """Seconds from ``began`` until a hybrid search for ``marker`` returns ``key`` (None after 60 s)."""
    from lorekeeper.server.search import search

    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        hits = search(store, embedder, marker, k=SEARCH_K, mode="hybrid")
        if any(h.path == key and marker in h.text for h in hits):
            return time.perf_counter() - began
    return None


def _timed_save(
    run: int, store, embedder, signal: IndexedSignal, notes: Path, created: list[Path], paragraphs, rng
) -> dict:
    """Save one note (new, modified or editor-saved) and time it until indexed and until searchable."""
    action = SAVE_ACTIONS[run % len(SAVE_ACTIONS)] if created else "new"
    marker = f"lkbench{run}x{rng.getrandbits(40):010x}"
    body = f"{paragraphs[run % len(paragraphs)]}\n\nBenchmark marker {marker} for run {run}.\n"
    if action == "new":
        target = notes / f"note-{run:03d}{'.md' if run % 2 else '.txt'}"
        created.append(target)
    else:
        target = created[rng.randrange(len(created))]
    key = str(target.resolve())
    flag = signal.expect(key)
    began = time.perf_counter()
    _write_like(action, target, body)
    indexed_ok = flag.wait(timeout=60)
    searchable = _seconds_until_found(store, embedder, marker, key, began)
    if not indexed_ok or searchable is None:
        raise RuntimeError(f"run {run} ({action} {target.name}): not searchable within 60 s")
    sample = dict(action=action, indexed_s=signal.arrived[key] - began, searchable_s=searchable)
    signal.forget(key)
    return sample


def _latency_figures(samples: list[dict], watcher, startup: Clock) -> dict:
    indexed = [s["indexed_s"] for s in samples]
    found = [s["searchable_s"] for s in samples]
    return {
        "runs": len(samples),
        "actions": {a: sum(1 for s in samples if s["action"] == a) for a in SAVE_ACTIONS},
        "debounce_s": watcher.debounce,
        "watch_mode": sorted(set(watcher.modes.values())),
        "startup_reconcile_s": startup.wall,
        "indexed_p50_s": pct(indexed, 50),
        "indexed_p95_s": pct(indexed, 95),
        "searchable_p50_s": pct(found, 50),
        "searchable_p95_s": pct(found, 95),
        "searchable_max_s": max(found),
        "watcher_errors": list(watcher.errors),
        "samples": samples,
        "target_p95_s": 1.0,
    }


def bench_latency(settings: Settings, store, embedder, indexer, folder: Path) -> dict:
    from lorekeeper.server.watcher import Watcher

    rng = random.Random(settings.seed + 1)
    paragraphs = _latency_paragraphs(store, folder, rng)
    notes = folder / "bench-notes"
    notes.mkdir(exist_ok=True)
    signal = IndexedSignal()
    store.add_listener(signal)
    watcher = Watcher(indexer)
    samples: list[dict] = []
    created: list[Path] = []
    try:
        with Clock() as startup:
            watcher.start()
            if not watcher.wait_idle(timeout=900):
                raise RuntimeError("the watcher did not finish its start-up reconcile in 15 minutes")
        log.info("watcher up (%s) after a %.1f s start-up reconcile", watcher.modes, startup.wall)
        for run in range(settings.latency_runs):
            samples.append(_timed_save(run, store, embedder, signal, notes, created, paragraphs, rng))
            watcher.wait_idle(timeout=60)
    finally:
        watcher.stop()
        store.remove_listener(signal)
    return _latency_figures(samples, watcher, startup)


# -- part 3: search latency --------------------------------------------------------------------


class FixedQueryEmbedder:
    """Hands ``search`` query vectors embedded beforehand, so its timing is the index's own work."""

    def __init__(self, inner, vectors: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.vectors = vectors
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens

    def embed(self, texts):
        return self.inner.embed(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.vectors[text]


def _synthetic_documents(settings: Settings, skip: set[Path]) -> Iterator[tuple[str, list]]:
    """(relative path, chunks) cut from real files not used in part 1, then again from all of them
    as numbered copies: real text for the keyword index, made without running the model."""
    from lorekeeper import plugins
    from lorekeeper.plugins.base import word_spans
    from lorekeeper.server.chunker import Chunk, chunk_units

    files = collect_corpus(None, None, settings.seed + 2)
    fresh = [f for f in files if f[1] not in skip]
    copy = 0
    while True:
        produced = 0
        for kind, path in fresh if copy == 0 else files:
            try:
                units = plugins.loader_for(path).load(path)
                # word tokens run ~1.3 to a model word piece: 200 keeps chunks near the real size
                chunks = chunk_units(units, token_spans=word_spans, max_tokens=200)
            except Exception:  # a file that will not load is simply not used
                continue
            if not chunks:
                continue
            if copy:
                chunks = [
                    Chunk(
                        text=c.text,
                        char_start=c.char_start,
                        char_end=c.char_end,
                        start_line=c.start_line,
                        end_line=c.end_line,
                        page=c.page,
                        heading_path=c.heading_path,
                        chunk_hash=f"{c.chunk_hash[:24]}{copy:08x}",
                    )
                    for c in chunks
                ]
            produced += len(chunks)
            name = _relative(kind, path)
            yield (str(Path(f"copy{copy}") / name), chunks)
        if not produced:
            raise RuntimeError("no real text files found to fill the search index")
        copy += 1


def _synthesise(real: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    base = real[rng.integers(0, len(real), count)]
    other = real[rng.integers(0, len(real), count)]
    noise = rng.standard_normal((count, real.shape[1])).astype(np.float32) * (
        SYNTH_MIX / np.sqrt(real.shape[1])
    )
    out = base + SYNTH_MIX * other + noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _fill(
    sstore,
    root,
    source: Iterator[tuple[str, list, np.ndarray | None]],
    target: int,
    model_id: str,
    real: np.ndarray,
    rng: np.random.Generator,
    counts: dict,
) -> None:
    while counts["chunks"] < target:
        rel, chunks, vectors = next(source)
        if vectors is None:
            vectors = _synthesise(real, len(chunks), rng)
            counts["synthetic"] += len(chunks)
        else:
            counts["real"] += len(chunks)
        path = os.path.join(root.path, rel)
        sstore.replace_document(
            path=path,
            root_id=root.id,
            size=sum(len(c.text) for c in chunks),
            mtime=time.time(),
            content_hash=f"bench-{counts['docs']}",
            loader="bench:1",
            chunks=chunks,
            vectors=vectors,
            model_id=model_id,
        )
        counts["chunks"] += len(chunks)
        counts["docs"] += 1


def _one_blas_thread():
    """Numpy's matrix product on one thread, like sqlite-vec's scan (and spared the thrashing of
    several BLAS threads on a busy two-core machine); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _time_searches(
    settings: Settings, sstore, proxy, queries: list[str], qvecs: dict[str, np.ndarray]
) -> dict:
    from lorekeeper.server.search import search

    conn = sstore._read()
    ids, blobs = [], []
    for rowid, blob in conn.execute("SELECT rowid, embedding FROM chunk_vectors"):
        ids.append(rowid)
        blobs.append(blob)
    id_array = np.asarray(ids)
    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), -1).copy()
    fetch = max(SEARCH_K * 4, 20)  # what search() asks the vector index for

    def numpy_topk(q: np.ndarray, k: int) -> np.ndarray:
        scores = matrix @ q
        top = np.argpartition(scores, -k)[-k:]
        return id_array[top[np.argsort(-scores[top])]]

    def vec0_knn(q: np.ndarray, k: int) -> list[int]:
        rows = conn.execute(
            "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? ORDER BY distance",
            (q.astype(np.float32).tobytes(), k),
        ).fetchall()
        return [r[0] for r in rows]

    timings: dict[str, list[float]] = {m: [] for m in ("numpy", "vec0_knn", "vector", "keyword", "hybrid")}
    recall = []
    with _one_blas_thread():
        for round_ in range(settings.rounds + 1):  # round 0 warms caches and is not counted
            for query in queries:
                q = qvecs[query]
                steps = {
                    "numpy": functools.partial(numpy_topk, q, fetch),
                    "vec0_knn": functools.partial(vec0_knn, q, fetch),
                    **{
                        mode: functools.partial(search, sstore, proxy, query, k=SEARCH_K, mode=mode)
                        for mode in ("vector", "keyword", "hybrid")
                    },
                }
                for name, step in steps.items():
                    began = time.perf_counter()
                    step()
                    if round_:
                        timings[name].append(time.perf_counter() - began)
                if round_ == 0:
                    exact = set(numpy_topk(q, fetch).tolist())
                    recall.append(len(exact & set(vec0_knn(q, fetch))) / len(exact))
    out: dict = {
        "chunks": len(ids),
        "samples_per_mode": len(timings["numpy"]),
        "vec0_recall": float(np.mean(recall)),
    }
    np50, np95 = pct(timings["numpy"], 50), pct(timings["numpy"], 95)
    for name, values in timings.items():
        p50, p95 = pct(values, 50), pct(values, 95)
        out[name] = {
            "p50_ms": p50 * 1e3,
            "p95_ms": p95 * 1e3,
            "p50_vs_numpy": p50 / np50,
            "p95_vs_numpy": p95 / np95,
        }
    return out


def _real_documents(settings: Settings, store, model_id: str) -> list[tuple[str, list, np.ndarray]]:
    """(path relative to the work folder, chunks, their cached vectors) of every document part 1 indexed."""
    real_docs = []
    for doc in store.documents():
        if doc.status != "indexed":
            continue
        chunks = store.document_chunks(doc.path)
        if not chunks:
            continue
        cached = store.cached_vectors(model_id, [c.chunk_hash for c in chunks])
        real_docs.append(
            (
                os.path.relpath(doc.path, settings.workdir),
                chunks,
                np.stack([cached[c.chunk_hash] for c in chunks]),
            )
        )
    return real_docs


def _embed_queries(embedder, queries: list[str]) -> tuple[dict[str, np.ndarray], list[float]]:
    """Each query's vector, and the seconds one more embedding of each took (the path warmed first)."""
    qlist = [embedder.embed_query(q) for q in queries]  # also warms the query path
    qvecs = dict(zip(queries, qlist))
    query_times = []
    for query in queries:
        began = time.perf_counter()
        embedder.embed_query(query)
        query_times.append(time.perf_counter() - began)
    return qvecs, query_times


def bench_search(settings: Settings, store, embedder, used_files: set[Path]) -> dict:
    from lorekeeper.server.store import Store

    rng = np.random.default_rng(settings.seed + 3)
    model_id = embedder.model_id
    sdb = settings.workdir / "search.db"
    sstore = Store.open(sdb)
    sstore.ensure_embedder(model_id, embedder.dimension)
    root_dir = settings.workdir / "search-root"
    root_dir.mkdir(exist_ok=True)
    root = sstore.add_root(root_dir)

    real_docs = _real_documents(settings, store, model_id)
    real = np.concatenate([v for _, _, v in real_docs]) if real_docs else None
    if real is None or len(real) < 10:
        raise RuntimeError("part 1 produced too few real vectors to synthesise from")

    def source() -> Iterator[tuple[str, list, np.ndarray | None]]:
        yield from real_docs
        for rel, chunks in _synthetic_documents(settings, used_files):
            yield rel, chunks, None

    queries = QUERIES[: settings.queries]
    qvecs, query_times = _embed_queries(embedder, queries)
    proxy = FixedQueryEmbedder(embedder, qvecs)

    counts = {"chunks": 0, "docs": 0, "real": 0, "synthetic": 0}
    stream = source()
    results = {}
    fill_seconds = 0.0
    for label, size in (("small", settings.chunks_small), ("large", settings.chunks_large)):
        with Clock() as fill:
            _fill(sstore, root, stream, size, model_id, real, rng, counts)
        fill_seconds += fill.wall
        log.info(
            "search index: %d chunks (%d with real vectors, %d synthetic) in %d documents; filled in %.1f s",
            counts["chunks"],
            counts["real"],
            counts["synthetic"],
            counts["docs"],
            fill.wall,
        )
        figures = _time_searches(settings, sstore, proxy, queries, qvecs)
        figures.update(
            real_vectors=counts["real"], synthetic_vectors=counts["synthetic"], documents=counts["docs"]
        )
        results[label] = figures
    avg_chars = float(
        np.mean([len(r[0]) for r in sstore._read().execute("SELECT text FROM chunks LIMIT 20000")])
    )
    sstore.close()
    return {
        "k": SEARCH_K,
        "queries": len(queries),
        "rounds": settings.rounds,
        "query_embed_p50_ms": pct(query_times, 50) * 1e3,
        "query_embed_p95_ms": pct(query_times, 95) * 1e3,
        "fill_seconds": fill_seconds,
        "avg_chunk_chars": avg_chars,
        "synthetic_vectors": f"normalise(real_i + {SYNTH_MIX} * real_j + gaussian noise of norm ~{SYNTH_MIX})",
        "sizes": results,
    }


# -- report --------------------------------------------------------------------------------------


def render(result: dict) -> str:
    lines = []
    env = result["environment"]
    lines.append(
        f"lorekeeper index benchmark  ({env['cpus']} CPUs, load average at start {env['load_start']}, "
        f"at end {env['load_end']}; {env['python']}; {env['embedder']})"
    )
    t = result.get("throughput")
    if t:
        lines += [
            "",
            f"1. Indexing throughput: {t['corpus_files']} real files ({t['corpus_mb']:.1f} MB, <= {t['max_file_kb']} KB "
            f"each: {t['corpus_kinds']}), {t['chunks']} chunks, {t['embedded_chunks']} distinct embedded",
            f"   {'':28}{'seconds':>9}{'files/s':>10}{'chunks/s':>10}{'MB/s':>8}",
            f"   {'Indexer.add_root':28}{t['index_seconds']:9.1f}{t['index_files_per_s']:10.1f}"
            f"{t['index_chunks_per_s']:10.1f}{t['index_mb_per_s']:8.3f}",
            f"   {'embedder.embed (same texts)':28}{t['baseline_seconds']:9.1f}{'':>10}"
            f"{t['baseline_chunks_per_s']:10.1f}{t['baseline_mb_per_s']:8.3f}",
            f"   ratio (raw embed time / index time): {t['ratio_wall']:.3f} wall, {t['ratio_cpu']:.3f} CPU  "
            f"(target >= {t['target_ratio']}: {'met' if t['ratio_wall'] >= t['target_ratio'] else 'NOT met'})",
            f"   the same indexing with the model taken out (pseudo-random vectors): {t['model_free_index_seconds']:.1f} s "
            f"= {t['model_free_share']:.1%} of the indexing time",
            "   per slice (alternating which side runs first): "
            + ", ".join(f"{s['ratio']:.3f}" for s in t["slices"]),
        ]
    lat = result.get("latency")
    if lat:
        lines += [
            "",
            f"2. Save-to-searchable under the watcher ({lat['runs']} saves: {lat['actions']}; debounce "
            f"{lat['debounce_s']} s, {'/'.join(lat['watch_mode'])} events)",
            f"   {'':28}{'p50 ms':>9}{'p95 ms':>9}",
            f"   {'store fires indexed':28}{lat['indexed_p50_s'] * 1e3:9.0f}{lat['indexed_p95_s'] * 1e3:9.0f}",
            f"   {'search() returns it':28}{lat['searchable_p50_s'] * 1e3:9.0f}{lat['searchable_p95_s'] * 1e3:9.0f}"
            f"   (max {lat['searchable_max_s'] * 1e3:.0f} ms; target p95 < 1000 ms: "
            f"{'met' if lat['searchable_p95_s'] < lat['target_p95_s'] else 'NOT met'})",
        ]
    s = result.get("search")
    if s:
        lines += [
            "",
            f"3. Search latency, k={s['k']}, {s['queries']} queries x {s['rounds']} rounds (query embedding "
            f"excluded: p50 {s['query_embed_p50_ms']:.1f} ms, p95 {s['query_embed_p95_ms']:.1f} ms on its own)",
        ]
        for fig in s["sizes"].values():
            lines.append(
                f"   {fig['chunks']} chunks ({fig['real_vectors']} real vectors, {fig['synthetic_vectors']} "
                f"synthetic; vec0 recall vs numpy {fig['vec0_recall']:.3f})"
            )
            lines.append(f"   {'':28}{'p50 ms':>9}{'p95 ms':>9}{'p50 x numpy':>13}{'p95 x numpy':>13}")
            names = {
                "numpy": "numpy X @ q top-k (exact)",
                "vec0_knn": "sqlite-vec k-NN query only",
                "vector": "search() vector",
                "keyword": "search() keyword",
                "hybrid": "search() hybrid",
            }
            for key, name in names.items():
                f = fig[key]
                lines.append(
                    f"   {name:28}{f['p50_ms']:9.2f}{f['p95_ms']:9.2f}{f['p50_vs_numpy']:13.1f}"
                    f"{f['p95_vs_numpy']:13.1f}"
                )
        lines.append(
            f"   synthetic vectors: {s['synthetic_vectors']}; avg chunk {s['avg_chunk_chars']:.0f} chars"
        )
    lines += ["", "Caveat: " + result["caveat"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files", type=int, default=None, help="real text files to index (default 2000; quick 120)"
    )
    parser.add_argument("--max-file-kb", type=int, default=2, help="largest file taken into the corpus (KB)")
    parser.add_argument("--slices", type=int, default=None, help="alternating index/embed slices (default 8)")
    parser.add_argument(
        "--latency-runs", type=int, default=None, help="saves timed under the watcher (default 45)"
    )
    parser.add_argument("--chunks-small", type=int, default=None, help="smaller search index (default 10000)")
    parser.add_argument("--chunks-large", type=int, default=None, help="larger search index (default 100000)")
    parser.add_argument(
        "--queries", type=int, default=None, help=f"queries, at most {len(QUERIES)} (default all)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed passes over the queries (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="a small run (about two minutes) for smoke tests"
    )
    parser.add_argument(
        "--only",
        choices=("throughput", "latency", "search"),
        action="append",
        help="run only these parts (repeatable; latency and search need throughput's index)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to build (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value, full, small):
        return value if value is not None else (small if quick else full)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorekeeper-bench-"))
    settings = Settings(
        files=pick(args.files, 2000, 120),
        max_file_kb=args.max_file_kb,
        slices=pick(args.slices, 8, 2),
        latency_runs=pick(args.latency_runs, 45, 9),
        chunks_small=pick(args.chunks_small, 10_000, 1_000),
        chunks_large=pick(args.chunks_large, 100_000, 5_000),
        queries=min(len(QUERIES), pick(args.queries, len(QUERIES), 10)),
        rounds=pick(args.rounds, 3, 1),
        seed=args.seed,
        workdir=workdir,
        keep=args.keep,
    )
    for name in ("files", "slices", "latency_runs", "chunks_small", "chunks_large", "queries", "rounds"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if settings.chunks_large < settings.chunks_small:
        parser.error("--chunks-large must be at least --chunks-small")
    return settings, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    settings, args = parse_args(argv)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["LOREKEEPER_HOME"] = str(settings.workdir / "home")  # never touch the user's own index
    parts = set(args.only or ("throughput", "latency", "search"))

    from lorekeeper import plugins
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    load_start = tuple(round(x, 2) for x in os.getloadavg())
    result: dict = {}
    try:
        embedder = plugins.get_embedder()
        embedder.embed(["warm up the model"] * 8)  # model load and first-call costs stay out of the figures
        embedder.token_spans("warm up the tokenizer")
        store = Store.open(settings.workdir / "index.db")
        indexer = Indexer(store, embedder)
        throughput = bench_throughput(settings, store, embedder, indexer)
        if "throughput" in parts:
            result["throughput"] = throughput
        if "latency" in parts:
            folder = settings.workdir / "corpus" / "slice0"
            result["latency"] = bench_latency(settings, store, embedder, indexer, folder)
        if "search" in parts:
            used = set()
            for _kind, path in collect_corpus(settings.files, settings.max_file_kb * 1024, settings.seed):
                used.add(path)
            result["search"] = bench_search(settings, store, embedder, used)
        store.close()
    finally:
        if not settings.keep:
            shutil.rmtree(settings.workdir, ignore_errors=True)
    result["environment"] = {
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": tuple(round(x, 2) for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "embedder": f"{embedder.model_id} ({embedder.dimension} d, batch {getattr(embedder, 'batch_size', '?')})",
        "torch_threads": _torch_threads(),
    }
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()}
    result["command"] = "python scripts/bench_index.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result["caveat"] = (
        f"measured on a machine with {os.cpu_count()} CPU cores shared with other jobs running at the same "
        "time (see the load averages), so absolute figures are noisy; the ratios compare work timed in "
        "alternation within the same run. Search figures at the larger size use synthetic vectors for "
        "the chunks the model never embedded (see above)."
    )
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
