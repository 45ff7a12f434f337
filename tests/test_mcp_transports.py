"""`lorekeeper serve` as a client launches it: a subprocess over stdio, and over Streamable HTTP.

These spawn the real command, so they cover the CLI wiring, logging discipline (stdout is the
protocol), the watcher in the server process, the bearer token and the Origin check.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from lorekeeper.server.mcp import doc_uri

CLI = [sys.executable, "-m", "lorekeeper.server.cli"]
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


def _write_docs(folder: Path) -> Path:
    folder.mkdir()
    (folder / "bike.txt").write_text(
        "The bicycle chain should be lubricated every 300 kilometres.\nTyre pressure is 6.5 bar.\n",
        encoding="utf-8",
    )
    (folder / "garden.md").write_text("# Garden\n\nTomatoes need six hours of sun.\n", encoding="utf-8")
    return folder.resolve()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return _write_docs(tmp_path / "docs")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LOREKEEPER_HOME"] = str(home)
    env.pop("LOREKEEPER_TOKEN", None)
    return env


# ---------------------------------------------------------------------------- stdio


@pytest.mark.slow
def test_stdio_server_with_the_sdk_client(docs: Path, lorekeeper_home: Path, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=CLI[0], args=[*CLI[1:], "--db", str(tmp_path / "i.db"), "serve", "--watch", str(docs)],
        env=_env(lorekeeper_home),
    )  # fmt: skip

    async def retrieve_paths(client: Client, query: str) -> list[str]:
        result = await client.call_tool("retrieve", {"query": query, "k": 3})
        assert not result.is_error, result.content[0].text
        return [h["path"] for h in result.structured_content["hits"]]

    async def main() -> None:
        async with Client(params, mode="legacy") as client:
            assert client.server_info.name == "lorekeeper"
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {"retrieve", "generate", "index_status"}

            with anyio.fail_after(120):  # the first scan runs in the background after the handshake
                while str(docs / "bike.txt") not in await retrieve_paths(client, "bicycle chain oil"):
                    await anyio.sleep(0.2)

            doc = await client.read_resource(doc_uri(docs / "bike.txt"))
            assert "lubricated every 300 kilometres" in doc.contents[0].text

            answer = await client.call_tool(
                "generate",
                {"prompt": "How often should the chain be oiled?", "max_tokens": 16, "temperature": 0},
            )
            assert not answer.is_error, answer.content[0].text
            assert answer.structured_content["answer"].strip() and answer.structured_content["sources"]

            bad = await client.call_tool("retrieve", {"query": "", "k": 0})
            assert bad.is_error and "validation error" in bad.content[0].text

            # a file written into the watched folder after the server started is found
            new = docs / "kayak.md"
            new.write_text("# Kayak\n\nThe kayak paddle is 220 centimetres long.\n", encoding="utf-8")
            with anyio.fail_after(120):
                while str(new) not in await retrieve_paths(client, "how long is the kayak paddle"):
                    await anyio.sleep(0.2)

    anyio.run(main)


class _LineReader:
    """Reads a pipe on a thread so the test can wait for lines with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self.lines.put(line)

    def until(self, response_id: int, seconds: float = 120) -> list[bytes]:
        seen: list[bytes] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if json.loads(line).get("id") == response_id:
                return seen
        raise AssertionError(f"no response {response_id} within {seconds}s; got {seen!r}")


def test_stdio_stdout_carries_nothing_but_protocol(docs: Path, lorekeeper_home: Path, tmp_path: Path) -> None:
    """Loading the embedder and llama.cpp prints plenty; none of it may reach stdout."""
    proc = subprocess.Popen(
        [*CLI, "--verbose", "--db", str(tmp_path / "i.db"), "serve", "--watch", str(docs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(lorekeeper_home),
    )
    errors = _LineReader(proc.stderr)
    try:
        out = _LineReader(proc.stdout)

        def send(message: dict) -> None:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()

        send(INIT)
        lines = out.until(1)
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"name": "generate", "arguments": {"prompt": "hi", "use_context": False, "max_tokens": 4}}
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        lines += out.until(2)
        send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "retrieve", "arguments": {"query": "chain"}}})  # fmt: skip
        lines += out.until(3)
        for line in lines:
            message = json.loads(line)  # every stdout line is a JSON-RPC message
            assert message["jsonrpc"] == "2.0"
        result = json.loads(lines[-1])["result"]
        assert not result.get("isError"), result
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logged = b"".join(errors.lines.queue)
    assert logged, "logs go to stderr"


# ---------------------------------------------------------------------------- Streamable HTTP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """One HTTP server for the module, with its own data directory (its token is made on first run)."""
    base = tmp_path_factory.mktemp("http")
    docs = _write_docs(base / "docs")
    home = base / "home"
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "--db", str(base / "i.db"), "serve", "--http", "--port", str(port), "--watch", str(docs)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(home),
    )
    _LineReader(proc.stderr)  # drain it so the server never blocks on a full pipe
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the HTTP server exited during start-up"
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the HTTP server did not start within 120 s"
            time.sleep(0.2)
    try:
        yield url, home / "token", docs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post_initialize(url: str, headers: dict[str, str]) -> httpx.Response:
    base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    return httpx.post(url, json=INIT, headers={**base, **headers}, timeout=30)


def test_http_requires_the_bearer_token(http_server) -> None:
    url, token_file, _ = http_server
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # generated on first run, private
    token = token_file.read_text().strip()
    assert len(token) >= 32

    missing = _post_initialize(url, {})
    assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
    wrong = _post_initialize(url, {"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    good = _post_initialize(url, {"Authorization": f"Bearer {token}"})
    assert good.status_code == 200


def test_http_rejects_foreign_origins(http_server) -> None:
    url, token_file, _ = http_server
    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    foreign = _post_initialize(url, {**auth, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    rebinding = _post_initialize(url, {**auth, "Origin": "http://127.0.0.1.evil.example:8080"})
    assert rebinding.status_code == 403
    local_page = _post_initialize(url, {**auth, "Origin": "http://localhost:5173"})
    assert local_page.status_code == 200


def test_http_serves_tools_to_the_sdk_client(http_server) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    url, token_file, docs = http_server
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}

    async def main() -> None:
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                names = {t.name for t in (await client.list_tools()).tools}
                assert {"retrieve", "generate", "index_status"} == names
                with anyio.fail_after(120):
                    while True:
                        result = await client.call_tool("retrieve", {"query": "tomatoes sun", "k": 2})
                        if result.structured_content["hits"]:
                            break
                        await anyio.sleep(0.2)
                assert result.structured_content["hits"][0]["path"] == str(docs / "garden.md")
                bad = await client.call_tool("retrieve", {"query": "x", "k": 10_000})
                assert bad.is_error and "less than or equal to 200" in bad.content[0].text

    anyio.run(main)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port``, from /proc/net/tcp{,6} (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the socket table of Linux")
def test_http_listens_on_loopback_only_by_default(http_server) -> None:
    url, _, _ = http_server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    addresses = _listening_addresses(port)
    assert addresses, "no listening socket found for the server"
    loopback = {
        "0100007F",
        "00000000000000000000000001000000",
    }  # 127.0.0.1 and ::1, as the kernel writes them
    assert addresses <= loopback, f"listening beyond loopback: {addresses}"


def _guard_status(token: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status the access guard answers a request with these headers (the app behind it says 200)."""
    from lorekeeper.server.mcp.http import AccessGuard

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers}
    anyio.run(AccessGuard(app, token=token), scope, receive, send)
    return sent[0]["status"]


def test_the_token_is_compared_in_constant_time_and_every_near_miss_is_refused(monkeypatch) -> None:
    import hmac

    from lorekeeper.server.mcp import http

    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(http.hmac, "compare_digest", recording)
    token = "s3cret-token-value-0123456789abcdef"
    near_misses = [
        b"Bearer " + token[:-1].encode(),  # a prefix
        b"Bearer " + token.encode() + b"x",  # one more character
        b"Bearer " + token.upper().encode(),
        b"Basic " + token.encode(),  # another scheme
        b"Bearer",
        b"",
        b"Bearer \xe9\xff" + token.encode(),  # bytes that are not ASCII
    ]
    for value in near_misses:
        assert _guard_status(token, [(b"authorization", value)]) == 401, value
    assert _guard_status(token, [(b"authorization", b"Bearer " + token.encode())]) == 200
    assert (
        _guard_status(token, [(b"authorization", b"bearer " + token.encode())]) == 200
    )  # scheme is case-blind
    assert _guard_status(token, []) == 401
    origin = [(b"authorization", b"Bearer " + token.encode()), (b"origin", b"https://attacker.example")]
    assert _guard_status(token, origin) == 403
    assert len(calls) >= 5 and all(b == token.encode() for _, b in calls)  # hmac, never ==


def test_the_token_file_is_private_even_when_it_was_not(tmp_path: Path) -> None:
    from lorekeeper.server.mcp.http import load_or_create_token
    from lorekeeper.server.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    old = os.umask(0)  # the most permissive umask must not make the new file readable by others
    try:
        token = load_or_create_token(Settings.load(home=home))
    finally:
        os.umask(old)
    path = home / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    path.chmod(0o644)  # made readable by hand, or by an old version
    assert load_or_create_token(Settings.load(home=home)) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
