"""Source code: one unit per top-level definition, so a retrieved piece is a whole function or class.

Python is parsed with ``ast``: each top-level ``def``/``class`` (decorators and the comment lines right
above it included) is a unit whose ``heading_path`` names it (``["class Store", "def add"]`` for a
method: classes are split into their methods), and the module-level code between definitions forms
units of its own. A file that does not parse falls back to fixed line windows, with a warning.

Other languages use one regular expression per language family that recognises a definition
starting in column 0 (``func``, ``fn``, ``class``, ``function``, a C function header...). That
misses nested definitions (a Java class's methods stay in one unit, which the chunker then splits),
but it never needs a parser per language. Runs of one-line definitions (``const A = 1`` lines) are
merged so they do not become dozens of tiny units. Offsets are exact:
``text[u.char_start:u.char_end] == u.text`` (surrounding whitespace left out); lines are 1-based.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from ..base import LoadedText, Loader, TextUnit
from ..hookspecs import hookimpl
from ._common import LineIndex, line_window_units, read_text, text_unit

WINDOW_LINES = 60  # lines per unit when a file's structure cannot be seen
MAX_HEADER_LINE = 400  # longer lines are never taken as a definition start (and keep regexes linear)
MAX_LABEL = 100


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


_C_LIKE_PREAMBLE = ("//", "/*", "*", "@", "[[")

_C = Family(
    re.compile(
        r"^(?:(?:struct|union|enum|class|namespace|template|typedef)\b"
        r"|(?!(?:if|else|for|while|switch|return|do|case|goto|using|sizeof)\b)"
        r"(?:[A-Za-z_][\w\s\*&:<>,~]*?[\s\*&])?[A-Za-z_~][\w:~]*\s*\()"
    ),
    _C_LIKE_PREAMBLE,
    not_ending=(";", ","),
    type_line=re.compile(r"^[A-Za-z_][\w \t\*&:<>,]*$"),
)
_JVM_LIKE = Family(
    re.compile(
        r"^(?:(?:public|private|protected|internal|abstract|final|static|sealed|partial|open|data|"
        r"inline|value|annotation|case|implicit|lazy|override|suspend|fileprivate|indirect|unsafe|"
        r"async|export|extern|readonly)\s+)*"
        r"(?:class|interface|enum|record|struct|object|trait|fun|def|val|var|func|extension|"
        r"protocol|namespace|typealias|actor|mixin|void|given|delegate)\b"
    ),
    _C_LIKE_PREAMBLE + ("#[",),
    not_ending=(";",),
)
_JS = Family(
    re.compile(
        r"^(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:abstract\s+)?(?:async\s+)?"
        r"(?:function\b|class\b|interface\b|type\s+\w|enum\b|namespace\b|module\b|const\b|let\b|var\b)"
        r"|^(?:module\.)?exports(?:\.\w+)?\s*="
    ),
    ("//", "/*", "*", "@"),
)
_GO = Family(re.compile(r"^(?:func|type|var|const)\b"), ("//", "/*", "*"))
_RUST = Family(
    re.compile(
        r"^(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|const|unsafe|default)\s+)*(?:extern\s+\"[^\"]*\"\s+)?"
        r"(?:fn|struct|enum|trait|impl|mod|type|static|const|union|macro_rules!)\W"
    ),
    ("//", "/*", "*", "#[", "#!["),
)
_RUBY = Family(re.compile(r"^(?:def|class|module)\b"), ("#",))
_PHP = Family(
    re.compile(r"^(?:(?:abstract|final|readonly)\s+)*(?:function|class|interface|trait|enum)\b"),
    ("//", "/*", "*", "#"),
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
_ELIXIR = Family(re.compile(r"^(?:defmodule|defprotocol|defimpl)\b"), ("#", "@"))

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

    def load(self, path: Path) -> LoadedText:
        suffix = Path(path).suffix.lower()
        decoded = read_text(path, _python_coding if suffix in PYTHON_EXTENSIONS else None)
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
        if isinstance(node, ast.ClassDef) and any(isinstance(n, _DEFINITIONS) for n in node.body):
            _split_python_block(node.body, start, end, label, text, lines, out)
        else:
            emit(start, end, label)
        cursor = end + 1
    emit(cursor, last, path)


# --- Other languages ----------------------------------------------------------------------------


def _is_definition(line: str, family: Family) -> bool:
    if not line or line[0].isspace() or len(line) > MAX_HEADER_LINE:
        return False
    if family.not_ending and line.rstrip().endswith(family.not_ending):
        return False
    return family.definition.match(line) is not None


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


def _family_units(text: str, lines: LineIndex, family: Family) -> list[TextUnit]:
    starts: list[tuple[int, str]] = []  # (first line of the unit, label)
    previous_start = 0
    for number in range(1, lines.line_count + 1):
        line = lines.line(number)
        if not _is_definition(line, family):
            continue
        start = number
        while start - 1 > previous_start and _belongs_below(lines.line(start - 1), family):
            start -= 1
        starts.append((start, _label(line)))
        previous_start = number
    if not starts:
        return line_window_units(text, lines, 1, lines.line_count, window=WINDOW_LINES, kind="code")

    units: list[TextUnit] = []
    bounds = [(1, "")] + starts if starts[0][0] > 1 else starts
    for index, (start, label) in enumerate(bounds):
        stop = bounds[index + 1][0] - 1 if index + 1 < len(bounds) else lines.line_count
        unit = text_unit(
            text,
            lines.line_start(start),
            lines.line_end(stop),
            lines,
            kind="code",
            heading_path=[label] if label else [],
        )
        if unit is not None:
            units.append(unit)
    return units


def _merge_one_liners(text: str, units: list[TextUnit]) -> list[TextUnit]:
    """Fold a one-line unit into the unit before it when that one is one-line or unlabelled too."""
    merged: list[TextUnit] = []
    for unit in units:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and unit.start_line == unit.end_line
            and (previous.start_line == previous.end_line or not previous.heading_path)
        ):
            merged[-1] = TextUnit(
                text=text[previous.char_start : unit.char_end],
                char_start=previous.char_start,
                char_end=unit.char_end,
                start_line=previous.start_line,
                end_line=unit.end_line,
                heading_path=[],
                kind="code",
            )
        else:
            merged.append(unit)
    return merged


@hookimpl
def register_loaders(register) -> None:
    register(CodeLoader())
