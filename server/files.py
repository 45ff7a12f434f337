"""Reading a file of a watched folder safely: once, through one descriptor, checked against the roots.

``open_checked`` opens the path (a symlink is followed, as a user expects), then asks the opened
descriptor itself what it is (``fstat``) and where it really lives (``/proc/self/fd`` on Linux,
``F_GETPATH`` on macOS, else the resolved path whose device and inode must match the descriptor's).
Whatever the path turns into a moment later - a symlink to ``/etc/passwd``, a pipe - the bytes
read come from the file that passed the check. Nothing opens the path by name again: loaders get
the bytes.

``sniff`` tells text from binary the way git and ``file`` do (NUL bytes, then UTF-8 validity and
control characters in the first few kilobytes), for files no loader claims by name. ``gunzip``
decompresses a ``.gz`` file within a size limit and refuses a decompression bomb.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat as stat_mod
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

SNIFF_BYTES = 8192
GZIP_MAX_RATIO = 100  # decompressed / compressed size beyond which a big .gz is a bomb
GZIP_BOMB_BYTES = 16 * 2**20
_F_GETPATH = 50  # macOS fcntl command: the path of an open descriptor
_CONTROL = bytes(set(range(32)) - {8, 9, 10, 12, 13, 27}) + b"\x7f"


class FileProblem(Exception):
    """Why a file is not indexed: ``status`` is "skipped", "failed" or "ignored"; ``kind`` a short
    reason name for counts; ``keep_chunks`` whether chunks indexed earlier may stay (a transient
    read error) or must go (the file turned into a link out of the roots, grew too big, ...)."""

    def __init__(self, status: str, kind: str, reason: str, keep_chunks: bool = False) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason, self.keep_chunks = status, kind, reason, keep_chunks


class FileGone(Exception):
    """The file vanished before it could be read (deleted or renamed away)."""


@dataclass
class CheckedFile:
    """An open regular file inside a watched folder. Read it with ``read``; close it when done."""

    path: str
    real_path: str
    fd: int
    st: os.stat_result

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """What must still hold at commit time for the bytes read to be the file's current bytes."""
        return identity(self.st)

    def read(self, limit: int) -> bytes:
        """At most ``limit`` bytes from the start (one more, if the file holds more)."""
        chunks, size = [], 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        while size <= limit:
            block = os.read(self.fd, min(1 << 20, limit + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def inside(path: str, roots: Iterable[str]) -> bool:
    for root in roots:
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def open_checked(path: str, roots: Iterable[str]) -> CheckedFile:
    """Open ``path`` for reading if it is a regular file whose real location is inside ``roots``.

    Raises ``FileGone`` if it does not exist, ``FileProblem`` for anything else that keeps it out.
    """
    roots = list(roots)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    )
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a named pipe must not hang the indexer
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise FileProblem(
                "skipped", "symlink", f"broken symlink to {os.readlink(path)}; fix or remove it"
            ) from exc
        raise FileGone(path) from exc
    except NotADirectoryError as exc:
        raise FileGone(path) from exc
    except PermissionError as exc:
        raise FileProblem("failed", "permission", "permission denied: lorekeeper cannot read this file; "
                          "fix its permissions") from exc  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileProblem(
                "failed", "symlink", "symlink loop: the link points back at itself; remove or fix it"
            ) from exc
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, or a device without a driver
            raise FileProblem(
                "ignored", "not a regular file", "not a regular file (a socket or device)"
            ) from exc
        raise FileProblem(
            "failed", "read error", f"cannot open the file: {exc.strerror or exc}", keep_chunks=True
        ) from exc
    try:
        return _check(path, fd, roots)
    except BaseException:
        os.close(fd)
        raise


def _check(path: str, fd: int, roots: list[str]) -> CheckedFile:
    st = os.fstat(fd)
    if stat_mod.S_ISDIR(st.st_mode):
        raise FileGone(path)  # a folder now: not a file any more; a scan of the folder finds its files
    if not stat_mod.S_ISREG(st.st_mode):
        raise FileProblem("ignored", "not a regular file", "not a regular file (a pipe, socket or device)")
    real = _descriptor_path(fd, path, st)
    if real is None:
        raise FileGone(path)
    if not inside(real, roots):
        raise FileProblem(
            "skipped",
            "symlink",
            f"symlink to {real}, outside the watched folders; add that folder to index it",
        )
    return CheckedFile(path=path, real_path=real, fd=fd, st=st)


def _descriptor_path(fd: int, path: str, st: os.stat_result) -> str | None:
    """Where the open file really is; None when it was deleted (or replaced) after it was opened."""
    if sys.platform.startswith("linux"):
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = None
        if real is not None:
            return None if real.endswith(" (deleted)") and not os.path.exists(real) else real
    if sys.platform == "darwin":
        import fcntl

        try:
            raw = fcntl.fcntl(fd, _F_GETPATH, b"\0" * 1024)
            return os.fsdecode(raw.split(b"\0", 1)[0])
        except OSError:
            pass
    real = os.path.realpath(path)
    try:
        now = os.stat(real, follow_symlinks=False)
    except OSError:
        return None
    return real if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None


def still_same(path: str, expected: tuple[int, int, int, int]) -> bool:
    """Whether ``path`` still leads to the very file (and version) that was read."""
    try:
        return identity(os.stat(path)) == expected
    except OSError:
        return False


def sniff(head: bytes) -> str | None:
    """Why ``head`` (a file's first bytes) looks binary, or None when it looks like text."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")):
        return None  # a byte order mark: UTF-16/32 or UTF-8 text
    nul = head.find(b"\0")
    if nul != -1:
        return f"binary content (a NUL byte at offset {nul})"
    try:
        head.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            return None  # a character cut in two by the end of the sample
    controls = sum(head.count(bytes([c])) for c in _CONTROL)
    if controls > max(1, len(head) // 100):
        return f"binary content ({controls} control bytes in the first {len(head)} bytes)"
    return None  # a legacy 8-bit encoding; the loader decodes it and says so


def gunzip(data: bytes, limit: int) -> bytes:
    """The decompressed content of gzip ``data``: a ``FileProblem`` when it is corrupt, larger than
    ``limit`` bytes, or a bomb (over ``GZIP_MAX_RATIO`` times its compressed size and
    ``GZIP_BOMB_BYTES``)."""
    bomb = max(GZIP_BOMB_BYTES, GZIP_MAX_RATIO * len(data))
    cap = min(limit, bomb)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(cap + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise FileProblem("failed", "corrupt", f"corrupt gzip file: {exc}") from exc
    if len(out) > cap:
        if cap == bomb and bomb < limit:
            raise FileProblem(
                "skipped", "too large", f"refused as a decompression bomb: {len(data):,} bytes unpack to over "
                f"{cap:,} (more than {GZIP_MAX_RATIO} times)"
            )  # fmt: skip
        raise FileProblem(
            "skipped", "too large", f"unpacks to more than {limit / 2**20:g} MB, over the max_file_mb limit; "
            "raise it with `lorekeeper config set max_file_mb N` to index it"
        )  # fmt: skip
    return out
