"""Plain text files: one unit per paragraph (blank-line separated block), with its line range.

Paragraphs are the smallest pieces a writer meant to stand together, so they are what the chunker
should pack; line ranges let an answer cite ``notes.txt:12-18``. Offsets index the decoded file
text exactly as read (no newline translation), and each unit's text is that slice with surrounding
whitespace left out: ``text[u.char_start:u.char_end] == u.text``.
"""

from __future__ import annotations

from pathlib import Path

from ..base import LoadedText, Loader
from ..hookspecs import hookimpl
from ._common import LineIndex, decode_data, paragraph_units

TEXT_EXTENSIONS = (
    ".txt",
    ".text",
    ".log",
    ".rst",
    ".adoc",
    ".org",
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".conf",
    ".properties",
    ".tex",
    ".bib",
    ".srt",
    ".xml",
)

# Files known by their whole (lower-case) name rather than a suffix.
TEXT_FILE_NAMES = (
    "readme",
    "license",
    "licence",
    "copying",
    "authors",
    "contributors",
    "changelog",
    "changes",
    "news",
    "notice",
    "todo",
    "install",
    "makefile",
    "gnumakefile",
    "dockerfile",
    "containerfile",
    "vagrantfile",
    "procfile",
    "gemfile",
    "rakefile",
    "justfile",
    "cmakelists.txt",
    ".gitignore",
    ".dockerignore",
    ".editorconfig",
)


class TextLoader(Loader):
    name = "text"
    version = "1"
    extensions = TEXT_EXTENSIONS + TEXT_FILE_NAMES

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> LoadedText:
        decoded = decode_data(data, path, max_chars=max_chars)
        text = decoded.text
        units = paragraph_units(text, 0, len(text), LineIndex(text), kind="paragraph")
        return LoadedText(units, decoded.warnings)


@hookimpl
def register_loaders(register) -> None:
    register(TextLoader())
