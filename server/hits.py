"""What a search returns (``SearchHit``) and how its arguments are read (``parse_since``), without
the search engine: the CLI shows hits a running server found without importing numpy or the store.
``search.py`` re-exports everything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .render import describe_location

if TYPE_CHECKING:
    from .store import ChunkHit

MODES = ("hybrid", "vector", "keyword")
MAX_K = 200


@dataclass
class SearchHit:
    chunk_id: int
    document_id: int
    path: str
    text: str
    score: float
    start_line: int | None
    end_line: int | None
    page: int | None
    heading_path: list[str]
    mtime: float | None
    rank: int = 0
    root: str | None = None
    vector_score: float | None = None  # cosine similarity, when the vector list found it
    keyword_score: float | None = None  # BM25 (higher is better), when the keyword list found it
    also_in: list[str] = field(default_factory=list)  # other files holding the very same text
    char_start: int | None = None
    char_end: int | None = None

    @property
    def location(self) -> str:
        """``lines 12-30``, ``page 3`` (empty when unknown): the one way locations are written."""
        return describe_location(self.start_line, self.end_line, self.page)

    @classmethod
    def from_chunk(cls, chunk: ChunkHit) -> SearchHit:
        return cls(
            chunk_id=chunk.chunk_id, document_id=chunk.document_id, path=chunk.path, text=chunk.text,
            score=0.0, start_line=chunk.start_line, end_line=chunk.end_line, page=chunk.page,
            heading_path=list(chunk.heading_path), mtime=chunk.mtime, root=chunk.root,
            char_start=chunk.char_start, char_end=chunk.char_end,
        )  # fmt: skip


def parse_since(value: float | int | str | None) -> float | None:
    """A "modified after" filter as epoch seconds: a number (seconds since 1970) or an ISO 8601 date
    or time. The one rule, for the CLI and MCP alike: a date or time without a zone is the local time
    of the machine lorekeeper runs on (what a person at that machine means); ``Z`` or ``+02:00``
    names another zone."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"modified_after={value!r} is not a date")
    not_a_date = ValueError(
        f"{value!r:.80} is not a date: use ISO 8601 (2026-05-01, 2026-05-01T12:00, 2026-05-01T12:00Z) "
        "or seconds since 1970"
    )
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return _iso_timestamp(text, not_a_date)
    if not math.isfinite(number):
        raise not_a_date
    return number


def _iso_timestamp(text: str, not_a_date: ValueError) -> float:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.astimezone()  # local time of this machine
        return parsed.astimezone(timezone.utc).timestamp()
    except (
        ValueError,
        OverflowError,
        OSError,
    ):  # also a date so near year 1 or 9999 that a zone overflows it
        raise not_a_date from None
