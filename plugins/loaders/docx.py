"""Word documents (.docx): one unit per heading section, tables included, in document order.

A paragraph styled "Heading 1".."Heading 9" (or a style based on one, or "Title") starts a section;
``heading_path`` is the stack of enclosing headings. Paragraphs are lines of the section; a table
becomes one line per row with cells joined by `` | `` (merged cells once). Headers, footers,
comments and footnotes are left out: they repeat on every page or are not the body's text.

Offsets index the extracted text: the sections joined by blank lines, each section its heading and
paragraphs joined by newlines; ``text[u.char_start:u.char_end] == u.text``. DOCX has no stable line
or page numbers, so ``start_line`` and ``page`` are not set.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..base import LoadedText, Loader, LoaderError, TextUnit
from ..hookspecs import hookimpl
from ._common import read_bytes, short_title

_HEADING_STYLE = re.compile(r"^heading\s*(\d)$", re.IGNORECASE)
MAX_STYLE_DEPTH = 10


@dataclass
class _Section:
    level: int  # 0: before the first heading; "Title" counts as level 0.5 so Heading 1 nests in it
    title: str
    lines: list[str] = field(default_factory=list)


def _heading_level(paragraph) -> float | None:
    """The outline level of a heading paragraph, following the style's base styles; else None."""
    style = paragraph.style
    for _ in range(MAX_STYLE_DEPTH):
        if style is None:
            return None
        name = (style.name or "").strip()
        if name.lower() == "title":
            return 0.5
        match = _HEADING_STYLE.match(name)
        if match:
            return float(match.group(1))
        style = getattr(style, "base_style", None)
    return None


def _table_lines(table) -> list[str]:
    lines: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            if id(cell._tc) in seen:  # a merged cell is returned once per grid column it spans
                continue
            seen.add(id(cell._tc))
            text = " ".join(cell.text.split())
            if text:
                cells.append(text)
        if cells:
            lines.append(" | ".join(cells))
    return lines


def _read_sections(document) -> list[_Section]:
    """The body in document order, split where a heading paragraph starts a new section."""
    from docx.table import Table

    sections = [_Section(0, "")]
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            sections[-1].lines.extend(_table_lines(block))
            continue
        text = block.text.strip()
        if not text:
            continue
        level = _heading_level(block)
        if level is None:
            sections[-1].lines.append(text)
        else:
            sections.append(_Section(level, " ".join(text.split())))
    return sections


class DocxLoader(Loader):
    name = "docx"
    reads_through_read_bytes = True
    version = "1"
    extensions = (".docx",)

    def load(self, path: Path) -> LoadedText:
        data = read_bytes(path)
        if not data:
            return LoadedText([])
        from docx import Document
        from docx.opc.exceptions import PackageNotFoundError

        try:
            sections = _read_sections(Document(io.BytesIO(data)))
        except (PackageNotFoundError, zipfile.BadZipFile) as exc:
            raise LoaderError(f"corrupt or unreadable DOCX (not a Word .docx package): {path}") from exc
        except Exception as exc:  # broken XML, missing parts...: all mean the same to a user
            raise LoaderError(f"corrupt or unreadable DOCX: {path}: {exc or type(exc).__name__}") from exc

        units: list[TextUnit] = []
        stack: list[_Section] = []
        offset = 0
        for section in sections:
            if section.level:
                while stack and stack[-1].level >= section.level:
                    stack.pop()
                stack.append(section)
            parts = ([section.title] if section.title else []) + section.lines
            if not parts:
                continue
            body = "\n".join(parts)
            if units:
                offset += 2  # the blank line joining sections
            units.append(
                TextUnit(
                    text=body,
                    char_start=offset,
                    char_end=offset + len(body),
                    heading_path=[short_title(s.title) for s in stack] if section.level else [],
                    kind="section",
                )
            )
            offset += len(body)
        return LoadedText(units)


@hookimpl
def register_loaders(register) -> None:
    register(DocxLoader())
