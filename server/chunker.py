"""Turns a loader's text units into chunks that fit the embedder's window.

Small neighbouring units under the same heading (and page) are packed together; a unit longer than
the window is cut into windows that overlap a little, each cut pulled back to a line or sentence end
when one is near. Every chunk keeps its character range, line range or page, and heading path, so a
search hit can point at the exact place in the file.

A very long unit (a one-line log of megabytes) is tokenized a segment of ``SEGMENT_CHARS`` at a
time, cut at a line break or a space where there is one, so memory follows the segment, not the
file; ``max_chunks`` stops a file that would make more chunks than that (``TooManyChunks``).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from lorekeeper.plugins.base import TextUnit, word_spans

# (start, end) character spans of each token of a text, in the embedder's tokenizer.
TokenSpans = Callable[[str], list[tuple[int, int]]]

DEFAULT_OVERLAP_TOKENS = 32
SEGMENT_CHARS = 32_000


class TooManyChunks(ValueError):
    """A file makes more chunks than the index takes from one file."""


_BOUNDARY = re.compile(r"\n\s*\n|\n|(?<=[.!?])\s")


def embed_text(text: str, heading_path: Sequence[str]) -> str:
    """What the embedder sees: the heading path gives a section's chunks their context."""
    if heading_path:
        return " > ".join(heading_path) + "\n" + text
    return text


@dataclass
class Chunk:
    text: str
    char_start: int
    char_end: int
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None
    heading_path: list[str] = field(default_factory=list)
    chunk_hash: str = ""

    @property
    def embed_text(self) -> str:
        return embed_text(self.text, self.heading_path)

    def __post_init__(self) -> None:
        if not self.chunk_hash:
            self.chunk_hash = hashlib.sha256(self.embed_text.encode("utf-8", "surrogatepass")).hexdigest()[
                :32
            ]


def chunk_units(
    units: Sequence[TextUnit],
    token_spans: TokenSpans = word_spans,
    max_tokens: int = 254,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    max_chunks: int | None = None,
) -> list[Chunk]:
    """Chunks of at most ``max_tokens`` tokens (heading path included) covering every unit; more
    than ``max_chunks`` of them is a ``TooManyChunks`` error, raised as soon as it is certain."""
    if max_tokens < 16:
        raise ValueError(f"max_tokens={max_tokens} is too small for useful chunks (at least 16)")
    overlap_tokens = max(0, min(overlap_tokens, max_tokens // 4))
    chunks: list[Chunk] = []
    pending: list[tuple[TextUnit, int]] = []  # small units waiting to be packed together
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if pending:
            chunks.append(_pack([u for u, _ in pending]))
        pending, pending_tokens = [], 0

    for unit in _segments(units):
        if max_chunks is not None and len(chunks) > max_chunks:
            raise TooManyChunks(
                f"more than {max_chunks:,} chunks from one file; raise the max_chunks_per_file setting to index it"
            )
        if not unit.text.strip():
            continue
        heading_cost = len(token_spans(" > ".join(unit.heading_path))) + 1 if unit.heading_path else 0
        budget = max(16, max_tokens - heading_cost)
        spans = token_spans(unit.text)
        if len(spans) > budget:
            flush()
            chunks.extend(_split(unit, spans, budget, overlap_tokens))
            continue
        if pending and (not _packable(pending[-1][0], unit) or pending_tokens + len(spans) > budget):
            flush()
        pending.append((unit, len(spans)))
        pending_tokens += len(spans)
    flush()
    if max_chunks is not None and len(chunks) > max_chunks:
        raise TooManyChunks(
            f"{len(chunks):,} chunks from one file, over the max_chunks_per_file limit of {max_chunks:,}"
        )
    return chunks


def _segments(units: Sequence[TextUnit]) -> Iterator[TextUnit]:
    """The units, each longer than ``SEGMENT_CHARS`` cut into consecutive slices of about that size."""
    for unit in units:
        text = unit.text
        if len(text) <= SEGMENT_CHARS:
            yield unit
            continue
        start = 0
        line = unit.start_line
        while start < len(text):
            end = min(len(text), start + SEGMENT_CHARS)
            if end < len(text):
                cut = max(
                    text.rfind("\n", start + SEGMENT_CHARS // 2, end),
                    text.rfind(" ", start + SEGMENT_CHARS // 2, end),
                )
                end = cut + 1 if cut > start else end
            piece = text[start:end]
            yield TextUnit(
                text=piece, char_start=unit.char_start + start, char_end=unit.char_start + end, start_line=line,
                end_line=None if line is None else line + piece.count("\n"), page=unit.page,
                heading_path=list(unit.heading_path), kind=unit.kind,
            )  # fmt: skip
            if line is not None:
                line += piece.count("\n")
            start = end


def _packable(previous: TextUnit, unit: TextUnit) -> bool:
    """Whether two neighbouring units may share a chunk: the same section of the same page, or
    small definitions of the same class or module (a chunk per one-line method is noise)."""
    if previous.page != unit.page:
        return False
    if previous.heading_path == unit.heading_path:
        return True
    return previous.kind == unit.kind == "code" and previous.heading_path[:-1] == unit.heading_path[:-1]


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = list(paths[0])
    for path in paths[1:]:
        while path[: len(prefix)] != prefix:
            prefix.pop()
    return prefix


def _pack(units: list[TextUnit]) -> Chunk:
    first, last = units[0], units[-1]
    return Chunk(
        text="\n\n".join(u.text.strip() for u in units),
        char_start=first.char_start,
        char_end=last.char_end,
        start_line=first.start_line,
        end_line=last.end_line if last.end_line is not None else first.end_line,
        page=first.page,
        heading_path=_common_prefix([u.heading_path for u in units]),
    )


def _split(unit: TextUnit, spans: list[tuple[int, int]], budget: int, overlap: int) -> list[Chunk]:
    text = unit.text
    newlines = [i for i, ch in enumerate(text) if ch == "\n"] if unit.start_line is not None else []
    starts = [s for s, _ in spans]
    pieces: list[Chunk] = []
    first = 0
    while first < len(spans):
        last = min(first + budget, len(spans))  # exclusive token index
        start_char = spans[first][0] if first else 0
        if last < len(spans):
            end_char = _cut_point(text, start_char, spans[last - 1][1], spans[first + budget // 2][1])
            # the token index where the cut lands decides where the next window starts
            last = max(first + 1, bisect.bisect_right(starts, end_char - 1, lo=first, hi=last))
            end_char = max(end_char, spans[last - 1][1])
        else:
            end_char = len(text)
        piece = text[start_char:end_char]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            trail = len(piece.rstrip())
            abs_start, abs_end = start_char + lead, start_char + trail
            pieces.append(
                Chunk(
                    text=piece.strip(),
                    char_start=unit.char_start + abs_start,
                    char_end=unit.char_start + abs_end,
                    start_line=None
                    if unit.start_line is None
                    else unit.start_line + bisect.bisect_left(newlines, abs_start),
                    end_line=None
                    if unit.start_line is None
                    else unit.start_line + bisect.bisect_left(newlines, max(abs_start, abs_end - 1)),
                    page=unit.page,
                    heading_path=list(unit.heading_path),
                )
            )
        if last >= len(spans):
            break
        first = max(first + 1, last - overlap)
    return pieces


def _cut_point(text: str, start: int, hard_end: int, earliest: int) -> int:
    """The end of the last paragraph, line or sentence between ``earliest`` and ``hard_end``;
    ``hard_end`` when there is none."""
    best = -1
    best_rank = 99
    for match in _BOUNDARY.finditer(text, earliest, hard_end):
        rank = 0 if match.group().count("\n") >= 2 else (1 if "\n" in match.group() else 2)
        if rank <= best_rank:
            best, best_rank = match.start(), rank
    return best if best > start else hard_end
