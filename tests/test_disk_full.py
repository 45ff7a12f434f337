"""A full disk and a read-only one: a clear error, an index still consistent, model files intact.

Where the tests may mount file systems (root on Linux), they use a real tmpfs of a few MiB,
remounted read-only for the read-only cases; elsewhere the full disk is a file-size limit on the
child process (RLIMIT_FSIZE, which makes writes fail like a full disk) or a simulated ENOSPC, and
the read-only cases are skipped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lorekeeper.server.adapters import AdapterError, AdapterRecord, AdapterRegistry
from lorekeeper.server.store import Store

LAUNCH = [sys.executable, str(Path(__file__).with_name("serve_with_fakes.py"))]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` when this process may mount one; yields whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        mounted = done.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def _remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def _cli(home: Path, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LOREKEEPER_HOME=str(home), LOREKEEPER_EMBEDDER="test-hash-64")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [*LAUNCH, *args], env=env, capture_output=True, text=True, timeout=600,
        preexec_fn=limit if fsize else None,
    )  # fmt: skip


def _folder(path: Path, count: int, size: int, word: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = " ".join(f"{word}{i}w{j}" for j in range(size // 10))
        (path / f"{word}-{i:04d}.txt").write_text(f"{word} note {i}.\n\n{body}\n", encoding="utf-8")
    return path.resolve()


@pytest.mark.slow
def test_indexing_onto_a_full_disk_says_so_and_keeps_what_was_indexed(tmp_path: Path) -> None:
    first = _folder(tmp_path / "first", 5, 200, "early")
    bulk = _folder(tmp_path / "bulk", 400, 8000, "bulk")
    home = tmp_path / "home"
    with tmpfs(tmp_path / "small", "3m") as mounted:
        db = (tmp_path / "small" if mounted else tmp_path) / "index.db"
        fsize = None if mounted else 3 * 2**20
        ok = _cli(home, "--db", str(db), "add", str(first), fsize=fsize)
        assert ok.returncode == 0, ok.stderr[-2000:]
        full = _cli(home, "--db", str(db), "add", str(bulk), fsize=fsize)
        assert full.returncode == 1, (full.returncode, full.stderr[-2000:])
        assert "free space" in full.stderr and "Traceback" not in full.stderr, full.stderr[-2000:]
        with Store.open(db, create=False) as store:  # reading needs no space
            assert store.check_integrity() == []
            docs = {d.path: d for d in store.documents()}
        assert {str(first / f"early-{i:04d}.txt") for i in range(5)} <= set(docs)
        assert all(d.status == "indexed" and d.chunk_count > 0 for d in docs.values())
        found = _cli(home, "--db", str(db), "search", "early note 0", "--mode", "keyword", "--json")
        assert found.returncode == 0 and "early-0000.txt" in found.stdout.replace("\n", ""), found.stderr[
            -2000:
        ]


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs to mount a tmpfs"
)
def test_writing_an_index_on_a_read_only_disk_is_a_clear_error(tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs", 5, 200, "ro")
    home = tmp_path / "home"
    with tmpfs(tmp_path / "disk", "8m") as mounted:
        assert mounted
        db = tmp_path / "disk" / "index.db"
        assert _cli(home, "--db", str(db), "add", str(docs)).returncode == 0
        (docs / "later.txt").write_text("a note written after the disk became read-only\n", encoding="utf-8")
        _remount(tmp_path / "disk", "ro")
        try:
            added = _cli(home, "--db", str(db), "add", str(docs))
            assert added.returncode == 1 and "Traceback" not in added.stderr, added.stderr[-2000:]
            assert "read-only" in added.stderr or "cannot be written" in added.stderr, added.stderr[-2000:]
            found = _cli(home, "--db", str(db), "search", "ro note 0", "--mode", "keyword", "--json")
            assert "Traceback" not in found.stderr, found.stderr[-2000:]  # found, or a reason
            assert found.returncode == 0 or "read-only" in found.stderr, found.stderr[-2000:]
        finally:
            _remount(tmp_path / "disk", "rw")
        with Store.open(db, create=False) as store:
            assert store.check_integrity() == []
            assert len(store.documents()) == 5


def _gguf(path: Path, megabytes: float) -> tuple[Path, str]:
    data = b"GGUF" + os.urandom(int(megabytes * 2**20))
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _check_previous_pair(directory: Path, sha: str) -> None:
    registry = AdapterRegistry(directory)
    record = registry.read("notes")
    assert record.description == sha
    assert hashlib.sha256((directory / record.adapter_file).read_bytes()).hexdigest() == sha
    assert sorted(p.name for p in directory.iterdir()) == sorted(["notes.json", record.adapter_file])


def test_registering_an_adapter_on_a_full_disk_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    old, old_sha = _gguf(tmp_path / "old.gguf", 1)
    new, new_sha = _gguf(tmp_path / "new.gguf", 6)
    with tmpfs(tmp_path / "adapters", "4m") as mounted:
        directory = tmp_path / "adapters"
        registry = AdapterRegistry(directory)
        registry.register("notes", old, AdapterRecord(name="notes", description=old_sha))
        if not mounted:  # simulate what a full disk does to the copy
            import shutil

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(shutil, "copyfile", no_space)
        with pytest.raises(AdapterError, match="No space left") as caught:
            registry.register("notes", new, AdapterRecord(name="notes", description=new_sha))
        assert "as registered before is unchanged" in str(caught.value)
        _check_previous_pair(directory, old_sha)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs to mount a tmpfs"
)
def test_registering_an_adapter_on_a_read_only_disk_keeps_the_previous_one(tmp_path: Path) -> None:
    old, old_sha = _gguf(tmp_path / "old.gguf", 0.5)
    new, new_sha = _gguf(tmp_path / "new.gguf", 0.5)
    with tmpfs(tmp_path / "adapters", "4m") as mounted:
        assert mounted
        directory = tmp_path / "adapters"
        AdapterRegistry(directory).register("notes", old, AdapterRecord(name="notes", description=old_sha))
        _remount(directory, "ro")
        try:
            with pytest.raises(AdapterError, match="Read-only file system"):
                AdapterRegistry(directory).register(
                    "notes", new, AdapterRecord(name="notes", description=new_sha)
                )
            _check_previous_pair(directory, old_sha)
        finally:
            _remount(directory, "rw")
