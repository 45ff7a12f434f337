"""Source code: one unit per top-level definition, so a retrieved piece is a whole function or class.

Python is parsed with ``ast``: each top-level ``def``/``class`` (decorators and the comment lines right
above it included) is a unit whose ``heading_path`` names it, and the module-level code between
definitions forms units of its own. Classes longer than ``SPLIT_CONTAINER_LINES`` are split into
their methods (``["class Store", "def add"]``); shorter ones stay whole, since a small class reads
best in one piece. A file that does not parse falls back to fixed line windows, with a warning.

Other languages use one regular expression per language family that recognises a definition
starting in column 0 (``func``, ``fn``, ``class``, ``function``, a C function header...); a long
class-like block (class, impl, namespace...) is split the same way at its members, recognised at the
indentation of the block's first indented line (``["public class Store", "public void add(Item i)"]``).
It is a heuristic, not a parser, but it needs nothing per language beyond a pattern or two. Runs
of one-line definitions (``const A = 1`` lines) are merged so they do not become dozens of tiny units. Offsets are exact:
``text[u.char_start:u.char_end] == u.text`` (surrounding whitespace left out); lines are 1-based.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from ..base import LoadedText, Loader, TextUnit
from ..hookspecs import hookimpl
from ._common import LineIndex, decode_data, line_window_units, text_unit

WINDOW_LINES = 60  # lines per unit when a file's structure cannot be seen
MAX_HEADER_LINE = 400  # longer lines are never taken as a definition start (and keep regexes linear)
MAX_LABEL = 100
SPLIT_CONTAINER_LINES = 40  # a class-like block longer than this is split into its members
MAX_NESTING = 2  # namespace > class > method, no deeper

# Definitions whose body holds members worth their own units.
_CONTAINER = re.compile(
    r"\b(?:class|interface|impl|trait|object|struct|enum|namespace|module|extension|protocol|record|"
    r"actor|mixin|defmodule|companion)\b"
)
# Statement keywords that look like "name(" but never start a member.
_NOT_A_NAME = r"(?!(?:if|for|foreach|while|switch|catch|return|else|do|try|throw|new|case|super|this|await|yield|typeof|delete|using|lock|synchronized|assert|sizeof)\b)"


@dataclass(frozen=True)
class Family:
    """How to see top-level definitions in one group of languages."""

    definition: re.Pattern[str]
    # Comment, attribute or decorator lines right above a definition belong to it.
    preamble: tuple[str, ...]
    # A line must not end with one of these to start a definition (C prototypes end with ";").
    not_ending: tuple[str, ...] = ()
    # Lines right above a definition that carry its return type (C's "static int" on its own line).
    type_line: re.Pattern[str] | None = None
    # A member definition inside a class-like block, matched after the block's indentation; None
    # when the family's containers are not split further.
    member: re.Pattern[str] | None = None


_C_LIKE_PREAMBLE = ("//", "/*", "*", "@", "[[")

_C_DEFINITION = re.compile(
    r"^(?:(?:struct|union|enum|class|namespace|template|typedef)\b"
    r"|(?!(?:if|else|for|while|switch|return|do|case|goto|using|sizeof)\b)"
    r"(?:[A-Za-z_][\w\s\*&:<>,~]*?[\s\*&])?[A-Za-z_~][\w:~]*\s*\()"
)
_C = Family(
    _C_DEFINITION,
    _C_LIKE_PREAMBLE,
    not_ending=(";",),
    type_line=re.compile(r"^[A-Za-z_][\w \t\*&:<>,]*$"),
    member=_C_DEFINITION,
)
_JVM_DEFINITION = (
    r"(?:(?:public|private|protected|internal|abstract|final|static|sealed|partial|open|data|"
    r"inline|value|annotation|case|implicit|lazy|override|suspend|fileprivate|indirect|unsafe|"
    r"async|export|extern|readonly)\s+)*"
    r"(?:class|interface|enum|record|struct|object|trait|fun|def|val|var|func|extension|"
    r"protocol|namespace|typealias|actor|mixin|void|given|delegate)\b"
)
_JVM_LIKE = Family(
    re.compile("^" + _JVM_DEFINITION),
    _C_LIKE_PREAMBLE + ("#[",),
    not_ending=(";",),
    # a nested type, or modifiers/annotations/types then "name(" (methods, constructors, init)
    member=re.compile(
        rf"^(?:{_JVM_DEFINITION}|{_NOT_A_NAME}(?:@\w+(?:\([^)]*\))?\s+)*"
        r"(?:[\w<>\[\],.?:]+\s+)*?[\w$]+\s*(?:<[^>]*>\s*)?\()"
    ),
)
_JS = Family(
    re.compile(
        r"^(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:abstract\s+)?(?:async\s+)?"
        r"(?:function\b|class\b|interface\b|type\s+\w|enum\b|namespace\b|module\b|const\b|let\b|var\b)"
        r"|^(?:module\.)?exports(?:\.\w+)?\s*="
    ),
    ("//", "/*", "*", "@"),
    member=re.compile(
        rf"^{_NOT_A_NAME}(?:(?:public|private|protected|static|readonly|async|get|set|override|abstract|"
        r"declare|accessor)\s+)*\*?#?[\w$]+\s*\??\s*(?:<[^>]*>)?\s*\("
        r"|^(?:(?:public|private|protected|static|readonly)\s+)*#?[\w$]+\s*(?::[^=]+)?=\s*(?:async\s+)?"
        r"(?:\([^)]*\)|[\w$]+)\s*(?::[^=]+)?=>"
    ),
)
_GO = Family(re.compile(r"^(?:func|type|var|const)\b"), ("//", "/*", "*"))
_RUST = Family(
    re.compile(
        r"^(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|const|unsafe|default)\s+)*(?:extern\s+\"[^\"]*\"\s+)?"
        r"(?:fn|struct|enum|trait|impl|mod|type|static|const|union|macro_rules!)\W"
    ),
    ("//", "/*", "*", "#[", "#!["),
    member=re.compile(
        r'^(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|const|unsafe|default|extern\s+"[^"]*")\s+)*fn\b'
    ),
)
_RUBY = Family(re.compile(r"^(?:def|class|module)\b"), ("#",), member=re.compile(r"^(?:def|class|module)\b"))
_PHP = Family(
    re.compile(r"^(?:(?:abstract|final|readonly)\s+)*(?:function|class|interface|trait|enum)\b"),
    ("//", "/*", "*", "#"),
    member=re.compile(r"^(?:(?:public|private|protected|static|abstract|final|readonly)\s+)*function\b"),
)
_SHELL = Family(re.compile(r"^(?:function\s+[\w:.-]+|[\w:.-]+\s*\(\s*\))"), ("#",))
_LUA = Family(re.compile(r"^(?:local\s+)?function\b"), ("--",))
_SQL = Family(
    re.compile(
        r"^(?:create|alter|drop|insert|update|delete|select|with|grant|revoke|comment\s+on)\b",
        re.IGNORECASE,
    ),
    ("--", "/*", "*"),
)
_R = Family(re.compile(r"^[\w.]+\s*(?:<-|=)\s*function\b"), ("#",))
_PERL = Family(re.compile(r"^(?:sub|package)\s"), ("#",))
_JULIA = Family(
    re.compile(r"^(?:function|struct|mutable\s+struct|abstract\s+type|module|macro|const)\b"), ("#",)
)
_ELIXIR = Family(
    re.compile(r"^(?:defmodule|defprotocol|defimpl)\b"),
    ("#", "@"),
    member=re.compile(r"^(?:defp?|defmacrop?|defguardp?|defstruct|defmodule|defimpl|defdelegate)\b"),
)

FAMILIES: dict[str, Family] = {
    **dict.fromkeys((".c", ".h", ".cpp", ".hpp", ".cc", ".hh", ".cxx", ".hxx", ".ino", ".m"), _C),
    **dict.fromkeys(
        (".java", ".kt", ".kts", ".scala", ".sc", ".swift", ".cs", ".dart", ".groovy"), _JVM_LIKE
    ),
    **dict.fromkeys((".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".cts"), _JS),
    ".go": _GO,
    ".rs": _RUST,
    **dict.fromkeys((".rb", ".rake"), _RUBY),
    ".php": _PHP,
    **dict.fromkeys((".sh", ".bash", ".zsh", ".ksh"), _SHELL),
    ".lua": _LUA,
    ".sql": _SQL,
    ".r": _R,
    **dict.fromkeys((".pl", ".pm"), _PERL),
    ".jl": _JULIA,
    **dict.fromkeys((".ex", ".exs"), _ELIXIR),
}
PYTHON_EXTENSIONS = (".py", ".pyi", ".pyw")


class CodeLoader(Loader):
    name = "code"
    version = "1"
    extensions = PYTHON_EXTENSIONS + tuple(FAMILIES)

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        suffix = Path(path).suffix.lower()
        declared = _python_coding if suffix in PYTHON_EXTENSIONS else None
        decoded = decode_data(data, path, declared, max_chars=max_chars)
        text = decoded.text
        warnings = list(decoded.warnings)
        if not text.strip():
            return LoadedText([], warnings)
        lines = LineIndex(text)
        if suffix in PYTHON_EXTENSIONS:
            units = _python_units(text, lines, path, warnings)
        elif suffix in FAMILIES:
            units = _merge_one_liners(text, _family_units(text, lines, FAMILIES[suffix]))
        else:
            units = line_window_units(text, lines, 1, lines.line_count, window=WINDOW_LINES, kind="code")
        return LoadedText(units, warnings)


# --- Python -------------------------------------------------------------------------------------

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _python_coding(data: bytes) -> str | None:
    """The encoding a Python file declares in a PEP 263 coding line, if any (else None)."""
    head = data[:2048].splitlines()[:2]
    for line in head:
        match = _CODING.match(line)
        if match:
            return match.group(1).decode("ascii")
    return None


_CODING = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")


def _python_units(text: str, lines: LineIndex, path: Path, warnings: list[str]) -> list[TextUnit]:
    try:
        if re.search(r"\r(?!\n)", text):
            # Python counts a lone CR as a line break and editors mostly do not; the line numbers
            # would disagree, so such (very old Mac) files get plain windows.
            raise SyntaxError("lone carriage returns used as line breaks")
        tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        warnings.append(
            f"{path}: Python could not parse it ({reason}{where}); split into {WINDOW_LINES}-line windows"
        )
        return line_window_units(text, lines, 1, lines.line_count, window=WINDOW_LINES, kind="code")
    units: list[TextUnit] = []
    _split_python_block(tree.body, 1, lines.line_count, [], text, lines, units)
    return units


def _python_label(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    if isinstance(node, ast.AsyncFunctionDef):
        return f"async def {node.name}"
    return f"def {node.name}"  # type: ignore[attr-defined]


def _with_comments_above(lines: LineIndex, start: int, floor: int) -> int:
    """Move ``start`` up over the ``#`` comment lines directly above it, not past ``floor``."""
    while start - 1 >= floor and lines.line(start - 1).lstrip().startswith("#"):
        start -= 1
    return start


def _split_python_block(
    body: list[ast.stmt],
    first: int,
    last: int,
    path: list[str],
    text: str,
    lines: LineIndex,
    out: list[TextUnit],
) -> None:
    """Emit units for the lines ``first..last`` holding ``body``: definitions and the code between."""

    def emit(start: int, stop: int, heading: list[str]) -> None:
        if start > stop:
            return
        unit = text_unit(
            text, lines.line_start(start), lines.line_end(stop), lines, kind="code", heading_path=heading
        )
        if unit is not None:
            out.append(unit)

    cursor = first
    for node in body:
        if not isinstance(node, _DEFINITIONS):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        start = _with_comments_above(lines, start, cursor)
        end = node.end_lineno or node.lineno
        emit(cursor, start - 1, path)
        label = [*path, _python_label(node)]
        if (
            isinstance(node, ast.ClassDef)
            and end - start + 1 > SPLIT_CONTAINER_LINES
            and any(isinstance(n, _DEFINITIONS) for n in node.body)
        ):
            _split_python_block(node.body, start, end, label, text, lines, out)
        else:
            emit(start, end, label)
        cursor = end + 1
    emit(cursor, last, path)


# --- Other languages ----------------------------------------------------------------------------


@dataclass
class _Segment:
    first: int  # first line, comments and attributes above the definition included
    last: int
    label: str  # "" for the code between definitions
    header: int  # the line the definition starts on


def _is_definition(line: str, indent: str, pattern: re.Pattern[str], not_ending: tuple[str, ...]) -> bool:
    if len(line) > MAX_HEADER_LINE or not line.startswith(indent):
        return False
    body = line[len(indent) :]
    if not body or body[0].isspace():
        return False
    if not_ending and line.rstrip().endswith(not_ending):
        return False
    return pattern.match(body) is not None


def _belongs_below(line: str, family: Family) -> bool:
    """Whether ``line``, right above a definition, is part of it (a comment, attribute, return type)."""
    if line.lstrip().startswith(family.preamble):
        return True
    return (
        family.type_line is not None and len(line) <= MAX_HEADER_LINE and bool(family.type_line.match(line))
    )


def _label(line: str) -> str:
    label = line.strip().rstrip("{").rstrip()
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 3] + "..."


def _label_at(lines: LineIndex, header: int, last: int) -> str:
    """The label of the definition starting on line ``header``.

    A C++ ``template<...>`` line says nothing about what is defined, so the label skips the
    template parameters (which may run over several lines) and names what follows them.
    """
    line = lines.line(header)
    if not line.lstrip().startswith("template"):
        return _label(line)
    joined = " ".join(lines.line(n).strip() for n in range(header, min(header + 6, last + 1)))
    depth = 0
    for index, char in enumerate(joined):
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
            if depth == 0:
                rest = joined[index + 1 :].split("{")[0].strip()
                return _label(rest) if rest else _label(line)
    return _label(line)


def _segments(
    lines: LineIndex,
    first: int,
    last: int,
    indent: str,
    pattern: re.Pattern[str],
    not_ending: tuple[str, ...],
    family: Family,
) -> list[_Segment]:
    """Cut lines ``first..last`` where a definition starts at exactly ``indent``; [] if none does."""
    starts: list[_Segment] = []
    previous = first - 1
    in_template_head = False  # after a C++ "template<...>" line, until its declaration opens
    for number in range(first, last + 1):
        line = lines.line(number)
        if in_template_head:
            in_template_head = "{" not in line and ";" not in line and number - previous < 8
            continue
        if not _is_definition(line, indent, pattern, not_ending):
            continue
        in_template_head = line.lstrip().startswith("template") and "{" not in line and ";" not in line
        start = number
        while start - 1 > previous and _belongs_below(lines.line(start - 1), family):
            start -= 1
        starts.append(_Segment(start, last, _label_at(lines, number, last), number))
        previous = number
    if not starts:
        return []
    if starts[0].first > first:
        starts.insert(0, _Segment(first, last, "", first))
    for segment, following in zip(starts, starts[1:]):
        segment.last = following.first - 1
    return starts


def _body_indent(lines: LineIndex, header: int, last: int) -> str:
    """The indentation of the first indented line after a definition's first line ("" if none)."""
    for number in range(header + 1, last + 1):
        line = lines.line(number)
        if line.strip() and len(line) <= MAX_HEADER_LINE:
            indent = line[: len(line) - len(line.lstrip())]
            if indent:
                return indent
    return ""


def _family_units(text: str, lines: LineIndex, family: Family) -> list[TextUnit]:
    top = _segments(lines, 1, lines.line_count, "", family.definition, family.not_ending, family)
    if not top:
        return line_window_units(text, lines, 1, lines.line_count, window=WINDOW_LINES, kind="code")
    units: list[TextUnit] = []

    def emit(segment: _Segment, path: list[str], depth: int) -> None:
        heading = [*path, segment.label] if segment.label else path
        if (
            family.member is not None
            and segment.label
            and depth < MAX_NESTING
            and segment.last - segment.first + 1 > SPLIT_CONTAINER_LINES
            and _CONTAINER.search(segment.label)
        ):
            indent = _body_indent(lines, segment.header, segment.last)
            members = (
                _segments(lines, segment.first, segment.last, indent, family.member, (";",), family)
                if indent
                else []
            )
            if members:
                for member in members:
                    emit(member, heading, depth + 1)
                return
        unit = text_unit(
            text,
            lines.line_start(segment.first),
            lines.line_end(segment.last),
            lines,
            kind="code",
            heading_path=heading,
        )
        if unit is not None:
            units.append(unit)

    for segment in top:
        emit(segment, [], 0)
    return units


def _merge_one_liners(text: str, units: list[TextUnit]) -> list[TextUnit]:
    """Fold a one-line unit into the unit before it when that one is one line too, or is the
    unlabelled code of the same scope (imports before ``const A = 1`` lines, fields of a class)."""
    merged: list[TextUnit] = []
    for unit in units:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and unit.start_line == unit.end_line
            and (previous.start_line == previous.end_line or previous.heading_path == unit.heading_path[:-1])
        ):
            common: list[str] = []
            for mine, theirs in zip(previous.heading_path, unit.heading_path):
                if mine != theirs:
                    break
                common.append(mine)
            merged[-1] = TextUnit(
                text=text[previous.char_start : unit.char_end],
                char_start=previous.char_start,
                char_end=unit.char_end,
                start_line=previous.start_line,
                end_line=unit.end_line,
                heading_path=common,
                kind="code",
            )
        else:
            merged.append(unit)
    return merged


@hookimpl
def register_loaders(register) -> None:
    register(CodeLoader())
