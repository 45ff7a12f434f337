"""Load: 8 MCP clients call ``retrieve`` while the server's watcher indexes thousands of real files,
and a ninth calls ``generate`` at the same time.

Two phases, each on a fresh index of a folder of real files (see reliability_common.py) that the
server starts indexing when it starts, so every query races the indexer:

``http``   one ``lorekeeper serve --http`` process; 8 clients, each with its own MCP session, call
           ``retrieve`` in a loop; from a third of the way in, a ninth session calls ``generate``.
``stdio``  what desktop clients do: each of the 8 clients launches its own ``lorekeeper serve`` over
           stdio on the same index (the first one watches the folder, the others serve it as it
           grows: ``--no-watcher``); a ninth process answers ``generate``.

Reported per phase: calls, errors, "database is locked" (in answers and in the servers' logs), and
``retrieve`` latency p50/p95/p99 before and while ``generate`` runs, plus the files indexed by the end.

    python scripts/load_mcp.py --seconds 60 --files 3000            # the real models
    python scripts/load_mcp.py --seconds 20 --files 500 --fast      # hash embedder, scripted answers
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from reliability_common import build_corpus, child_env, cli, percentiles

QUERIES = [
    "how do I parse command line arguments", "read rows from a csv file", "license terms for redistribution",
    "thread safe queue between producer and consumer", "regular expression named groups",
    "format a date with strftime", "compress data with gzip", "socket timeout while connecting",
    "encode custom objects as json", "changelog of bug fixes", "copyright notice of the authors",
    "unit test assertions", "open a file in binary mode", "environment variables of a subprocess",
]  # fmt: skip
CALL_TIMEOUT_S = 180


@dataclass
class Tally:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start offset, seconds)
    errors: list[str] = field(default_factory=list)
    generated: int = 0
    generate_seconds: list[float] = field(default_factory=list)


async def _retrieve_loop(
    client, tally: Tally, t0: float, deadline: float, rng: random.Random, mode: str
) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                result = await client.call_tool(
                    "retrieve", {"query": rng.choice(QUERIES), "k": 5, "mode": mode}
                )
            if result.is_error:
                tally.errors.append(result.content[0].text[:300])
        except Exception as exc:  # a timeout, a dropped session: an error of the run
            tally.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        tally.latencies.append((started - t0, time.monotonic() - started))


async def _generate_loop(client, tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                result = await client.call_tool(
                    "generate", {"prompt": "What do the changelogs say about bug fixes?", "max_tokens": 64}
                )
            if result.is_error:
                tally.errors.append("generate: " + result.content[0].text[:300])
            else:
                tally.generated += 1
                tally.generate_seconds.append(time.monotonic() - started)
        except Exception as exc:
            tally.errors.append(f"generate: {type(exc).__name__}: {exc}"[:300])


async def _drive(
    openers: list, generator_opener, seconds: float, mode: str, seed: int
) -> tuple[Tally, float]:
    """Run 8 retrieve loops (and, from a third in, one generate loop) on already opened sessions."""
    from contextlib import AsyncExitStack

    tally = Tally()
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_()) for open_ in openers]
        generator = await stack.enter_async_context(generator_opener())
        t0 = time.monotonic()
        deadline = t0 + seconds
        generate_from = seconds / 3

        async def delayed_generate() -> None:
            await anyio.sleep(generate_from)
            await _generate_loop(generator, tally, deadline)

        async with anyio.create_task_group() as tg:
            for i, client in enumerate(clients):
                tg.start_soon(_retrieve_loop, client, tally, t0, deadline, random.Random(seed + i), mode)
            tg.start_soon(delayed_generate)
    return tally, generate_from


# ---------------------------------------------------------------------------- the two phases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_opener(url: str, token: str):
    from contextlib import asynccontextmanager

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    @asynccontextmanager
    async def session():
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT_S
        ) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                yield client

    return session


def _wait_for_http(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the HTTP server exited during start-up ({proc.returncode})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the HTTP server did not start within {seconds:.0f} s") from None
            time.sleep(0.3)


def http_phase(args: argparse.Namespace, work: Path, folder: Path) -> dict:
    home, db, log = work / "home-http", work / "http.db", work / "http-server.log"
    port = _free_port()
    with open(log, "wb") as errors:
        proc = subprocess.Popen(
            [*cli(args.fast), "--db", str(db), "serve", "--http", "--port", str(port), "--watch", str(folder)],
            env=child_env(home, args.fast), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        _wait_for_http(url, proc)
        opener = _http_opener(url, (home / "token").read_text().strip())
        tally, generate_from = anyio.run(_drive, [opener] * 8, opener, args.seconds, args.mode, args.seed)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return _summary("http", tally, generate_from, db, [log])


def _stdio_opener(args: argparse.Namespace, db: Path, home: Path, log: Path, watch: Path | None):
    from mcp import Client, StdioServerParameters

    serve = ["serve", "--watch", str(watch)] if watch else ["serve", "--no-watcher"]
    command = [*cli(args.fast), "--db", str(db), *serve]
    # the server's log goes to a file, to be searched for "database is locked" afterwards
    params = StdioServerParameters(
        command="/bin/sh",
        args=["-c", f'exec "$@" 2>>"{log}"', "sh", *command],
        env=child_env(home, args.fast),
    )
    return lambda: Client(params)


def stdio_phase(args: argparse.Namespace, work: Path, folder: Path) -> dict:
    home, db = work / "home-stdio", work / "stdio.db"
    logs = [work / f"stdio-server-{i}.log" for i in range(9)]
    openers = [
        _stdio_opener(args, db, home, logs[i], folder if i == 0 else None) for i in range(8)
    ]  # fmt: skip
    generator = _stdio_opener(args, db, home, logs[8], None)
    tally, generate_from = anyio.run(_drive, openers, generator, args.seconds, args.mode, args.seed)
    return _summary("stdio", tally, generate_from, db, logs)


def _summary(phase: str, tally: Tally, generate_from: float, db: Path, logs: list[Path]) -> dict:
    from lorekeeper.server.store import Store

    locked_logs = sum(p.read_text(errors="replace").count("database is locked") for p in logs if p.exists())
    with Store.open(db, create=False) as store:
        indexed = sum(1 for d in store.documents() if d.status == "indexed")
    before = [s for start, s in tally.latencies if start < generate_from]
    during = [s for start, s in tally.latencies if start >= generate_from]

    def ms(values: list[float]) -> dict:
        return {k: round(v * 1000, 1) for k, v in percentiles(values).items()} | {"calls": len(values)}

    return {
        "phase": phase, "retrieve_calls": len(tally.latencies), "errors": len(tally.errors),
        "database_is_locked": sum("database is locked" in e for e in tally.errors) + locked_logs,
        "retrieve_ms": ms([s for _, s in tally.latencies]), "retrieve_ms_before_generate": ms(before),
        "retrieve_ms_while_generating": ms(during), "generate_calls": tally.generated,
        "generate_s_p50": round(percentiles(tally.generate_seconds, (50,))["p50"], 2),
        "documents_indexed_at_end": indexed, "error_examples": tally.errors[:5],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of each phase's timed run")
    parser.add_argument("--files", type=int, default=3000, help="real files the watcher indexes meanwhile")
    parser.add_argument("--phases", default="http,stdio", help="http, stdio or both")
    parser.add_argument("--mode", default="hybrid", choices=["hybrid", "vector", "keyword"])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--fast", action="store_true", help="hash embedder and scripted generator")
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"MCP load: seed {args.seed}, {args.files} files, {args.seconds:.0f} s per phase, mode {args.mode}")
    work = Path(tempfile.mkdtemp(prefix="lorekeeper-load-"))
    phases = {"http": http_phase, "stdio": stdio_phase}
    results = []
    try:
        for name in args.phases.split(","):
            folder = work / f"docs-{name}"
            build_corpus(folder, args.files, args.seed)
            results.append(phases[name](args, work, folder.resolve()))
            print(json.dumps(results[-1], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = any(r["errors"] or r["database_is_locked"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
