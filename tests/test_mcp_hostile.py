"""Garbage on the wire and hostile files on disk, against a real server process.

Malformed JSON-RPC over stdio and HTTP, request bodies of 10 MB and more, and files built to
exhaust a parser (a zip-bomb DOCX, deeply nested HTML, a PDF of thousands of pages, a 100 MB
single line): each is answered with a clear error or handled within a stated time and memory
bound, and the server keeps serving. The server runs with the test fakes (hash embedder, scripted
generator, see serve_with_fakes.py) so what is measured is the server, not a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_mcp_transports import INIT, _free_port, _LineReader

LAUNCH = [sys.executable, str(Path(__file__).with_name("serve_with_fakes.py"))]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LOREKEEPER_HOME=str(home), LOREKEEPER_EMBEDDER="test-hash-64", LOREKEEPER_GENERATOR="scripted")
    env.pop("LOREKEEPER_TOKEN", None)
    return env


def _docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bike.txt").write_text("The bicycle chain is oiled every 300 kilometres.\n", encoding="utf-8")
    return folder.resolve()


class StdioServer:
    """``lorekeeper serve`` over pipes, spoken to line by line."""

    def __init__(self, tmp: Path, docs: Path) -> None:
        self.proc = subprocess.Popen(
            [*LAUNCH, "--db", str(tmp / "i.db"), "serve", "--watch", str(docs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp / "home"),
        )  # fmt: skip
        self.out = _LineReader(self.proc.stdout)
        self.errors = _LineReader(self.proc.stderr)
        self.next_id = 1000

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        self.send_raw((json.dumps(message) + "\n").encode())

    def request(self, method: str, params: dict | None = None, seconds: float = 60) -> dict:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}})
        lines = self.out.until(self.next_id, seconds)
        return json.loads(lines[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def stdio_server(tmp_path: Path) -> Iterator[StdioServer]:
    server = StdioServer(tmp_path, _docs(tmp_path / "docs"))
    try:
        server.send(INIT)
        server.out.until(1)
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        yield server
    finally:
        server.close()


GARBAGE: list[bytes] = [
    b"not json at all\n",
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call"\n',  # cut short
    b"[]\n",
    b"[1, 2, 3]\n",
    b'"just a string"\n',
    b"\n",
    b"   \t  \n",
    b"\xff\xfe\x00\x01\x02 binary\n",
    b'{"jsonrpc": "1.0", "id": 3, "method": "ping"}\n',
    b'{"jsonrpc": "2.0", "id": {"nested": true}, "method": "ping"}\n',
    b'{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": "nope"}\n',
    b'{"jsonrpc": "2.0", "id": 5, "method": "no/such/method"}\n',
    b'{"jsonrpc": "2.0", "id": 6, "result": {"answer": "to nothing"}}\n',
    b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "retrieve", '
    b'"arguments": {"query": "x", "k": NaN, "modified_after": Infinity}}}\n',
    b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "retrieve", '
    b'"arguments": {"query": "x", "k": 1e999}}}\n',
    b'{"jsonrpc": "2.0", "id": 1' + b"0" * 100 + b', "method": "ping"}\n',
    b'{"jsonrpc": "2.0", "id": 9, "method": "resources/read", "params": {"uri": "lorekeeper://doc/etc/passwd"}}\n',
    b"[" * 100_000 + b"\n",
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"\n",
    b'{"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "retrieve", '
    b'"arguments": {"query": "' + b"x" * (10 * 2**20) + b'"}}}\n',
]


@pytest.mark.slow
def test_malformed_json_rpc_over_stdio_never_stops_the_server(stdio_server: StdioServer) -> None:
    answered = []
    for garbage in GARBAGE:
        stdio_server.send_raw(garbage)
        pong = stdio_server.request("ping", seconds=60)  # the next good request is still answered
        assert pong.get("result") == {}, (garbage[:80], pong)
        assert stdio_server.proc.poll() is None, f"the server exited after {garbage[:80]!r}"
        answered.append(garbage[:40])
    for line in stdio_server.out.lines.queue:
        json.loads(line)  # everything on stdout is still protocol
    result = stdio_server.request("tools/call", {"name": "retrieve", "arguments": {"query": "chain"}})
    assert "result" in result and not result["result"].get("isError"), result
    assert len(answered) == len(GARBAGE)


def test_hostile_numbers_over_stdio_get_a_reason(stdio_server: StdioServer) -> None:
    """NaN and Infinity are not JSON, but a lenient parser might let them through: they must end
    in an error that says what is wrong, not in a crash or a silent unfiltered search."""
    args = {"query": "chain", "modified_after": "NaN"}
    reply = stdio_server.request("tools/call", {"name": "retrieve", "arguments": args})
    assert reply["result"]["isError"] and "modified_after" in reply["result"]["content"][0]["text"]
    stdio_server.send_raw(
        b'{"jsonrpc": "2.0", "id": 77, "method": "tools/call", "params": {"name": "generate", '
        b'"arguments": {"prompt": "x", "temperature": NaN}}}\n'
    )
    reply = json.loads(stdio_server.out.until(77)[-1])
    assert "error" in reply or reply["result"]["isError"], reply
    text = json.dumps(reply)
    assert "temperature" in text or "Parse error" in text or "Invalid" in text, text


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, subprocess.Popen]]:
    base = tmp_path_factory.mktemp("hostile-http")
    docs = _docs(base / "docs")
    port = _free_port()
    proc = subprocess.Popen(
        [*LAUNCH, "--db", str(base / "i.db"), "serve", "--http", "--port", str(port), "--watch", str(docs)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(base / "home"),
    )  # fmt: skip
    _LineReader(proc.stderr)
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
        yield url, (base / "home" / "token").read_text().strip(), proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _bodies() -> list[tuple[str, bytes | Iterator[bytes], dict[str, str]]]:
    ten_mb = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "' + b"x" * (10 * 2**20) + b'"}'

    def streamed() -> Iterator[bytes]:  # 24 MB with no Content-Length: the limit must count bytes
        yield b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "'
        for _ in range(24):
            yield b"y" * 2**20
        yield b'"}'

    return [
        ("not json", b"this is not json", {}),
        ("empty", b"", {}),
        ("truncated", b'{"jsonrpc": "2.0", "id": 1, "method": "initialize"', {}),
        ("array of junk", b"[1, 2, {}]", {}),
        ("deep nesting", b"[" * 200_000, {}),
        ("binary", bytes(range(256)) * 100, {}),
        ("wrong content type", json.dumps(INIT).encode(), {"Content-Type": "text/plain"}),
        ("10 MB body", ten_mb, {}),
        ("24 MB streamed body", streamed(), {}),
    ]


@pytest.mark.slow
def test_malformed_and_huge_http_bodies_are_refused_and_the_server_keeps_serving(http_server) -> None:
    url, token, proc = http_server
    auth = {**HEADERS, "Authorization": f"Bearer {token}"}
    outcomes = {}
    for name, body, extra in _bodies():
        started = time.monotonic()
        try:
            response = httpx.post(url, content=body, headers={**auth, **extra}, timeout=60)
            outcomes[name] = response.status_code
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        except httpx.RemoteProtocolError:  # the server may close a connection it refused mid-upload
            outcomes[name] = "closed"
        assert time.monotonic() - started < 60, name
        assert proc.poll() is None, f"the server exited after the {name} body"
    assert outcomes["10 MB body"] in (413, "closed") and outcomes["24 MB streamed body"] in (413, "closed")
    unauthenticated = httpx.post(url, content=b"z" * (12 * 2**20), headers=HEADERS, timeout=60)
    assert unauthenticated.status_code == 401  # refused before the body is read
    good = httpx.post(url, json=INIT, headers=auth, timeout=30)
    assert good.status_code == 200, good.text


# ---------------------------------------------------------------------------- hostile files

TIME_BOUND_S = 240  # every hostile file settled (indexed, failed or skipped, with a reason)
MEMORY_BOUND_MB = 1024  # the server's peak resident memory while it deals with them (seen: ~190)


def _zip_bomb_docx(path: Path, megabytes: int) -> None:
    """A DOCX whose document.xml expands to ``megabytes`` of tiny paragraphs (it compresses ~1000:1)."""
    head = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>'
    )
    para = "<w:p><w:r><w:t>a</w:t></w:r></w:p>"
    count = megabytes * 2**20 // len(para)
    types = (
        '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
    )
    rels = (
        '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
        'Target="word/document.xml"/></Relationships>'
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("[Content_Types].xml", types)
        zf.writestr("_rels/.rels", rels)
        with zf.open("word/document.xml", "w", force_zip64=True) as member:
            member.write(head.encode())
            block = (para * 10_000).encode()
            for _ in range(count // 10_000):
                member.write(block)
            member.write(b"</w:body></w:document>")


def _many_page_pdf(path: Path, pages: int) -> None:
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path))
    for page in range(pages):
        pdf.drawString(72, 720, f"Page {page + 1} of the very long manual: valve {page} is blue.")
        pdf.showPage()
    pdf.save()


def _hostile_folder(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    files = {
        "bomb": folder / "bomb.docx",
        "nested": folder / "nested.html",
        "pages": folder / "manual.pdf",
        "line": folder / "one-line.txt",
        "normal": folder / "bike.txt",
    }
    _zip_bomb_docx(files["bomb"], megabytes=200)
    depth = 100_000
    files["nested"].write_text(
        "<html><body>" + "<div>" * depth + "deep text" + "</div>" * depth + "</body></html>", encoding="utf-8"
    )
    _many_page_pdf(files["pages"], 3000)
    with open(files["line"], "wb") as handle:  # 100 MB, one line, no newline
        for _ in range(100):
            handle.write(b"word " * (2**20 // 5))
    files["normal"].write_text("The bicycle chain is oiled every 300 kilometres.\n", encoding="utf-8")
    return files


def _peak_rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _settled(server: StdioServer, db: Path, files: dict[str, Path]) -> dict[str, str] | None:
    """Each file's outcome once every one has one (indexed, or failed/skipped with a reason)."""
    from lorekeeper.server.store import Store

    status = server.request("tools/call", {"name": "index_status", "arguments": {}})["result"]
    with Store.open(db, create=False) as store:
        docs = {d.path: d for d in store.documents()}
    outcomes = {}
    for name, path in files.items():
        doc = docs.get(str(path))
        if doc is not None:
            outcomes[name] = doc.status + (f": {doc.error}" if doc.error else "")
    done = len(outcomes) == len(files) and status["structuredContent"]["pending"] == 0
    return outcomes if done else None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_hostile_files_are_handled_within_bounds_and_the_server_keeps_serving(tmp_path: Path) -> None:
    files = _hostile_folder(tmp_path / "hostile")
    server = StdioServer(tmp_path, tmp_path / "hostile")
    try:
        server.send(INIT)
        server.out.until(1)
        server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        started = time.monotonic()
        outcomes = None
        while outcomes is None:
            peak = _peak_rss_mb(server.proc.pid)
            if peak > MEMORY_BOUND_MB:
                server.proc.kill()
                pytest.fail(
                    f"the server's memory passed {MEMORY_BOUND_MB} MB ({peak:.0f} MB) on the hostile files"
                )
            elapsed = time.monotonic() - started
            assert elapsed < TIME_BOUND_S, f"the hostile files were not all handled within {TIME_BOUND_S} s"
            outcomes = _settled(server, tmp_path / "i.db", files)
            time.sleep(1)
        print(
            f"settled in {time.monotonic() - started:.0f} s, peak RSS {_peak_rss_mb(server.proc.pid):.0f} MB:"
        )
        for name, outcome in outcomes.items():
            print(f"  {name}: {outcome[:160]}")
        assert outcomes["normal"] == "indexed"
        assert outcomes["bomb"].startswith("failed") and "zip bomb" in outcomes["bomb"]
        assert "limit" in outcomes["line"]  # 100 MB is over the default 50 MB: skipped, saying so
        hits = server.request("tools/call", {"name": "retrieve", "arguments": {"query": "bicycle chain"}})
        assert hits["result"]["structuredContent"]["hits"][0]["path"] == str(files["normal"])
    finally:
        server.close()
