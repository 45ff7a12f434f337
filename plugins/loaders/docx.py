"""Word documents (.docx): one unit per heading section, tables included, in document order.

A paragraph styled "Heading 1".."Heading 9" (or a style based on one, or "Title") starts a section;
``heading_path`` is the stack of enclosing headings. Paragraphs are lines of the section; a table
becomes one line per row with cells joined by `` | `` (merged cells once). Headers, footers,
comments and footnotes are left out: they repeat on every page or are not the body's text.

The body is read as a stream (``lxml.etree.iterparse`` straight out of the zip, each paragraph and
table dropped once read) and reading stops as soon as the text passes ``max_chars``: a few
megabytes of DOCX can unpack into a gigabyte of tiny paragraphs, which a whole-tree parser turns
into tens of gigabytes of memory. A body that unpacks to more than ``MAX_RATIO`` times its packed
size and over ``BOMB_BYTES`` is refused before it is read, as a zip bomb; one block of the body (a
paragraph, a table, a content control) that unpacks to more than ``MAX_BLOCK_BYTES`` of XML is
refused while it is read, since it is held whole until it ends (a bomb that stays under the ratio,
or hides its bulk below the body's top level, stops there).

Offsets index the extracted text: the sections joined by blank lines, each section its heading and
paragraphs joined by newlines; ``text[u.char_start:u.char_end] == u.text``. DOCX has no stable line
or page numbers, so ``start_line`` and ``page`` are not set.
"""

from __future__ import annotations

import io
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..base import LoadedText, Loader, LoaderError, TextUnit, check_text_limit
from ..hookspecs import hookimpl
from ._common import short_title

W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
REL = "{http://schemas.openxmlformats.org/package/2006/relationships}"
OFFICE_DOCUMENT = "http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"
STYLES = "http://schemas.openxmlformats.org/officeDocument/2006/relationships/styles"
_HEADING_STYLE = re.compile(r"^heading\s*(\d)$", re.IGNORECASE)
MAX_STYLE_DEPTH = 10
MAX_RATIO = 100  # unpacked / packed size of the body beyond which a big body is a zip bomb
BOMB_BYTES = 64 * 2**20
MAX_PART_BYTES = 16 * 2**20  # the package's small parts (relationships, styles)
MAX_BLOCK_BYTES = 32 * 2**20  # XML of one top-level block of the body, held in memory until it ends
_RUN_TEXT = {f"{W}tab": "\t", f"{W}ptab": "\t", f"{W}cr": "\n", f"{W}noBreakHyphen": "-"}


@dataclass
class _Section:
    level: float  # 0: before the first heading; "Title" counts as 0.5 so Heading 1 nests in it
    title: str
    lines: list[str] = field(default_factory=list)


class _Styles:
    """Paragraph style ids to outline levels, following each style's base styles."""

    def __init__(self, xml: bytes | None) -> None:
        self.names: dict[str, str] = {}
        self.based_on: dict[str, str] = {}
        if xml:
            from lxml import etree

            root = etree.fromstring(xml, parser=_parser())
            for style in root.iter(f"{W}style"):
                style_id = style.get(f"{W}styleId") or ""
                name = style.find(f"{W}name")
                base = style.find(f"{W}basedOn")
                self.names[style_id] = (name.get(f"{W}val") if name is not None else None) or style_id
                if base is not None and base.get(f"{W}val"):
                    self.based_on[style_id] = base.get(f"{W}val")

    def level(self, style_id: str | None) -> float | None:
        for _ in range(MAX_STYLE_DEPTH):
            if not style_id:
                return None
            name = self.names.get(style_id, style_id).strip()
            if name.lower() == "title":
                return 0.5
            match = _HEADING_STYLE.match(name)
            if match:
                return float(match.group(1))
            style_id = self.based_on.get(style_id)
        return None


def _parser():
    from lxml import etree

    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _run_text(run) -> str:
    parts = []
    for child in run:
        if child.tag == f"{W}t":
            parts.append(child.text or "")
        elif child.tag == f"{W}br":
            parts.append("\n" if child.get(f"{W}type", "textWrapping") == "textWrapping" else "")
        else:
            parts.append(_RUN_TEXT.get(child.tag, ""))
    return "".join(parts)


def _paragraph_text(paragraph) -> str:
    """What python-docx calls ``paragraph.text``: its runs and hyperlinked runs."""
    parts = []
    for child in paragraph:
        if child.tag == f"{W}r":
            parts.append(_run_text(child))
        elif child.tag == f"{W}hyperlink":
            parts.extend(_run_text(run) for run in child.iterchildren(f"{W}r"))
    return "".join(parts)


def _paragraph_style(paragraph) -> str | None:
    style = paragraph.find(f"{W}pPr/{W}pStyle")
    return style.get(f"{W}val") if style is not None else None


def _int(element, default: int) -> int:
    try:
        return int(element.get(f"{W}val")) if element is not None else default
    except (TypeError, ValueError):
        return default


def _table_lines(table) -> list[str]:
    """One line per row, cells joined by `` | ``; a merged cell once per row, a vertically merged
    one repeated in each row it spans (as python-docx reads them)."""
    lines: list[str] = []
    above: dict[int, str] = {}  # grid column -> text of the cell there in the previous row
    for row in table.iterchildren(f"{W}tr"):
        column = _int(row.find(f"{W}trPr/{W}gridBefore"), 0)
        cells: list[str] = []
        current: dict[int, str] = {}
        for cell in row.iterchildren(f"{W}tc"):
            span = max(1, _int(cell.find(f"{W}tcPr/{W}gridSpan"), 1))
            merge = cell.find(f"{W}tcPr/{W}vMerge")
            if merge is not None and merge.get(f"{W}val", "continue") == "continue":
                text = above.get(column, "")
            else:
                text = " ".join("\n".join(_paragraph_text(p) for p in cell.iterchildren(f"{W}p")).split())
            for offset in range(span):
                current[column + offset] = text
            column += span
            if text:
                cells.append(text)
        above = current
        if cells:
            lines.append(" | ".join(cells))
    return lines


class _Package:
    """The zip parts of a .docx: where its body and styles are, and bounded reads of small parts."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(io.BytesIO(data))
        self.body = self._target("_rels/.rels", OFFICE_DOCUMENT) or "word/document.xml"
        if self.body not in self.zip.namelist():
            raise LoaderError(f"corrupt or unreadable DOCX (not a Word .docx package): {path}")
        folder, name = posixpath.split(self.body)
        self.styles = self._target(posixpath.join(folder, "_rels", name + ".rels"), STYLES, folder)

    def small_part(self, name: str | None) -> bytes | None:
        if not name or name not in self.zip.namelist():
            return None
        if self.zip.getinfo(name).file_size > MAX_PART_BYTES:
            raise LoaderError(f"corrupt or unreadable DOCX: {self.path}: part {name} is implausibly large")
        return self.zip.read(name)

    def _target(self, rels: str, kind: str, folder: str = "") -> str | None:
        xml = self.small_part(rels)
        if xml is None:
            return None
        from lxml import etree

        for rel in etree.fromstring(xml, parser=_parser()).iter(f"{REL}Relationship"):
            if rel.get("Type") == kind and rel.get("TargetMode") != "External":
                target = rel.get("Target") or ""
                return posixpath.normpath(target.lstrip("/") if target.startswith("/") else
                                          posixpath.join(folder, target))  # fmt: skip
        return None

    def check_body_size(self) -> None:
        info = self.zip.getinfo(self.body)
        if info.file_size > BOMB_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise LoaderError(
                f"{self.path}: refused as a zip bomb: its body unpacks from {info.compress_size / 2**20:.1f} MB "
                f"to {info.file_size / 2**20:.0f} MB (over {MAX_RATIO} times)"
            )


class _BlockBound:
    """The body's XML stream, refusing to go on once one top-level block passes ``MAX_BLOCK_BYTES``
    (the parser keeps a block whole until its end tag, so that is what bounds its memory)."""

    def __init__(self, raw, path: Path) -> None:
        self.raw, self.path, self.read_bytes, self.mark = raw, path, 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.read_bytes += len(data)
        if self.read_bytes - self.mark > MAX_BLOCK_BYTES:
            raise LoaderError(
                f"{self.path}: refused as a zip bomb: one block of its body (a paragraph, table or content "
                f"control) unpacks to over {MAX_BLOCK_BYTES // 2**20} MB of XML"
            )
        return data

    def block_done(self) -> None:
        self.mark = self.read_bytes


def _body_blocks(package: _Package) -> Iterator[tuple[str, object]]:
    """("p", paragraph) and ("tbl", table) for each block directly in the body, in order; each is
    dropped from memory once the caller has read it."""
    from lxml import etree

    with package.zip.open(package.body) as raw:
        stream = _BlockBound(raw, package.path)
        for _, element in etree.iterparse(
            stream, events=("end",), tag=(f"{W}p", f"{W}tbl"), resolve_entities=False, no_network=True
        ):
            parent = element.getparent()
            if parent is None or parent.tag != f"{W}body":
                continue
            stream.block_done()
            yield ("p" if element.tag == f"{W}p" else "tbl"), element
            element.clear()
            while element.getprevious() is not None:
                del parent[0]


def _read_sections(package: _Package, styles: _Styles, max_chars: int | None) -> list[_Section]:
    """The body in document order, split where a heading paragraph starts a new section."""
    sections = [_Section(0, "")]
    chars = 0
    for kind, block in _body_blocks(package):
        if kind == "tbl":
            lines = _table_lines(block)
            sections[-1].lines.extend(lines)
            chars += sum(len(line) + 1 for line in lines)
        else:
            text = _paragraph_text(block).strip()
            if not text:
                continue
            level = styles.level(_paragraph_style(block))
            if level is None:
                sections[-1].lines.append(text)
            else:
                sections.append(_Section(level, " ".join(text.split())))
            chars += len(text) + 1
        check_text_limit(chars, max_chars, package.path)
    return sections


def _units(sections: list[_Section]) -> list[TextUnit]:
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
    return units


class DocxLoader(Loader):
    name = "docx"
    version = "2"
    extensions = (".docx",)
    one_format = True

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        if not data:
            return LoadedText([])
        from lxml import etree

        try:
            package = _Package(data, path)
            package.check_body_size()
            sections = _read_sections(package, _Styles(package.small_part(package.styles)), max_chars)
        except LoaderError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise LoaderError(f"corrupt or unreadable DOCX (not a Word .docx package): {path}") from exc
        except (etree.XMLSyntaxError, KeyError, OSError, EOFError, RuntimeError, ValueError, zlib.error,
                NotImplementedError) as exc:  # fmt: skip
            raise LoaderError(f"corrupt or unreadable DOCX: {path}: {exc or type(exc).__name__}") from exc
        return LoadedText(_units(sections))


@hookimpl
def register_loaders(register) -> None:
    register(DocxLoader())
