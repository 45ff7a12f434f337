"""HTML pages: the readable text, one unit per heading section, without markup or page furniture.

Scripts, styles, navigation, footers, forms, hidden elements and the ``<head>`` are dropped; when the
page has a ``<main>`` (or exactly one ``<article>``) only that is read, which is where the content of a
saved web page or generated documentation lives. Block elements (paragraphs, list items, table
rows, ``<pre>``) become lines of their own, table cells are joined with `` | ``, other whitespace is
collapsed. Each ``<h1>``..``<h6>`` starts a section; ``heading_path`` is the stack of enclosing headings.

Offsets index the *extracted* text: the sections joined by blank lines, each section its heading and
blocks joined by blank lines; ``text[u.char_start:u.char_end] == u.text``. ``start_line``/``end_line``
are lines of the HTML source the section came from, as the parser reports them (approximate where a
tag spans several lines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import LoadedText, Loader, LoaderError, TextUnit, check_text_limit
from ..hookspecs import hookimpl
from ._common import check_not_binary, short_title

HTML_BYTES_PER_CHAR = 4  # markup allowed per character of text before a page is refused unparsed

if TYPE_CHECKING:  # bs4 is imported when a page is read, not when plugins load (the CLI starts faster)
    from bs4 import BeautifulSoup, Tag

SKIP_TAGS = frozenset(
    {
        "head",
        "script",
        "style",
        "noscript",
        "template",
        "nav",
        "footer",
        "aside",
        "form",
        "button",
        "select",
        "svg",
        "canvas",
        "iframe",
        "object",
        "embed",
        "map",
        "dialog",
    }
)
SKIP_ROLES = frozenset({"navigation", "contentinfo", "search", "banner", "complementary"})
HEADINGS = {f"h{n}": n for n in range(1, 7)}
BLOCK_TAGS = frozenset(
    {
        "html",
        "body",
        "main",
        "article",
        "section",
        "header",
        "div",
        "p",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "blockquote",
        "table",
        "caption",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "figure",
        "figcaption",
        "address",
        "details",
        "summary",
        "hr",
        "fieldset",
        "legend",
        "center",
    }
)
CELL_TAGS = frozenset({"td", "th"})
PERMALINK_MARKS = frozenset({"", "#", "¶", "§", "🔗", "link"})
_SPACES = re.compile(r"\s+")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)


@dataclass
class _Section:
    level: int  # 0 for the text before the first heading
    title: str
    first_line: int | None = None
    last_line: int | None = None
    blocks: list[str] = field(default_factory=list)

    def saw_line(self, line: int | None) -> None:
        if line is None:
            return
        self.first_line = line if self.first_line is None else min(self.first_line, line)
        self.last_line = line if self.last_line is None else max(self.last_line, line)


def _skipped(tag: Tag) -> bool:
    if tag.name in SKIP_TAGS:
        return True
    attrs = tag.attrs or {}
    if "hidden" in attrs or str(attrs.get("aria-hidden", "")).lower() == "true":
        return True
    if str(attrs.get("role", "")).lower() in SKIP_ROLES:
        return True
    return bool(_HIDDEN_STYLE.search(str(attrs.get("style", ""))))


def _heading_title(heading: Tag) -> str:
    """The heading's words, without the permalink anchors (``#``, ``¶``) documentation generators add."""
    for anchor in heading.find_all("a", href=True):
        if str(anchor["href"]).startswith("#") and anchor.get_text(strip=True) in PERMALINK_MARKS:
            anchor.decompose()
    return _SPACES.sub(" ", heading.get_text(" ")).strip()


def _content_root(soup: BeautifulSoup) -> Tag:
    from bs4 import Tag

    main = soup.find("main")
    if isinstance(main, Tag):
        return main
    articles = soup.find_all("article")
    if len(articles) == 1:
        return articles[0]
    body = soup.find("body")
    return body if isinstance(body, Tag) else soup


class _Extractor:
    """Walks the tree without recursion (deeply nested pages would overflow Python's stack)."""

    def __init__(self) -> None:
        self.sections: list[_Section] = [_Section(0, "")]
        self.buffer: list[str] = []
        self.line = 1  # best guess of the source line being read
        self.block_line: int | None = None  # source lines of the first and last text of the block
        self.block_end_line: int | None = None

    def flush(self) -> None:
        block = _SPACES.sub(" ", "".join(self.buffer)).strip()
        self.buffer = []
        if block:
            section = self.sections[-1]
            section.blocks.append(block)
            section.saw_line(self.block_line)
            section.saw_line(self.block_end_line)
        self.block_line = None
        self.block_end_line = None

    def add_text(self, text: str) -> None:
        stripped = text.lstrip()
        if stripped:
            if self.block_line is None:
                self.block_line = self.line + text[: len(text) - len(stripped)].count("\n")
            self.block_end_line = self.line + text.rstrip().count("\n")
        self.buffer.append(text)
        self.line += text.count("\n")

    def run(self, root: Tag) -> list[_Section]:
        from bs4 import Comment, NavigableString, Tag
        from bs4.element import Declaration, Doctype, ProcessingInstruction

        stack: list[object] = [root]
        while stack:
            node = stack.pop()
            if node is _FLUSH:
                self.flush()
                continue
            if isinstance(node, (Comment, Doctype, Declaration, ProcessingInstruction)):
                continue
            if isinstance(node, NavigableString):
                self.add_text(str(node))
                continue
            if not isinstance(node, Tag) or _skipped(node):
                continue
            if node.sourceline is not None:
                self.line = node.sourceline
            name = node.name
            if name in HEADINGS:
                self.flush()
                title = _heading_title(node)
                if title:
                    section = _Section(HEADINGS[name], title)
                    section.saw_line(node.sourceline)
                    self.sections.append(section)
                continue
            if name == "pre":
                self.flush()
                text = node.get_text().strip("\n")
                if text.strip():
                    section = self.sections[-1]
                    section.blocks.append(text.rstrip())
                    if node.sourceline is not None:
                        section.saw_line(node.sourceline)
                        section.saw_line(node.sourceline + text.rstrip().count("\n"))
                continue
            if name == "br":
                self.buffer.append("\n")
                continue
            if name in CELL_TAGS and self.block_line is not None:  # a cell after text in this row
                self.buffer.append(" | ")
            block = name in BLOCK_TAGS
            if block:
                self.flush()
                stack.append(_FLUSH)
            stack.extend(reversed(list(node.children)))
        self.flush()
        return self.sections


_FLUSH = object()


def _heading_paths(sections: list[_Section]) -> list[list[str]]:
    paths: list[list[str]] = []
    stack: list[_Section] = []
    for section in sections:
        if section.level == 0:
            paths.append([])
            continue
        while stack and stack[-1].level >= section.level:
            stack.pop()
        stack.append(section)
        paths.append([short_title(s.title) for s in stack])
    return paths


class HtmlLoader(Loader):
    name = "html"
    version = "1"
    extensions = (".html", ".htm", ".xhtml", ".shtml")
    one_format = True

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        if max_chars is not None and len(data) > HTML_BYTES_PER_CHAR * max_chars:
            # the parse tree of a page costs many times its size; refuse before building it
            check_text_limit(len(data) // HTML_BYTES_PER_CHAR, max_chars, path)
        if not data.strip():
            return LoadedText([])
        check_not_binary(data, path)
        from bs4 import BeautifulSoup

        try:
            soup = BeautifulSoup(data, "html.parser")
        except Exception as exc:  # the parser is lenient; anything raised here is a real defect
            raise LoaderError(f"unreadable HTML: {path}: {exc}") from exc
        warnings: list[str] = []
        encoding = (soup.original_encoding or "utf-8").lower()
        if soup.contains_replacement_characters:
            warnings.append(f"{path}: some bytes could not be decoded as {encoding}; replaced with U+FFFD")
        elif not soup.declared_html_encoding and encoding not in ("utf-8", "ascii"):
            warnings.append(f"{path}: not UTF-8 and no charset declared; decoded as {encoding} (a guess)")

        sections = _Extractor().run(_content_root(soup))
        units: list[TextUnit] = []
        pieces: list[str] = []
        offset = 0
        for section, heading_path in zip(sections, _heading_paths(sections)):
            parts = ([section.title] if section.title else []) + section.blocks
            if not parts:
                continue
            body = "\n\n".join(parts)
            if pieces:
                offset += 2  # the blank line joining sections
            units.append(
                TextUnit(
                    text=body,
                    char_start=offset,
                    char_end=offset + len(body),
                    start_line=section.first_line,
                    end_line=section.last_line,
                    heading_path=heading_path,
                    kind="section",
                )
            )
            pieces.append(body)
            offset += len(body)
        return LoadedText(units, warnings)


def extracted_text(units: list[TextUnit]) -> str:
    """The text the offsets of ``HtmlLoader`` units index (their texts joined by blank lines)."""
    return "\n\n".join(u.text for u in units)


@hookimpl
def register_loaders(register) -> None:
    register(HtmlLoader())
