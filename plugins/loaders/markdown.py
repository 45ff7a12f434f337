"""Markdown: one unit per section, labelled with the headings that enclose it.

A section runs from a heading to the next heading of any level, so a unit never mixes two topics,
and ``heading_path`` (e.g. ``["Install", "On Windows"]``) tells the reader and the retriever where it
sits. ATX (``## Title``) and setext (``Title`` over ``===``/``---``) headings count; ``#`` lines inside
fenced code blocks do not. YAML (``---``) or TOML (``+++``) front matter becomes its own unit of
kind ``front_matter``. The text is kept as written, markup included, so offsets stay exact:
``text[u.char_start:u.char_end] == u.text`` (surrounding whitespace left out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..base import LoadedText, Loader, TextUnit
from ..hookspecs import hookimpl
from ._common import MAX_TITLE, LineIndex, decode_data, text_unit

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# Lines that open a block a setext underline cannot turn into a heading.
_NOT_PARAGRAPH = re.compile(r"^(?: {0,3}(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)| {0,3}>| {4,}|\t| {0,3}<)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"(\*+|__|`)")

_BLOCKED = -1  # inside a list item, quote or indented code: no setext heading can end here


@dataclass
class _Heading:
    first_line: int
    last_line: int  # differs from first_line for setext headings
    level: int
    title: str


def _plain_title(raw: str) -> str:
    """Heading text without link targets, code ticks or bold markers, for a readable path.

    Only the first ``MAX_TITLE`` characters count: a path entry is a label, and the link pattern
    would take quadratic time on a huge line full of brackets.
    """
    title = _EMPHASIS.sub("", _LINK.sub(r"\1", raw[: MAX_TITLE * 2])).strip()
    return title if len(title) <= MAX_TITLE else title[: MAX_TITLE - 3].rstrip() + "..."


def _front_matter_end(lines: LineIndex) -> int:
    """The last line of a leading front matter block, or 0 when the file has none."""
    opener = lines.line(1).rstrip()
    if opener not in ("---", "+++"):
        return 0
    closers = ("---", "...") if opener == "---" else ("+++",)
    for number in range(2, lines.line_count + 1):
        if lines.line(number).rstrip() in closers:
            return number
    return 0


def _find_headings(lines: LineIndex, first_line: int) -> list[_Heading]:
    headings: list[_Heading] = []
    fence: tuple[str, int] | None = None
    paragraph_start: int | None = None  # first line of the paragraph being read, for setext
    for number in range(first_line, lines.line_count + 1):
        line = lines.line(number)
        if fence is not None:
            match = _FENCE.match(line)
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= fence[1]:
                if not match.group(2).strip():
                    fence = None
            continue
        match = _FENCE.match(line)
        if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
            fence = (match.group(1)[0], len(match.group(1)))
            paragraph_start = None
            continue
        if not line.strip():
            paragraph_start = None
            continue
        match = _ATX.match(line)
        if match:
            headings.append(_Heading(number, number, len(match.group(1)), _plain_title(match.group(2) or "")))
            paragraph_start = None
            continue
        match = _SETEXT.match(line)
        if match and paragraph_start not in (None, _BLOCKED):
            title = " ".join(lines.line(n).strip() for n in range(paragraph_start, number))
            level = 1 if match.group(1)[0] == "=" else 2
            headings.append(_Heading(paragraph_start, number, level, _plain_title(title)))
            paragraph_start = None
            continue
        if paragraph_start is None:
            paragraph_start = _BLOCKED if _NOT_PARAGRAPH.match(line) else number
    return headings


class MarkdownLoader(Loader):
    name = "markdown"
    version = "1"
    extensions = (".md", ".markdown", ".mdx", ".mdown", ".mkd")
    one_format = True

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        decoded = decode_data(data, path, max_chars=max_chars)
        text = decoded.text
        if not text.strip():
            return LoadedText([], decoded.warnings)
        lines = LineIndex(text)
        units: list[TextUnit] = []

        body_first = 1
        front_matter_end = _front_matter_end(lines)
        if front_matter_end:
            unit = text_unit(
                text, 0, lines.line_end(front_matter_end), lines, kind="front_matter", heading_path=[]
            )
            if unit is not None:
                units.append(unit)
            body_first = front_matter_end + 1
        if body_first > lines.line_count:
            return LoadedText(units, decoded.warnings)

        headings = _find_headings(lines, body_first)
        first_heading_line = headings[0].first_line if headings else lines.line_count + 1
        if first_heading_line > body_first:  # text before the first heading
            unit = text_unit(
                text,
                lines.line_start(body_first),
                lines.line_end(first_heading_line - 1),
                lines,
                kind="section",
                heading_path=[],
            )
            if unit is not None:
                units.append(unit)

        stack: list[_Heading] = []
        for index, heading in enumerate(headings):
            while stack and stack[-1].level >= heading.level:
                stack.pop()
            stack.append(heading)
            last = headings[index + 1].first_line - 1 if index + 1 < len(headings) else lines.line_count
            unit = text_unit(
                text,
                lines.line_start(heading.first_line),
                lines.line_end(last),
                lines,
                kind="section",
                heading_path=[h.title for h in stack if h.title],
            )
            if unit is not None:
                units.append(unit)
        return LoadedText(units, decoded.warnings)


@hookimpl
def register_loaders(register) -> None:
    register(MarkdownLoader())
