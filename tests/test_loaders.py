"""The built-in loader plugins, on real files each test writes.

Every check reads provenance back against the file itself: a unit's line range must hold exactly
the unit's text, a PDF unit's page must be the page the text was drawn on, and so on.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import sysconfig
from pathlib import Path

import pytest

from lorekeeper.plugins import loader_for
from lorekeeper.plugins.base import LoadedText, LoaderError, TextUnit
from lorekeeper.plugins.loaders.code import CodeLoader
from lorekeeper.plugins.loaders.docx import DocxLoader
from lorekeeper.plugins.loaders.html import HtmlLoader, extracted_text
from lorekeeper.plugins.loaders.markdown import MarkdownLoader
from lorekeeper.plugins.loaders.pdf import PdfLoader
from lorekeeper.plugins.loaders.text import TextLoader

TEXT_LIKE = [("notes.txt", TextLoader), ("doc.md", MarkdownLoader), ("mod.py", CodeLoader)]
ALL_LOADERS = [
    ("notes.txt", TextLoader),
    ("doc.md", MarkdownLoader),
    ("mod.py", CodeLoader),
    ("app.js", CodeLoader),
    ("page.html", HtmlLoader),
    ("paper.pdf", PdfLoader),
    ("report.docx", DocxLoader),
]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOREKEEPER_HOME", str(tmp_path / "home"))


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def assert_text_provenance(path: Path, units: list[TextUnit]) -> None:
    """Offsets slice the decoded file to the unit text, and the line range holds exactly that text."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.split("\n")
    for unit in units:
        assert text[unit.char_start : unit.char_end] == unit.text
        assert unit.text == unit.text.strip() and unit.text
        assert 1 <= unit.start_line <= unit.end_line <= len(lines)
        span = "\n".join(lines[unit.start_line - 1 : unit.end_line]).strip()
        assert span == unit.text
    starts = [u.char_start for u in units]
    assert starts == sorted(starts)
    for before, after in zip(units, units[1:]):
        assert before.char_end <= after.char_start, "units overlap"


# --- plain text ---------------------------------------------------------------------------------


def test_text_paragraphs_with_line_ranges(tmp_path):
    path = write(
        tmp_path / "notes.txt",
        "First paragraph\nstill first.\n\n\n  Second one, indented.  \n   \t\nThird\nis\nlong.\n",
    )
    units = TextLoader().load(path)
    assert [u.text for u in units] == [
        "First paragraph\nstill first.",
        "Second one, indented.",
        "Third\nis\nlong.",
    ]
    assert [(u.start_line, u.end_line) for u in units] == [(1, 2), (5, 5), (7, 9)]
    assert {u.kind for u in units} == {"paragraph"}
    assert_text_provenance(path, units)


def test_text_crlf_lines_count_like_an_editor(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    units = TextLoader().load(path)
    assert [(u.text, u.start_line, u.end_line) for u in units] == [("one\r\ntwo", 1, 2), ("three", 4, 4)]


def test_text_with_bom_offsets_index_the_text_without_it(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\n\nWorld\n")
    units = TextLoader().load(path)
    assert units[0].text == "Hello" and units[0].char_start == 0
    assert_text_provenance(path, units)


def test_utf16_file_with_bom_is_text_not_binary(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_bytes("Grüße\r\n\r\naus Wien\r\n".encode("utf-16"))
    units = TextLoader().load(path)
    assert [u.text for u in units] == ["Grüße", "aus Wien"]
    assert units[1].start_line == 3


# --- decoding problems, binaries, empty and vanished files --------------------------------------


@pytest.mark.parametrize(("name", "loader_cls"), TEXT_LIKE)
def test_binary_file_is_refused_with_a_clear_error(tmp_path, name, loader_cls):
    path = tmp_path / name
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(LoaderError, match=r"binary file: .*" + name):
        loader_cls().load(path)


@pytest.mark.parametrize(("name", "loader_cls"), TEXT_LIKE)
def test_legacy_windows_1252_file_loads_with_a_warning(tmp_path, name, loader_cls):
    path = tmp_path / name
    source = "# caf\xe9 na\xefve \u2013 \u20ac5\n\nsecond = 'r\xe9sum\xe9'\n"
    path.write_bytes(source.encode("cp1252"))
    result = loader_cls().load(path)
    assert isinstance(result, LoadedText)
    joined = "\n".join(u.text for u in result)
    assert "café naïve – €5" in joined and "résumé" in joined
    assert len(result.warnings) == 1
    assert "not valid UTF-8" in result.warnings[0] and "Windows-1252" in result.warnings[0]
    assert str(path) in result.warnings[0] and "line 1" in result.warnings[0]


def test_damaged_utf8_keeps_good_text_and_marks_bad_bytes(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("Grüße\n\n".encode() + b"bad \xff\xfe byte\n\n" + "日本語\n".encode())
    result = TextLoader().load(path)
    assert [u.text for u in result] == ["Grüße", "bad \ufffd\ufffd byte", "日本語"]
    assert [u.start_line for u in result] == [1, 3, 5]
    assert len(result.warnings) == 1
    assert "line 3" in result.warnings[0] and "replaced with U+FFFD" in result.warnings[0]


def test_python_coding_declaration_is_honoured_without_warning(tmp_path):
    path = tmp_path / "legacy.py"
    path.write_bytes("# -*- coding: latin-1 -*-\nNAME = 'Jos\xe9'\n".encode("latin-1"))
    result = CodeLoader().load(path)
    assert result.warnings == []
    assert "NAME = 'José'" in result[0].text


def test_nul_bytes_past_the_binary_probe_become_spaces(tmp_path):
    path = tmp_path / "crash.log"
    head = b"service started\n" * 1000  # 16 KB of text before the damage
    path.write_bytes(head + b"\x00\x00\x00\x00\nservice restarted\n")
    result = TextLoader().load(path)
    text = "".join(u.text for u in result)
    assert "\x00" not in text and text.endswith("service restarted")
    assert result[0].char_end - result[0].char_start == len(result[0].text)
    assert any("4 NUL character(s) replaced with spaces" in w for w in result.warnings)


def test_valid_utf8_has_no_warnings(tmp_path):
    result = TextLoader().load(write(tmp_path / "ok.txt", "naïve café\n"))
    assert result.warnings == []


@pytest.mark.parametrize(("name", "loader_cls"), ALL_LOADERS)
def test_empty_file_gives_no_units(tmp_path, name, loader_cls):
    path = tmp_path / name
    path.write_bytes(b"")
    assert list(loader_cls().load(path)) == []


@pytest.mark.parametrize(("name", "loader_cls"), [*TEXT_LIKE, ("page.html", HtmlLoader)])
def test_whitespace_only_file_gives_no_units(tmp_path, name, loader_cls):
    path = write(tmp_path / name, "\n   \n\t\n")
    assert list(loader_cls().load(path)) == []


@pytest.mark.parametrize(("name", "loader_cls"), ALL_LOADERS)
def test_file_deleted_before_load_is_a_loader_error(tmp_path, name, loader_cls):
    path = tmp_path / name
    path.write_bytes(b"something")
    path.unlink()
    with pytest.raises(LoaderError, match="file not found.*" + name):
        loader_cls().load(path)


@pytest.mark.parametrize(("name", "loader_cls"), ALL_LOADERS)
def test_directory_named_like_a_file_is_a_loader_error(tmp_path, name, loader_cls):
    path = tmp_path / name
    path.mkdir()
    with pytest.raises(LoaderError, match=name):
        loader_cls().load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX feature")
@pytest.mark.timeout(30)
def test_named_pipe_is_refused_instead_of_blocking(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    with pytest.raises(LoaderError, match="not a regular file"):
        TextLoader().load(path)


HUGE = 2 * 1024 * 1024


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "loader_cls"),
    [
        ("big.txt", TextLoader),
        ("big.md", MarkdownLoader),
        ("big.py", CodeLoader),
        ("big.js", CodeLoader),
        ("big.c", CodeLoader),
        ("big.html", HtmlLoader),
    ],
)
def test_huge_single_line_is_loaded_whole(tmp_path, name, loader_cls):
    # 2 MB without a newline: a quadratic scan or a backtracking regex would not finish in time.
    line = ("word " * (HUGE // 5)).strip()
    path = write(tmp_path / name, line)
    units = loader_cls().load(path)
    assert "".join(u.text for u in units).replace(" ", "") == line.replace(" ", "")
    if loader_cls is not HtmlLoader:
        assert [(u.start_line, u.end_line) for u in units] == [(1, 1)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "loader_cls"),
    [("brackets.md", MarkdownLoader), ("brackets.html", HtmlLoader), ("brackets.ts", CodeLoader)],
)
def test_huge_heading_full_of_brackets_is_cut_short_in_the_path(tmp_path, name, loader_cls):
    # Link and definition patterns backtrack on brackets; a 2 MB heading must still load quickly.
    junk = "[(<" * (HUGE // 3)
    source = {
        ".md": f"# {junk}\n\nbody\n",
        ".html": f"<h1>{junk}</h1><p>body</p>",
        ".ts": f"class {junk} {{\n}}\n",
    }[Path(name).suffix]
    path = write(tmp_path / name, source)
    units = loader_cls().load(path)
    assert sum(len(u.text) for u in units) >= len(junk)
    for unit in units:
        assert all(len(title) <= 200 for title in unit.heading_path)


# --- Markdown -----------------------------------------------------------------------------------

MARKDOWN = """\
---
title: Field notes
tags: [a, b]
---
Opening words before any heading.

# Install

Get it with pip.

```bash
# this is a shell comment, not a heading
pip install thing
```

## On Windows ##

Use the installer.

~~~
## still code
~~~

### Troubleshooting

Check the PATH.

Usage
=====

Run `thing --help`.

Options and [flags](https://example.org)
---

- item
---

#hashtag is not a heading
"""


def test_markdown_sections_and_heading_paths(tmp_path):
    path = write(tmp_path / "doc.md", MARKDOWN)
    units = MarkdownLoader().load(path)
    assert_text_provenance(path, units)
    by_first_line = {u.text.split("\n")[0]: u for u in units}

    front = units[0]
    assert front.kind == "front_matter" and front.heading_path == []
    assert "title: Field notes" in front.text and (front.start_line, front.end_line) == (1, 4)

    intro = by_first_line["Opening words before any heading."]
    assert intro.heading_path == [] and intro.kind == "section"

    install = by_first_line["# Install"]
    assert install.heading_path == ["Install"]
    assert "# this is a shell comment, not a heading" in install.text  # fenced: no new section

    windows = by_first_line["## On Windows ##"]
    assert windows.heading_path == ["Install", "On Windows"]
    assert "## still code" in windows.text

    trouble = by_first_line["### Troubleshooting"]
    assert trouble.heading_path == ["Install", "On Windows", "Troubleshooting"]

    usage = by_first_line["Usage"]  # setext level 1 closes the Install branch
    assert usage.heading_path == ["Usage"]
    assert "Run `thing --help`." in usage.text

    options = by_first_line["Options and [flags](https://example.org)"]
    assert options.heading_path == ["Usage", "Options and flags"]
    assert "- item\n---" in options.text  # a dash line after a list item is a rule, not a heading
    assert "#hashtag is not a heading" in options.text

    lines = MARKDOWN.split("\n")
    for unit in units:
        assert lines[unit.start_line - 1].strip() == unit.text.split("\n")[0]
    assert len(units) == 7


def test_markdown_with_windows_line_endings(tmp_path):
    path = tmp_path / "dos.md"
    path.write_bytes(b"# Title #\r\n\r\nText.\r\n\r\nSub\r\n---\r\nMore.\r\n")
    units = MarkdownLoader().load(path)
    assert [(u.heading_path, u.start_line, u.end_line) for u in units] == [
        (["Title"], 1, 3),
        (["Title", "Sub"], 5, 7),
    ]
    assert units[1].text == "Sub\r\n---\r\nMore."


def test_markdown_unclosed_front_matter_is_ordinary_text(tmp_path):
    path = write(tmp_path / "rule.md", "---\n\nJust text after a rule.\n")
    units = MarkdownLoader().load(path)
    assert [u.kind for u in units] == ["section"]
    assert_text_provenance(path, units)


# --- source code --------------------------------------------------------------------------------

PYTHON = '''\
"""Module docstring."""

import os

LIMIT = 3


# Adds numbers.
# Two comment lines belong to the function.
def add(a, b):
    return a + b


@decorator
@other(1)
class Store:
    """A store."""

    kind = "s"

    def get(self, key):
        return key

    def report(self):
        lines = [
            "row 0",
            "row 1",
            "row 2",
            "row 3",
            "row 4",
            "row 5",
            "row 6",
            "row 7",
            "row 8",
            "row 9",
            "row 10",
            "row 11",
            "row 12",
            "row 13",
            "row 14",
            "row 15",
            "row 16",
            "row 17",
            "row 18",
            "row 19",
            "row 20",
            "row 21",
            "row 22",
            "row 23",
            "row 24",
        ]
        return "\\n".join(lines)

    # the async one
    async def fetch(self):
        def inner():
            pass
        return inner

    size = 2


class Small:
    """Short classes stay in one piece."""

    def one(self):
        return 1

    def two(self):
        return 2


async def main():
    await Store().fetch()


if __name__ == "__main__":
    main()
'''


def _line_of(source: str, needle: str) -> int:
    return source.split("\n").index(needle) + 1


def test_python_units_follow_definitions(tmp_path):
    path = write(tmp_path / "mod.py", PYTHON)
    units = CodeLoader().load(path)
    assert_text_provenance(path, units)
    assert {u.kind for u in units} == {"code"}
    paths = [u.heading_path for u in units]
    assert paths == [
        [],
        ["def add"],
        ["class Store"],
        ["class Store", "def get"],
        ["class Store", "def report"],
        ["class Store", "async def fetch"],
        ["class Store"],
        ["class Small"],
        ["async def main"],
        [],
    ]
    head, add, store_head, get, report, fetch, store_tail, small, main, tail = units
    assert head.text == '"""Module docstring."""\n\nimport os\n\nLIMIT = 3'
    assert add.start_line == _line_of(PYTHON, "# Adds numbers.")
    assert add.end_line == _line_of(PYTHON, "    return a + b")
    assert store_head.start_line == _line_of(PYTHON, "@decorator")
    assert store_head.text.endswith('kind = "s"')
    assert get.start_line == _line_of(PYTHON, "    def get(self, key):")
    assert fetch.start_line == _line_of(PYTHON, "    # the async one")
    assert "def inner" in fetch.text  # nested functions stay with their parent
    assert report.end_line == _line_of(PYTHON, '        return "\\n".join(lines)')
    assert store_tail.text == "size = 2"
    assert small.text.startswith("class Small:") and small.text.endswith("return 2")
    assert tail.text.startswith('if __name__ == "__main__":')
    assert tail.end_line == len(PYTHON.rstrip("\n").split("\n"))


def test_python_syntax_error_falls_back_to_line_windows_with_a_warning(tmp_path):
    source = "def broken(:\n" + "".join(f"x{i} = {i}\n" for i in range(150))
    path = write(tmp_path / "broken.py", source)
    result = CodeLoader().load(path)
    assert_text_provenance(path, result)
    assert [(u.start_line, u.end_line) for u in result] == [(1, 60), (61, 120), (121, 151)]
    assert len(result.warnings) == 1
    assert "could not parse" in result.warnings[0] and "line 1" in result.warnings[0]


def _stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["json/decoder.py", "textwrap.py", "shlex.py", "dataclasses.py", "argparse.py"]
    return [lib / name for name in names if (lib / name).exists()]


@pytest.mark.parametrize("source_path", _stdlib_files(), ids=lambda p: p.name)
def test_python_loader_on_real_stdlib_modules(tmp_path, source_path):
    """Every non-blank line lands in exactly one unit and every top-level definition gets its own."""
    path = tmp_path / source_path.name
    path.write_bytes(source_path.read_bytes())
    units = CodeLoader().load(path)
    assert_text_provenance(path, units)
    source = path.read_text(encoding="utf-8")
    covered: list[int] = []
    for unit in units:
        covered.extend(range(unit.start_line, unit.end_line + 1))
    assert len(covered) == len(set(covered))
    non_blank = {n for n, line in enumerate(source.split("\n"), 1) if line.strip()}
    assert non_blank <= set(covered)
    labels = {u.heading_path[0] for u in units if u.heading_path}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            assert f"class {node.name}" in labels
        elif isinstance(node, ast.FunctionDef):
            assert f"def {node.name}" in labels


GO = """\
// Package demo shows splitting.
package demo

import "fmt"

const (
\tA = 1
)

// Hello greets.
func Hello(name string) string {
\treturn fmt.Sprintf("hi %s", name)
}

type Point struct {
\tX, Y int
}

func (p Point) Norm() int {
\treturn p.X*p.X + p.Y*p.Y
}
"""

TYPESCRIPT = """\
import { x } from "./x";

const A = 1;
const B = 2;
const C = 3;

/**
 * Adds.
 */
export function add(a: number, b: number): number {
  return a + b;
}

export default class Thing {
  run(): void {
    if (true) {
      console.log("x");
    }
  }
}
"""

RUST = """\
use std::fmt;

/// A point.
#[derive(Debug)]
pub struct Point {
    x: i32,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.x)
    }
}

pub(crate) async fn go() {}
"""

C_SOURCE = """\
#include <stdio.h>

static int helper(int x);

/* Entry point. */
int main(int argc, char **argv)
{
    if (argc > 1) {
        return helper(argc);
    }
    return 0;
}

static int
helper_two(int x) {
    return x;
}

struct pair {
    int a, b;
};
"""


CPP = """\
#include <vector>

namespace util {
int helper();
}

template <typename T,
          typename U>
T twice(T value)
{
    return value * 2;
}
"""


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        (
            "twice.cpp",
            CPP,
            [
                ([], "#include <vector>"),
                (["namespace util"], "namespace util {"),
                (["T twice(T value)"], "template <typename T,"),
            ],
        ),
        (
            "demo.go",
            GO,
            [
                ([], "// Package demo shows splitting."),
                (["const ("], "const ("),
                (["func Hello(name string) string"], "// Hello greets."),
                (["type Point struct"], "type Point struct {"),
                (["func (p Point) Norm() int"], "func (p Point) Norm() int {"),
            ],
        ),
        (
            "thing.ts",
            TYPESCRIPT,
            [
                ([], 'import { x } from "./x";'),
                (["export function add(a: number, b: number): number"], "/**"),
                (["export default class Thing"], "export default class Thing {"),
            ],
        ),
        (
            "point.rs",
            RUST,
            [
                ([], "use std::fmt;"),
                (["pub struct Point"], "/// A point."),
                (["impl fmt::Display for Point"], "impl fmt::Display for Point {"),
                (["pub(crate) async fn go() {}"], "pub(crate) async fn go() {}"),
            ],
        ),
        (
            "main.c",
            C_SOURCE,
            [
                ([], "#include <stdio.h>"),
                (["int main(int argc, char **argv)"], "/* Entry point. */"),
                (["helper_two(int x)"], "static int"),
                (["struct pair"], "struct pair {"),
            ],
        ),
    ],
)
def test_other_languages_split_on_top_level_definitions(tmp_path, name, source, expected):
    path = write(tmp_path / name, source)
    units = CodeLoader().load(path)
    assert_text_provenance(path, units)
    assert [(u.heading_path, u.text.split("\n")[0]) for u in units] == expected


JAVA = (
    """\
package demo;

import java.util.List;

/**
 * A store.
 */
public class Store {
    private final List<String> items;
    private int count;

    public Store(List<String> items) {
        this.items = items;
    }

    @Override
    public String toString() {
        if (count > 0) {
            return "Store";
        }
        return "Empty";
    }

    // Converts the items.
    public <T> List<T> convert(List<T> input) {
"""
    + "".join(f"        input.add(null); // {i}\n" for i in range(20))
    + """\
        return input;
    }

    static class Inner {
        int x;
    }
}
"""
)


def test_long_java_class_is_split_into_its_members(tmp_path):
    path = write(tmp_path / "Store.java", JAVA)
    units = CodeLoader().load(path)
    assert_text_provenance(path, units)
    assert [(u.heading_path, u.text.split("\n")[0].strip()) for u in units] == [
        ([], "package demo;"),
        (["public class Store"], "/**"),
        (["public class Store", "public Store(List<String> items)"], "public Store(List<String> items) {"),
        (["public class Store", "public String toString()"], "@Override"),
        (["public class Store", "public <T> List<T> convert(List<T> input)"], "// Converts the items."),
        (["public class Store", "static class Inner"], "static class Inner {"),
    ]
    assert units[1].text.endswith("private int count;")  # fields stay with the class header
    assert units[-1].text.endswith("}\n}")


def test_typescript_one_line_constants_are_merged_with_the_imports(tmp_path):
    path = write(tmp_path / "thing.ts", TYPESCRIPT)
    first = CodeLoader().load(path)[0]
    assert first.text == 'import { x } from "./x";\n\nconst A = 1;\nconst B = 2;\nconst C = 3;'
    assert (first.start_line, first.end_line) == (1, 5)


def test_code_without_visible_structure_uses_line_windows(tmp_path):
    source = "".join(f"echo {i}\n" for i in range(130))
    path = write(tmp_path / "run.sh", source)
    units = CodeLoader().load(path)
    assert_text_provenance(path, units)
    assert [(u.start_line, u.end_line) for u in units] == [(1, 60), (61, 120), (121, 130)]


# --- HTML ---------------------------------------------------------------------------------------

HTML = """\
<!DOCTYPE html>
<html>
<head><title>Site title</title>
<style>.x { color: red }</style>
<script>var secret = "script text";</script>
</head>
<body>
<nav><a href="/">Home nav link</a></nav>
<main>
<p>Lead   paragraph
across lines.</p>
<h1>User <em>Guide</em></h1>
<p>Welcome to the <b>guide</b>.</p>
<!-- a comment -->
<h2>Tables</h2>
<table>
  <tr><th>Name</th><th>Value</th></tr>
  <tr><td>alpha</td><td>1</td></tr>
</table>
<pre>x = 1
    y = 2</pre>
<div hidden>hidden text</div>
<h3>Deep</h3>
<ul><li>first item</li><li>second item</li></ul>
<h2 id="second">Second<a class="headerlink" href="#second">¶</a></h2>
<p>Closing words.</p>
</main>
<footer>Footer text</footer>
<script>more()</script>
</body>
</html>
"""


def test_html_main_text_sections_and_source_lines(tmp_path):
    path = write(tmp_path / "page.html", HTML)
    result = HtmlLoader().load(path)
    assert result.warnings == []
    units = list(result)
    full = extracted_text(units)
    for unit in units:
        assert full[unit.char_start : unit.char_end] == unit.text
    for absent in ("script text", "color: red", "Home nav link", "Footer text", "hidden text", "more()"):
        assert absent not in full
    assert "<" not in full.replace("<stdio", "")
    assert [u.heading_path for u in units] == [
        [],
        ["User Guide"],
        ["User Guide", "Tables"],
        ["User Guide", "Tables", "Deep"],
        ["User Guide", "Second"],
    ]
    lead, guide, tables, deep, second = units
    assert lead.text == "Lead paragraph across lines."
    assert guide.text == "User Guide\n\nWelcome to the guide."
    assert "Name | Value\n\nalpha | 1" in tables.text
    assert "x = 1\n    y = 2" in tables.text  # <pre> keeps its layout
    assert "first item\n\nsecond item" in deep.text
    source_lines = HTML.split("\n")
    for unit in units:
        assert unit.kind == "section"
        assert unit.start_line <= unit.end_line
    assert source_lines[guide.start_line - 1].startswith("<h1>User")
    assert source_lines[tables.end_line - 1] == "    y = 2</pre>"
    assert source_lines[second.start_line - 1].startswith('<h2 id="second">Second')
    assert second.text.startswith("Second\n")  # the permalink mark is not part of the title
    assert source_lines[second.end_line - 1] == "<p>Closing words.</p>"


def test_html_without_main_reads_the_body(tmp_path):
    path = write(tmp_path / "plain.htm", "<html><body><h2>Only</h2><p>Body text.</p></body></html>")
    units = HtmlLoader().load(path)
    assert [(u.heading_path, u.text) for u in units] == [(["Only"], "Only\n\nBody text.")]


def test_html_declared_latin1_decodes_without_warning(tmp_path):
    path = tmp_path / "latin.html"
    path.write_bytes(b'<html><head><meta charset="iso-8859-1"></head><body><p>caf\xe9</p></body></html>')
    result = HtmlLoader().load(path)
    assert [u.text for u in result] == ["café"] and result.warnings == []


def test_html_binary_is_refused(tmp_path):
    path = tmp_path / "fake.html"
    path.write_bytes(b"<html>\x00\x01\x02")
    with pytest.raises(LoaderError, match="binary file"):
        HtmlLoader().load(path)


# --- PDF ----------------------------------------------------------------------------------------


def make_pdf(
    path: Path, pages: list[list[str]], *, outline: dict[int, list[tuple[int, str]]] | None = None, **kw
):
    """A real multi-page PDF drawn with reportlab; ``outline`` maps page index to (level, title)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4, **kw)
    for index, lines in enumerate(pages):
        for number, (level, title) in enumerate((outline or {}).get(index, [])):
            key = f"p{index}-{number}"
            pdf.bookmarkPage(key)
            pdf.addOutlineEntry(title, key, level=level)
        y = 800
        for line in lines:
            pdf.drawString(72, y, line)
            y -= 16
        pdf.showPage()
    pdf.save()
    return path


def test_pdf_one_unit_per_page_with_page_numbers_and_outline(tmp_path):
    pages = [
        ["Introduction to gardening.", "Soil matters most."],
        ["Watering schedule for tomatoes."],
        [],  # a blank page
        ["Pruning the apple trees in winter."],
    ]
    outline = {0: [(0, "1 Basics")], 1: [(1, "1.1 Water")], 3: [(0, "2 Trees")]}
    path = make_pdf(tmp_path / "paper.pdf", pages, outline=outline)
    result = PdfLoader().load(path)
    units = list(result)
    assert [u.page for u in units] == [1, 2, 4]
    assert {u.kind for u in units} == {"page"}
    assert "Soil matters most." in units[0].text
    assert "tomatoes" in units[1].text and "apple" not in units[1].text
    assert "apple trees" in units[2].text
    assert [u.heading_path for u in units] == [["1 Basics"], ["1 Basics", "1.1 Water"], ["2 Trees"]]
    assert all(u.start_line is None for u in units)
    full = "\n\n".join(u.text for u in units)
    for unit in units:
        assert full[unit.char_start : unit.char_end] == unit.text
    assert any("page(s) 3" in w for w in result.warnings)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 3], id="truncated"),
        pytest.param(lambda data: b"%PDF-1.4\n" + bytes(range(256)) * 20, id="garbage"),
        pytest.param(lambda data: b"this is not a pdf at all\n" * 10, id="text"),
    ],
)
def test_corrupt_pdf_is_a_clear_loader_error(tmp_path, damage):
    good = make_pdf(tmp_path / "good.pdf", [["Page one text."], ["Page two text."]])
    path = tmp_path / "broken.pdf"
    path.write_bytes(damage(good.read_bytes()))
    with pytest.raises(LoaderError, match=r"corrupt or unreadable PDF: .*broken\.pdf"):
        PdfLoader().load(path)


def test_pdf_with_a_user_password_asks_for_it_to_be_removed(tmp_path):
    from reportlab.lib.pdfencrypt import StandardEncryption

    path = make_pdf(
        tmp_path / "locked.pdf",
        [["Top secret text."]],
        encrypt=StandardEncryption("user-pw", ownerPassword="owner-pw", strength=128),
    )
    with pytest.raises(LoaderError, match=r"encrypted PDF needs a password: .*locked\.pdf"):
        PdfLoader().load(path)


def test_pdf_with_only_an_owner_password_still_loads(tmp_path):
    from reportlab.lib.pdfencrypt import StandardEncryption

    path = make_pdf(
        tmp_path / "restricted.pdf",
        [["Readable but not printable."]],
        encrypt=StandardEncryption("", ownerPassword="owner-pw", canPrint=0, strength=128),
    )
    assert [u.text for u in PdfLoader().load(path)] == ["Readable but not printable."]


def test_pdf_without_text_says_it_needs_ocr(tmp_path):
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    path = tmp_path / "scan.pdf"
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for _ in range(2):
        pdf.rect(50, 50, 400, 600, fill=1)  # a picture, no text
        pdf.showPage()
    pdf.save()
    with pytest.raises(LoaderError, match=r"no extractable text in PDF: .*scan\.pdf .*OCR"):
        PdfLoader().load(path)


# --- DOCX ---------------------------------------------------------------------------------------


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_paragraph("Preface before any heading.")
    document.add_heading("Annual Report", level=0)  # the "Title" style
    document.add_heading("Finances", level=1)
    document.add_paragraph("Revenue grew.")
    document.add_paragraph("")
    table = document.add_table(rows=3, cols=3)
    for r, row in enumerate([["Year", "Revenue", "Cost"], ["2024", "10", "7"], ["2025", "12", "8"]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    merged = table.cell(2, 1).merge(table.cell(2, 2))
    merged.text = "merged cell"
    document.add_heading("Costs", level=2)
    document.add_paragraph("Costs fell.")
    document.add_heading("Outlook", level=1)
    document.add_paragraph("Bright.")
    document.sections[0].footer.paragraphs[0].text = "Confidential footer"
    document.save(str(path))
    return path


def test_docx_sections_headings_and_tables(tmp_path):
    path = make_docx(tmp_path / "report.docx")
    units = list(DocxLoader().load(path))
    assert [u.heading_path for u in units] == [
        [],
        ["Annual Report"],
        ["Annual Report", "Finances"],
        ["Annual Report", "Finances", "Costs"],
        ["Annual Report", "Outlook"],
    ]
    preface, title, finances, costs, outlook = units
    assert preface.text == "Preface before any heading."
    assert title.text == "Annual Report"
    assert finances.text.split("\n") == [
        "Finances",
        "Revenue grew.",
        "Year | Revenue | Cost",
        "2024 | 10 | 7",
        "2025 | merged cell",
    ]
    assert costs.text == "Costs\nCosts fell."
    assert outlook.text == "Outlook\nBright."
    full = "\n\n".join(u.text for u in units)
    assert "Confidential footer" not in full
    for unit in units:
        assert full[unit.char_start : unit.char_end] == unit.text
        assert unit.kind == "section"


@pytest.mark.parametrize(
    "content",
    [b"not a zip file at all", b"PK\x03\x04" + b"\x00" * 100],
    ids=["text", "broken-zip"],
)
def test_corrupt_docx_is_a_clear_loader_error(tmp_path, content):
    path = tmp_path / "broken.docx"
    path.write_bytes(content)
    with pytest.raises(LoaderError, match=r"corrupt or unreadable DOCX.*broken\.docx"):
        DocxLoader().load(path)


def test_zip_that_is_not_a_word_document_is_a_loader_error(tmp_path):
    import zipfile

    path = tmp_path / "other.docx"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "not word")
    path.write_bytes(buffer.getvalue())
    with pytest.raises(LoaderError, match=r"corrupt or unreadable DOCX.*other\.docx"):
        DocxLoader().load(path)


def _docx_bytes(body: bytes) -> bytes:
    import zipfile

    ns = b"http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("word/document.xml", b'<?xml version="1.0"?><w:document xmlns:w="' + ns
                         + b'"><w:body>' + body + b"</w:body></w:document>")  # fmt: skip
    return buffer.getvalue()


def test_docx_block_bound_refuses_a_bomb_hidden_in_one_block(monkeypatch):
    """A body under the ratio check whose bulk sits in one top-level block (a content control full
    of paragraphs, which the parser holds whole until it ends) is refused as a bomb while it is read,
    with the reason; a block under the bound still reads."""
    from lorekeeper.plugins.loaders import docx as docx_loader

    monkeypatch.setattr(docx_loader, "MAX_BLOCK_BYTES", 2**20)
    para = b"<w:p><w:r><w:t>a</w:t></w:r></w:p>"
    hidden = b"<w:sdt><w:sdtContent>" + para * (2 * 2**20 // len(para)) + b"</w:sdtContent></w:sdt>"
    with pytest.raises(LoaderError, match=r"bomb\.docx: refused as a zip bomb: one block"):
        DocxLoader().load_data(
            Path("bomb.docx"), _docx_bytes(hidden + b"<w:p><w:r><w:t>end</w:t></w:r></w:p>")
        )
    many = para * (4 * 2**20 // len(para))  # 4 MB of small top-level blocks: each far under the bound
    units = DocxLoader().load_data(Path("ok.docx"), _docx_bytes(many))
    assert sum(len(u.text) for u in units) > 100_000


# --- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "loader_cls"),
    [
        ("x.md", MarkdownLoader),
        ("NOTES.MARKDOWN", MarkdownLoader),
        ("a.txt", TextLoader),
        ("data.csv", TextLoader),
        ("config.yaml", TextLoader),
        ("README", TextLoader),
        ("Makefile", TextLoader),
        ("Dockerfile", TextLoader),
        ("README.md", MarkdownLoader),
        ("main.py", CodeLoader),
        ("lib.rs", CodeLoader),
        ("App.tsx", CodeLoader),
        ("query.sql", CodeLoader),
        ("index.html", HtmlLoader),
        ("paper.PDF", PdfLoader),
        ("report.docx", DocxLoader),
    ],
)
def test_builtin_loaders_are_registered_for_their_files(name, loader_cls):
    assert isinstance(loader_for(Path(name)), loader_cls)


def test_unknown_suffix_has_no_loader():
    assert loader_for(Path("archive.tar.gz")) is None
    assert loader_for(Path("photo.jpeg")) is None


def test_pypdf_warnings_become_the_files_reason_not_console_lines(tmp_path, caplog):
    """A damaged PDF makes pypdf log "EOF marker not found": that goes into the error (or note) of
    the file, never to the console (the root logger) while a folder is indexed."""
    path = make_pdf(tmp_path / "damaged.pdf", [["Harbour log."]])
    path.write_bytes(path.read_bytes().replace(b"%%EOF", b"%%EOX"))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(LoaderError, match=r"corrupt or unreadable PDF.*pypdf: .*EOF marker not found"):
            PdfLoader().load(path)
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    # and outside a load, pypdf logs as usual again
    logging.getLogger("pypdf._reader").warning("after")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pypdf")] == ["after"]
