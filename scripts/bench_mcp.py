"""MCP benchmark: what the server costs on top of the model and the index.

Three figures, each against a baseline measured in the same run on the same machine:

1. Generation throughput. ``generate`` called through a real ``lorekeeper serve`` subprocess over
   stdio (tokens streamed back as progress notifications) against raw llama-cpp-python in this
   process, on the same GGUF, the same chat-formatted prompt, the same settings (temperature 0,
   same max_tokens, same context size and threads). Runs alternate between the two sides so the
   noise of a shared machine falls on both. Reported: tokens/s end to end (request sent -> last
   token), decode tokens/s (first -> last token) and first-token latency (for MCP: as the client
   sees the first progress notification). Target: MCP tokens/s >= 0.95 x raw.
2. ``retrieve`` round trip through the stdio server at ~10k chunks, p50/p95, next to the in-process
   ``search()`` call on the same index (what the protocol adds).

The index is built from real text nobody here wrote (the Python standard library's sources) with the
real embedder; it is kept in ``--workdir`` so later runs skip the build (10-30 minutes on two cores;
the measurements themselves take about a minute).

    python scripts/bench_mcp.py                      # full run
    python scripts/bench_mcp.py --chunks 1000 --runs 2 --queries 50   # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The same OpenMP policy `lorekeeper serve` sets for itself, so both sides run alike (see mcp_cli).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import anyio  # noqa: E402

log = logging.getLogger("bench_mcp")

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle."
SYSTEM = "You are a helpful assistant."
QUERIES = [
    "how to parse command line arguments",
    "open a file and read lines",
    "thread safe queue with timeout",
    "format a date as ISO 8601",
    "compress data with zlib",
    "regular expression named groups",
    "socket connection timeout error",
    "decimal rounding modes",
    "walk a directory tree recursively",
    "unicode normalization of strings",
    "json encoder for custom objects",
    "http request headers and status codes",
    "temporary files cleanup",
    "random sample without replacement",
    "context manager that suppresses exceptions",
    "heap priority queue push pop",
    "abstract base class registration",
    "subprocess pipe stdout stderr",
    "csv reader with dialect",
    "hash a password with salt",
]


# ---------------------------------------------------------------------------- the index


def build_index(workdir: Path, target_chunks: int) -> Path:
    """An index of at least ``target_chunks`` chunks of standard-library sources (cached)."""
    from lorekeeper import plugins
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    db = workdir / f"index-{target_chunks}.db"
    corpus = workdir / f"corpus-{target_chunks}"
    with Store.open(db) as store:
        have = store.status().chunks
        if have >= target_chunks:
            log.warning("reusing %s (%d chunks)", db, have)
            return db
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(
            p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size > 500
        )
        random.Random(7).shuffle(files)
        indexer = Indexer(store, plugins.get_embedder())
        corpus.mkdir(parents=True, exist_ok=True)
        store.add_root(corpus.resolve())
        started = time.monotonic()
        batch = 0
        per_batch = max(5, min(100, target_chunks // 20))  # a small index is not overshot by much
        while store.status().chunks < target_chunks and files:
            batch += 1
            for _ in range(per_batch):
                if not files:
                    break
                src = files.pop()
                dst = corpus / f"{batch:04d}-{src.parent.name}-{src.name}"
                shutil.copyfile(src, dst)
            indexer.reconcile(str(corpus.resolve()))
            log.warning("indexed %d chunks (%.0f s)", store.status().chunks, time.monotonic() - started)
        return db


# ---------------------------------------------------------------------------- generation


def raw_llama(n_ctx: int, threads: int | None):
    """llama-cpp-python on the packaged GGUF with the generator plugin's own settings."""
    from lorekeeper.plugins.llama_open import open_llama
    from lorekeeper.plugins.models import default_gguf_path

    return open_llama(default_gguf_path(), n_ctx=n_ctx, n_threads=threads, n_gpu_layers=-1)


def raw_prompt_tokens(llm) -> tuple[list[int], list[str], object]:
    """The chat prompt formatted with the GGUF's template, exactly as the server formats it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos_id),
        bos_token=llm._model.token_get_text(bos_id),
        stop_token_ids=[eos_id],
    )
    result = formatter(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}])
    tokens = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
    return (
        tokens,
        [result.stop] if isinstance(result.stop, str) else list(result.stop),
        result.stopping_criteria,
    )


def run_raw(llm, max_tokens: int) -> dict:
    from lorekeeper.server.settings import Settings

    defaults = Settings.load()  # the same sampling the server's generate uses
    tokens, stop, criteria = raw_prompt_tokens(llm)
    # No reset: like the server's generator, reuse the KV cache of an identical prompt prefix.
    started = time.perf_counter()
    first = None
    pieces = []
    for chunk in llm.create_completion(
        prompt=tokens,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=defaults.top_p,
        min_p=defaults.min_p,
        repeat_penalty=defaults.repeat_penalty,
        stop=stop,
        stopping_criteria=criteria,
        stream=True,
    ):
        if first is None:
            first = time.perf_counter()
        pieces.append(chunk["choices"][0]["text"])
    end = time.perf_counter()
    text = "".join(pieces)
    n = len(llm.tokenize(text.strip().encode(), add_bos=False, special=False))
    return {
        "tokens": n,
        "total_s": end - started,
        "first_s": first - started,
        "decode_s": end - first,
        "text": text,
    }


async def run_mcp(client, max_tokens: int) -> dict:
    first: list[float] = []

    async def on_progress(value, total, message) -> None:
        if not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    result = await client.call_tool(
        "generate",
        {
            "prompt": PROMPT,
            "system": SYSTEM,
            "use_context": False,
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        progress_callback=on_progress,
    )
    end = time.perf_counter()
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    out = result.structured_content
    return {
        "tokens": out["completion_tokens"],
        "total_s": end - started,
        "first_s": first[0] - started,
        "decode_s": end - first[0],
        "text": out["answer"],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def p50_p95(values: list[float]) -> dict:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95)}


def retrieve_queries(count: int) -> list[str]:
    """``count`` queries cycling through QUERIES, numbered after the first pass so none repeats."""
    return [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(count)]


# ---------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="index size for the retrieve latency")
    parser.add_argument("--runs", type=int, default=5, help="generation runs per side")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200, help="retrieve calls to time")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads (default: its own choice)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorekeeper-bench-mcp")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def server_params(args: argparse.Namespace, db: Path):
    """How to start ``lorekeeper serve`` over stdio on ``db``, with the raw side's context and threads."""
    from mcp import StdioServerParameters

    home = args.workdir / "home"
    env = dict(os.environ, LOREKEEPER_HOME=str(home), LOREKEEPER_N_CTX=str(args.n_ctx))
    if args.threads:
        env["LOREKEEPER_THREADS"] = str(args.threads)
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "lorekeeper.server.cli", "--db", str(db), "serve", "--no-watcher"],
        env=env,
    )


def generation_figures(runs: list[dict]) -> dict:
    return {
        "tokens_per_s": statistics.median(r["tokens"] / r["total_s"] for r in runs),
        "decode_tokens_per_s": statistics.median((r["tokens"] - 1) / r["decode_s"] for r in runs),
        "first_token_ms": statistics.median(r["first_s"] * 1000 for r in runs),
        "tokens": statistics.median(r["tokens"] for r in runs),
    }


async def measure_generation(client, llm, args: argparse.Namespace, figures: dict) -> None:
    """Alternate raw and MCP generation runs; add both sides' figures and their ratios."""
    await run_mcp(client, 4)  # load the model in the server
    run_raw(llm, 4)
    raw_runs, mcp_runs = [], []
    for i in range(args.runs):
        raw_runs.append(run_raw(llm, args.max_tokens))
        mcp_runs.append(await run_mcp(client, args.max_tokens))
        log.warning(
            "run %d: raw %d tok %.2f s | mcp %d tok %.2f s",
            i + 1,
            raw_runs[-1]["tokens"],
            raw_runs[-1]["total_s"],
            mcp_runs[-1]["tokens"],
            mcp_runs[-1]["total_s"],
        )
    same_text = all(r["text"].strip() == m["text"].strip() for r, m in zip(raw_runs, mcp_runs))
    for name, runs in (("raw", raw_runs), ("mcp", mcp_runs)):
        figures[name] = generation_figures(runs)
    figures["same_output"] = same_text
    figures["ratio_tokens_per_s"] = figures["mcp"]["tokens_per_s"] / figures["raw"]["tokens_per_s"]
    figures["ratio_decode_tokens_per_s"] = (
        figures["mcp"]["decode_tokens_per_s"] / figures["raw"]["decode_tokens_per_s"]
    )


async def time_mcp_retrieve(client, queries: list[str]) -> dict:
    """p50/p95 ms of ``retrieve`` round trips, after one call that warms up the server's embedder."""
    await client.call_tool("retrieve", {"query": "warm up", "k": 8})
    times = []
    for query in queries:
        started = time.perf_counter()
        result = await client.call_tool("retrieve", {"query": query, "k": 8})
        times.append((time.perf_counter() - started) * 1000)
        assert not result.is_error and result.structured_content["hits"], result.content[0].text
    return p50_p95(times)


def time_inprocess_search(db: Path, queries: list[str], figures: dict) -> None:
    """The index's chunk count and p50/p95 ms of the same queries through ``search()`` in this process."""
    from lorekeeper import plugins
    from lorekeeper.server.search import search
    from lorekeeper.server.store import Store

    embedder = plugins.get_embedder()
    with Store.open(db) as store:
        figures["chunks"] = store.status().chunks
        search(store, embedder, "warm up", k=8)
        local = []
        for query in queries:
            started = time.perf_counter()
            search(store, embedder, query, k=8)
            local.append((time.perf_counter() - started) * 1000)
    figures["retrieve_inprocess_ms"] = p50_p95(local)


def report(figures: dict, args: argparse.Namespace) -> str:
    raw, mcp = figures["raw"], figures["mcp"]
    lines = [
        f"model {figures['model']}, max_tokens {args.max_tokens}, n_ctx {args.n_ctx}, {args.runs} runs per side",
        f"generate  raw llama-cpp-python: {raw['tokens_per_s']:.1f} tok/s end to end, "
        f"{raw['decode_tokens_per_s']:.1f} tok/s decode, first token {raw['first_token_ms']:.0f} ms",
        f"generate  MCP stdio server:     {mcp['tokens_per_s']:.1f} tok/s end to end, "
        f"{mcp['decode_tokens_per_s']:.1f} tok/s decode, first token {mcp['first_token_ms']:.0f} ms",
        f"ratio MCP/raw: {figures['ratio_tokens_per_s']:.3f} end to end, {figures['ratio_decode_tokens_per_s']:.3f} "
        f"decode (target >= 0.95); identical output: {figures['same_output']}",
        f"retrieve at {figures['chunks']} chunks: MCP round trip p50 {figures['retrieve_mcp_ms']['p50']:.1f} ms, "
        f"p95 {figures['retrieve_mcp_ms']['p95']:.1f} ms; in-process search() p50 "
        f"{figures['retrieve_inprocess_ms']['p50']:.1f} ms, p95 {figures['retrieve_inprocess_ms']['p95']:.1f} ms",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)

    from mcp import Client

    db = build_index(args.workdir, args.chunks)
    params = server_params(args, db)
    llm = raw_llama(args.n_ctx, args.threads)
    figures: dict = {"model": Path(llm.model_path).name, "max_tokens": args.max_tokens, "n_ctx": args.n_ctx}
    queries = retrieve_queries(args.queries)

    async def measure() -> None:
        async with Client(params, mode="legacy") as client:
            # the server loads its embedder in the background at start: wait for it (one retrieve)
            # so that load does not share the CPU with the first timed generations
            await client.call_tool("retrieve", {"query": "warm up", "k": 1})
            await measure_generation(client, llm, args, figures)
            figures["retrieve_mcp_ms"] = await time_mcp_retrieve(client, queries)

    anyio.run(measure)
    time_inprocess_search(db, queries, figures)
    sys.stdout.write(report(figures, args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
