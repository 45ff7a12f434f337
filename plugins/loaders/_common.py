"""Helpers the built-in loaders share: reading files safely, decoding text, mapping offsets to lines.

Every loader reads the whole file through ``read_bytes`` so that a file that vanished, a folder, or
a permission problem becomes a ``LoaderError`` naming the file, never a raw ``OSError`` deep inside a
parser. Text-like loaders then call ``decode_text``, which never fails on bad bytes: a user's folder
holds old Windows-1252 notes and half-broken files, and indexing most of a file beats skipping it.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..base import BinaryFileError, LoaderError, TextUnit, check_text_limit

BINARY_PROBE_BYTES = 8192
UTF8_BOM = b"\xef\xbb\xbf"

_NEWLINE = re.compile("\n")
_REAL_NON_ASCII = re.compile("[^\x00-\x7f\ufffd]")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or a ``LoaderError`` that says what the user can do about it.

    Only regular files are read: opening a named pipe that happens to end in ``.txt`` would block
    the indexer forever.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise LoaderError(f"not a regular file (a pipe, socket or device): {path}")
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise LoaderError(f"file not found (deleted or moved before it could be read): {path}") from exc
    except IsADirectoryError as exc:
        raise LoaderError(f"not a file but a directory: {path}") from exc
    except PermissionError as exc:
        raise LoaderError(f"permission denied reading {path}: check the file's permissions") from exc
    except OSError as exc:
        raise LoaderError(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_not_binary(data: bytes, path: Path) -> None:
    """Refuse data with NUL bytes near the start: text files never have them, binaries nearly always do."""
    probe = data[:BINARY_PROBE_BYTES]
    nul = probe.find(b"\x00")
    if nul != -1:
        raise BinaryFileError(
            f"binary file: {path} has a NUL byte at offset {nul}; "
            "it is not text, so exclude it or add a loader plugin for its format"
        )


@dataclass
class DecodedText:
    text: str
    encoding: str
    warnings: list[str] = field(default_factory=list)


def decode_text(data: bytes, path: Path, declared: str | None = None) -> DecodedText:
    """Decode a text file: its ``declared`` encoding (e.g. a Python coding cookie) when that works,
    else UTF-8 and the fallbacks of ``_decode``.

    NUL characters (a log file padded after a crash, past the binary probe) become spaces, which
    keeps every offset in place while keeping them out of the index.
    """
    decoded = None
    if declared:
        try:
            decoded = DecodedText(data.decode(declared).removeprefix("\ufeff"), declared)
        except (LookupError, UnicodeDecodeError):
            decoded = None
    if decoded is None:
        decoded = _decode(data, path)
    nuls = decoded.text.count("\x00")
    if nuls:
        decoded.text = decoded.text.replace("\x00", " ")
        decoded.warnings.append(f"{path}: {nuls} NUL character(s) replaced with spaces")
    return decoded


def _decode(data: bytes, path: Path) -> DecodedText:
    """UTF-8 (a leading BOM is dropped), else a lossless or lossy fallback.

    Fallback order: if no byte sequence in the file is valid multi-byte UTF-8 and Windows-1252
    decodes every byte, the file is taken as a legacy Windows-1252 (Latin-1 superset) file; otherwise
    it is mostly UTF-8 with some damage, and the bad bytes become U+FFFD. Either way a warning says so,
    with the position of the first bad byte, so the user can fix the file if it matters.
    """
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    try:
        return DecodedText(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError as exc:
        bad_offset = exc.start
    line = data.count(b"\n", 0, bad_offset) + 1
    where = f"{path}: not valid UTF-8 (first bad byte at offset {bad_offset}, line {line})"
    lossy = data.decode("utf-8", errors="replace")
    if not _REAL_NON_ASCII.search(lossy):
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            pass
        else:
            return DecodedText(text, "cp1252", [f"{where}; decoded as Windows-1252 instead"])
    replaced = lossy.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    return DecodedText(
        lossy,
        "utf-8",
        [f"{where}; {replaced} undecodable byte sequence(s) replaced with U+FFFD"],
    )


# UTF-32 first: its little-endian mark starts with UTF-16's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text(path: Path, declared: Callable[[bytes], str | None] | None = None) -> DecodedText:
    """Read, reject binaries, and decode: ``decode_data`` on the file's bytes."""
    return decode_data(read_bytes(path), path, declared)


def decode_data(
    data: bytes,
    path: Path,
    declared: Callable[[bytes], str | None] | None = None,
    max_chars: int | None = None,
) -> DecodedText:
    """Reject binaries and decode: the shared front half of the text-like loaders.

    UTF-16/32 files (what Windows Notepad calls "Unicode") are full of NUL bytes, so their byte
    order mark is checked before the binary test. ``declared`` finds an encoding the file names
    for itself (Python's ``# -*- coding: latin-1 -*-``). Text longer than ``max_chars`` is a
    ``TextLimitError`` (a UTF-8 file of more than four bytes per allowed character is refused before
    it is decoded).
    """
    if max_chars is not None and len(data) > 4 * max_chars + 4:
        check_text_limit(len(data) // 4, max_chars, path)
    decoded = None
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            try:
                decoded = DecodedText(data.decode(encoding), encoding)
            except UnicodeDecodeError as exc:
                decoded = DecodedText(
                    data.decode(encoding, errors="replace"),
                    encoding,
                    [f"{path}: invalid {encoding} at byte {exc.start}; bad sequences replaced with U+FFFD"],
                )
            break
    if decoded is None:
        check_not_binary(data, path)
        decoded = decode_text(data, path, declared(data) if declared else None)
    check_text_limit(len(decoded.text), max_chars, path)
    return decoded


MAX_TITLE = 200  # characters of a heading kept in a heading path


def short_title(text: str) -> str:
    """A heading as a path entry: whitespace collapsed, at most ``MAX_TITLE`` characters."""
    title = " ".join(text[: MAX_TITLE * 4].split())
    return title if len(title) <= MAX_TITLE else title[: MAX_TITLE - 3].rstrip() + "..."


class LineIndex:
    """Maps character offsets of a text to 1-based line numbers in O(log n).

    Lines end at ``\\n`` (so ``\\r\\n`` is one break); this matches what editors and ``grep -n`` show,
    unlike ``str.splitlines`` which also breaks on form feeds and Unicode separators.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]

    @property
    def line_count(self) -> int:
        return len(self.starts)

    def line_of(self, offset: int) -> int:
        return bisect_right(self.starts, offset)

    def line_start(self, line: int) -> int:
        """Offset of the first character of 1-based ``line``."""
        return self.starts[line - 1]

    def line_end(self, line: int) -> int:
        """Offset just past ``line``'s last character, its newline excluded."""
        if line < len(self.starts):
            end = self.starts[line] - 1
            if end > self.starts[line - 1] and self.text[end - 1] == "\r":
                end -= 1
            return end
        return len(self.text)

    def line(self, line: int) -> str:
        return self.text[self.line_start(line) : self.line_end(line)]


def trimmed_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Narrow ``[start, end)`` so it neither starts nor ends with whitespace (empty if all blank)."""
    piece = text[start:end]
    stripped_left = piece.lstrip()
    if not stripped_left:
        return start, start
    new_start = start + (len(piece) - len(stripped_left))
    new_end = end - (len(piece) - len(piece.rstrip()))
    return new_start, new_end


def text_unit(
    text: str,
    start: int,
    end: int,
    lines: LineIndex | None = None,
    *,
    kind: str,
    heading_path: list[str] | None = None,
    page: int | None = None,
) -> TextUnit | None:
    """A unit for ``text[start:end]`` trimmed of surrounding whitespace, or None when it is blank.

    The invariant every built-in loader keeps: ``unit.text == text[unit.char_start:unit.char_end]``.
    """
    start, end = trimmed_span(text, start, end)
    if start == end:
        return None
    unit = TextUnit(
        text=text[start:end],
        char_start=start,
        char_end=end,
        page=page,
        heading_path=list(heading_path or []),
        kind=kind,
    )
    if lines is not None:
        unit.start_line = lines.line_of(start)
        unit.end_line = lines.line_of(end - 1)
    return unit


def paragraph_units(
    text: str,
    start: int,
    end: int,
    lines: LineIndex | None,
    *,
    kind: str = "paragraph",
    heading_path: list[str] | None = None,
) -> list[TextUnit]:
    """Split ``text[start:end]`` into blank-line separated blocks, one unit each."""
    units: list[TextUnit] = []
    pos = start
    for sep in _BLANK_LINES.finditer(text, start, end):
        unit = text_unit(text, pos, sep.start(), lines, kind=kind, heading_path=heading_path)
        if unit is not None:
            units.append(unit)
        pos = sep.end()
    unit = text_unit(text, pos, end, lines, kind=kind, heading_path=heading_path)
    if unit is not None:
        units.append(unit)
    return units


# A newline followed by at least one line holding only whitespace: the end of a paragraph.
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def line_window_units(
    text: str,
    lines: LineIndex,
    first_line: int,
    last_line: int,
    *,
    window: int,
    kind: str,
    heading_path: list[str] | None = None,
) -> list[TextUnit]:
    """Units of at most ``window`` lines each, for text with no structure the loader can see."""
    units: list[TextUnit] = []
    for line in range(first_line, last_line + 1, window):
        stop = min(line + window - 1, last_line)
        unit = text_unit(
            text,
            lines.line_start(line),
            lines.line_end(stop),
            lines,
            kind=kind,
            heading_path=heading_path,
        )
        if unit is not None:
            units.append(unit)
    return units
