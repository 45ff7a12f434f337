"""PDF files: one unit per page, so every answer can cite the page a reader can open.

Text comes from pypdf. When the PDF has an outline (bookmarks), each page's ``heading_path`` is the
outline entry in force on that page with its parents (``["2 Methods", "2.1 Data"]``).

Failures are ``LoaderError``s a user can act on: a damaged file says "corrupt or unreadable PDF", an
encrypted one that does not open with the empty password asks for the password to be removed, and
a PDF with no extractable text on any page (scanned images) is an error too, rather than zero
units, because an index that silently holds nothing from a 300-page scan is worse than a message
saying "run OCR on it first". Pages that fail or are empty while others have text produce warnings.

Offsets index the extracted text: the texts of the pages that have text, joined by blank lines;
``text[u.char_start:u.char_end] == u.text`` (each page's text stripped). ``start_line`` is not set.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

from ..base import LoadedText, Loader, LoaderError, TextUnit, check_text_limit
from ..hookspecs import hookimpl
from ._common import short_title

log = logging.getLogger(__name__)

MAX_OUTLINE_DEPTH = 16


class _PypdfLog(logging.Handler):
    """Collects what pypdf logs while this thread reads a PDF ("EOF marker not found", "incorrect
    startxref"...) so it becomes the document's note instead of a stray line on the console."""

    _lock = threading.Lock()
    _active = 0

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []
        self.addFilter(lambda record: record.thread == self.thread)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())

    def __enter__(self) -> _PypdfLog:
        logger = logging.getLogger("pypdf")
        with _PypdfLog._lock:
            logger.addHandler(self)
            _PypdfLog._active += 1
            logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("pypdf")
        with _PypdfLog._lock:
            logger.removeHandler(self)
            _PypdfLog._active -= 1
            if not _PypdfLog._active:
                logger.propagate = True


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _open(data: bytes, path: Path):
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except (FileNotDecryptedError, DependencyError, NotImplementedError) as exc:
                raise LoaderError(
                    f"encrypted PDF that cannot be opened: {path}: {exc}; save a copy without a password"
                ) from exc
            if not opened:
                raise LoaderError(
                    f"encrypted PDF needs a password: {path}; save a copy without a password to index it"
                )
        pages = reader.pages
        page_count = len(pages)
    except LoaderError:
        raise
    except FileNotDecryptedError as exc:
        raise LoaderError(
            f"encrypted PDF needs a password: {path}; save a copy without a password to index it"
        ) from exc
    except Exception as exc:  # pypdf raises many kinds on damaged files; all mean the same to a user
        raise LoaderError(f"corrupt or unreadable PDF: {path}: {_reason(exc)}") from exc
    if page_count == 0:
        raise LoaderError(f"corrupt or unreadable PDF: {path}: no pages found")
    return reader, page_count


def _outline_paths(reader, page_count: int) -> list[list[str]]:
    """For each page, the outline titles in force on it; empty lists when there is no outline."""
    marks: list[tuple[int, int, str]] = []  # (page index, depth, title) in outline order

    def walk(items, depth: int) -> None:
        if depth > MAX_OUTLINE_DEPTH:
            return
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
                continue
            page = reader.get_destination_page_number(item)
            title = short_title(str(getattr(item, "title", "") or ""))
            if page is not None and 0 <= page < page_count and title:
                marks.append((page, depth, title))

    try:
        walk(reader.outline, 0)
    except Exception as exc:  # a broken outline must not cost the text
        log.debug("ignoring unreadable PDF outline: %s", exc)
        return [[] for _ in range(page_count)]
    marks.sort(key=lambda mark: mark[0])  # stable: outline order is kept within a page
    paths: list[list[str]] = []
    stack: list[str] = []
    next_mark = 0
    for page in range(page_count):
        while next_mark < len(marks) and marks[next_mark][0] <= page:
            _, depth, title = marks[next_mark]
            stack = stack[:depth] + [title]
            next_mark += 1
        paths.append(list(stack))
    return paths


class PdfLoader(Loader):
    name = "pdf"
    version = "1"
    extensions = (".pdf",)
    one_format = True

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        if not data:
            return LoadedText([])
        with _PypdfLog() as notes:
            try:
                units, warnings = self._pages(path, data, max_chars)
            except LoaderError as exc:
                if not notes.messages:
                    raise
                said = "; ".join(dict.fromkeys(notes.messages))
                raise type(exc)(f"{exc} (pypdf: {said})") from exc
        warnings.extend(f"{path}: pypdf: {note}" for note in dict.fromkeys(notes.messages))
        return LoadedText(units, warnings)

    def _pages(self, path: Path, data: bytes, max_chars: int | None) -> tuple[list[TextUnit], list[str]]:
        reader, page_count = _open(data, path)
        paths = _outline_paths(reader, page_count)
        warnings: list[str] = []
        units: list[TextUnit] = []
        empty_pages: list[int] = []
        offset = 0
        for index in range(page_count):
            try:
                text = (reader.pages[index].extract_text() or "").strip()
            except Exception as exc:  # one bad page should not lose the other pages
                warnings.append(f"{path}: page {index + 1}: text extraction failed: {_reason(exc)}")
                continue
            if not text:
                empty_pages.append(index + 1)
                continue
            if units:
                offset += 2  # the blank line joining pages
            units.append(
                TextUnit(
                    text=text,
                    char_start=offset,
                    char_end=offset + len(text),
                    page=index + 1,
                    heading_path=paths[index],
                    kind="page",
                )
            )
            offset += len(text)
            check_text_limit(offset, max_chars, path)
        if not units:
            if warnings:
                raise LoaderError(f"corrupt or unreadable PDF: {path}: no page could be read ({warnings[0]})")
            raise LoaderError(
                f"no extractable text in PDF: {path} ({page_count} page(s), probably scanned images); "
                "run OCR on it (e.g. ocrmypdf) and index the result"
            )
        if empty_pages:
            shown = ", ".join(map(str, empty_pages[:20])) + (" ..." if len(empty_pages) > 20 else "")
            warnings.append(f"{path}: no extractable text on page(s) {shown} (images or blank)")
        return units, warnings


@hookimpl
def register_loaders(register) -> None:
    register(PdfLoader())
