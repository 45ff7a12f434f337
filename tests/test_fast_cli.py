"""A CLI that answers at once: the embedder without torch, lazy imports, reuse of a running server.

The ONNX graph of all-MiniLM-L6-v2 is exported once into the cache the tests share (conftest), so
only the first test to need it pays the export.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lorekeeper.plugins.embedders import minilm_onnx
from lorekeeper.plugins.embedders.minilm import MiniLMEmbedder
from lorekeeper.server.settings import Settings

HEAVY = ("torch", "transformers", "sentence_transformers", "bs4")
REPO = Path(__file__).resolve().parent.parent

# Runs the `lorekeeper` command in this interpreter and reports, at exit, which heavy modules it
# imported (on the last line of stderr).
WRAPPER = """
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("\\nIMPORTED " + json.dumps(sorted(
    m for m in ("torch", "transformers", "sentence_transformers", "bs4", "onnxruntime") if m in sys.modules
)) + "\\n"))
sys.argv = ["lorekeeper"] + sys.argv[1:]
from lorekeeper.server.cli import main
main()
"""


def run_cli(tmp_path: Path, *args: str, home: Path, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    wrapper = tmp_path / "run_lorekeeper.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    environ = dict(os.environ, LOREKEEPER_HOME=str(home), **env)
    environ.pop("LOREKEEPER_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, str(wrapper), *args], capture_output=True, text=True, env=environ, timeout=300
    )
    marker = proc.stderr.rstrip().rsplit("\n", 1)[-1]
    assert marker.startswith("IMPORTED "), proc.stderr
    return proc, json.loads(marker.removeprefix("IMPORTED "))


def real_texts() -> list[str]:
    """Real prose and code nobody here wrote: the standard library's own sources and docstrings,
    plus the demo documents; short and long (past the 256-piece window)."""
    texts = []
    for name in ("json/__init__.py", "textwrap.py", "shutil.py", "argparse.py"):
        source = (Path(os.__file__).parent / name).read_text(encoding="utf-8")
        texts += [part.strip() for part in source.split("\n\n") if len(part.strip()) > 40][:25]
        texts.append(source[:6000])
    for path in sorted((REPO / "scripts" / "demo" / "docs").rglob("*.*")):
        texts.append(path.read_text(encoding="utf-8"))
    return texts + [
        "How many days of paid holiday do new staff get?",
        "bike tyre pressure",
        "naïve café 東京",
    ]


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return Settings.load().cache_dir  # the shared test cache (conftest)


@pytest.mark.slow
def test_onnx_vectors_and_tokens_equal_torch(cache_dir: Path) -> None:
    onnx = MiniLMEmbedder(runtime="onnx", cache_dir=lambda: cache_dir)
    torch = MiniLMEmbedder(runtime="torch")
    texts = real_texts()
    assert onnx.active_runtime == "onnx" and torch.active_runtime == "torch"
    got, want = onnx.embed(texts), torch.embed(texts)
    cosine = (got * want).sum(axis=1)
    assert got.shape == want.shape == (len(texts), 384)
    assert cosine.min() >= 1 - 1e-3, f"worst text: {texts[int(cosine.argmin())][:80]!r}"
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # chunking cuts at the same places, so an index built either way has the same chunks
    for text in texts[:40]:
        assert onnx.token_spans(text) == torch.token_spans(text)
        assert onnx.count_tokens(text) == torch.count_tokens(text)


def test_a_failed_export_falls_back_to_torch_and_says_why_once(tmp_path, monkeypatch, caplog) -> None:
    def refuse(*_args):
        raise minilm_onnx.OnnxUnavailable(
            "the ONNX export disagrees with the torch model (lowest cosine 0.5)"
        )

    monkeypatch.setattr(minilm_onnx, "export", refuse)

    class NoTorch(MiniLMEmbedder):
        model = None  # the export is refused before the model is used; keep torch out of this test

    with caplog.at_level(logging.INFO, logger="lorekeeper.plugins.embedders.minilm"):
        assert NoTorch(runtime="auto", cache_dir=lambda: tmp_path).active_runtime == "torch"
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "disagrees" in warned[0].getMessage()
        caplog.clear()
        assert NoTorch(runtime="auto", cache_dir=lambda: tmp_path).active_runtime == "torch"
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # remembered, quiet
    with pytest.raises(RuntimeError, match="disagrees"):
        assert NoTorch(runtime="onnx", cache_dir=lambda: tmp_path).active_runtime  # forced: loud


@pytest.fixture(scope="module")
def index(tmp_path_factory, cache_dir: Path) -> tuple[Path, Path]:
    """A small real index (the demo documents) built with the ONNX embedder, and its data dir."""
    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.store import Store

    base = tmp_path_factory.mktemp("fastcli")
    db = base / "index.db"
    with Store.open(db) as store:
        embedder = MiniLMEmbedder(runtime="onnx", cache_dir=lambda: cache_dir)
        Indexer(store, embedder, settings=Settings.load({"db": str(db)})).add_root(
            REPO / "scripts" / "demo" / "docs"
        )
    return db, base / "home"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
def test_search_does_not_import_torch(tmp_path, index, mode) -> None:
    db, home = index
    proc, imported = run_cli(tmp_path, "--db", str(db), "search", "paid holiday for new staff", "--mode", mode,
                             "-k", "2", home=home, LOREKEEPER_REUSE_SERVER="false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "handbook.md" in proc.stdout
    assert not set(imported) & set(HEAVY), imported


def test_help_does_not_import_models(tmp_path) -> None:
    proc, imported = run_cli(tmp_path, "--help", home=tmp_path / "home")
    assert proc.returncode == 0 and "search" in proc.stdout
    assert imported == []


@pytest.mark.parametrize("content", [None, '{"messages": [\n', '{"no": "known fields"}\n'])
def test_finetune_data_bad_file_errors_without_the_training_stack(tmp_path, content) -> None:
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    proc, imported = run_cli(tmp_path, "finetune", "data", str(data), home=tmp_path / "home")
    assert proc.returncode != 0
    assert str(data) in proc.stderr and "Traceback" not in proc.stderr
    assert not set(imported) & set(HEAVY), imported


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_search_reuses_a_running_server_for_the_same_index(tmp_path, index, wait) -> None:
    db, home = index
    port = free_port()
    env = dict(os.environ, LOREKEEPER_HOME=str(home))
    env.pop("LOREKEEPER_TOKEN", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "lorekeeper.server.cli", "--db", str(db), "serve", "--http", "--port", str(port),
         "--no-watcher"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait(lambda: server.poll() is not None or listening(port), timeout=120)
        assert server.poll() is None, "the server exited during start-up"
        args = ("search", "paid holiday for new staff", "--mode", "vector", "-k", "2")
        proc, imported = run_cli(tmp_path, "--db", str(db), *args, home=home, LOREKEEPER_HTTP_PORT=str(port))
        assert proc.returncode == 0, proc.stderr
        assert "handbook.md" in proc.stdout
        assert "onnxruntime" not in imported, "the query was embedded here, not by the server"
        local, imported = run_cli(tmp_path, "--db", str(db), *args, home=home, LOREKEEPER_HTTP_PORT=str(port),
                                  LOREKEEPER_REUSE_SERVER="false")  # fmt: skip
        assert "onnxruntime" in imported and local.stdout == proc.stdout  # the same hits, same text

        other = tmp_path / "other.db"  # another index: the server is not used for it
        proc, imported = run_cli(
            tmp_path, "--db", str(other), *args, home=home, LOREKEEPER_HTTP_PORT=str(port)
        )
        assert proc.returncode != 0 and str(other) in proc.stderr  # the local error: no such index

        proc, _ = run_cli(tmp_path, "--db", str(db), "search", "x", "-k", "500", home=home,
                          LOREKEEPER_HTTP_PORT=str(port))  # fmt: skip
        assert proc.returncode != 0 and "out of range" in proc.stderr  # the server's reason, as an error
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_search_runs_locally_when_no_server_answers(tmp_path, index) -> None:
    from lorekeeper.server.cli import remote

    db, home = index
    settings = Settings.load({"db": str(db), "http_port": free_port(), "token": "t"}, home=home)
    assert remote.search(settings, query="x", k=1) is None  # nothing listens: run here


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """``serve --http`` in this process on a free port, with the test fakes as its models; yields
    the data dir, index, port and every batch of texts the server's embedder was given."""
    import uvicorn
    from fakes import HashEmbedder, register_fakes

    embedded: list[list[str]] = []
    real_embed = HashEmbedder.embed

    def recording(self, texts):
        embedded.append(list(texts))
        return real_embed(self, texts)

    from lorekeeper.server.indexer import Indexer
    from lorekeeper.server.mcp import ServerOptions, create_server, http_app, load_or_create_token
    from lorekeeper.server.store import Store

    register_fakes()
    home, db, port = tmp_path / "home", tmp_path / "fake.db", free_port()
    settings = Settings.load({"db": str(db), "embedder": "test-hash-64", "generator": "scripted"}, home=home)
    with Store.open(db) as store:
        Indexer(store, settings=settings).add_root(REPO / "scripts" / "demo" / "docs")
    monkeypatch.setattr(HashEmbedder, "embed", recording)
    app = http_app(
        create_server(ServerOptions(settings=settings, start_watcher=False)), load_or_create_token(settings)
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield home, db, port, embedded
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_server_loads_the_embedder_at_start_and_guards_the_api(fake_server, wait) -> None:
    import urllib.error
    import urllib.request

    home, db, port, embedded = fake_server
    wait(lambda: listening(port), timeout=30)
    wait(lambda: ["warm up"] in embedded, timeout=30)  # before any request asked for it
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", data=b'{"query": "x"}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401  # the same bearer token as /mcp


def test_ask_streams_the_running_servers_answer(tmp_path, fake_server, wait) -> None:
    home, db, port, _ = fake_server
    wait(lambda: listening(port), timeout=30)
    # the CLI knows neither fake model: only the server can answer this
    proc, imported = run_cli(tmp_path, "--db", str(db), "ask", "How many days of paid holiday?", home=home,
                             LOREKEEPER_HTTP_PORT=str(port))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "A scripted answer." in proc.stdout and "Sources" in proc.stdout
    assert not set(imported) & set(HEAVY), imported
    proc, _ = run_cli(tmp_path, "--db", str(db), "ask", "q", "--adapter", "nosuch", "--json", home=home,
                      LOREKEEPER_HTTP_PORT=str(port))  # fmt: skip
    assert proc.returncode != 0 and "nosuch" in proc.stderr and "Traceback" not in proc.stderr
