"""Base classes for the three plugin kinds: loaders, embedders and generators.

Each has one method a plugin must write; heavy models are loaded lazily on first use so that
listing plugins, or starting the server, costs nothing.
"""

from __future__ import annotations

import abc
import contextvars
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def word_spans(text: str) -> list[tuple[int, int]]:
    """Token spans without a tokenizer: one per run of word characters or per other symbol."""
    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window; the message says by how much."""


class LoaderError(Exception):
    """A file could not be turned into text. The message says why, for the index's error column."""


@dataclass
class TextUnit:
    """A piece of a file's text with where it came from.

    Offsets are character offsets into the file's extracted text (for plain text files that is the
    file itself decoded as UTF-8); lines are 1-based and inclusive; ``page`` is 1-based (PDF).
    """

    text: str
    char_start: int = 0
    char_end: int = 0
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None
    heading_path: list[str] = field(default_factory=list)
    kind: str = "text"  # "text", "paragraph", "section", "front_matter", "code", "page"


class LoadedText(list):
    """What ``Loader.load`` may return instead of a plain list: the units plus ``warnings``.

    It is a ``list`` of ``TextUnit`` so code written for ``list[TextUnit]`` keeps working; readers
    that care take ``getattr(result, "warnings", [])``. Warnings are things the user should know
    but that did not stop the load (a file that was not valid UTF-8, a PDF page that failed).
    """

    def __init__(self, units: Iterable[TextUnit] = (), warnings: Iterable[str] = ()) -> None:
        super().__init__(units)
        self.warnings: list[str] = list(warnings)


class Loader(abc.ABC):
    """Turns a file into text units.

    ``extensions`` are lower-case suffixes with the dot (".md"). ``name`` is recorded per document so
    that a change of loader re-indexes the file.
    """

    name: str = "loader"
    version: str = "1"
    extensions: tuple[str, ...] = ()
    # True when ``load`` reads the file only through ``lorekeeper.plugins.loaders._common``'s
    # ``read_bytes`` / ``read_text`` (every built-in loader): ``load_bytes`` then hands it the bytes
    # directly instead of through a temporary copy.
    reads_through_read_bytes: bool = False

    @abc.abstractmethod
    def load(self, path: Path) -> list[TextUnit]:
        """Read ``path`` and return its text units; raise ``LoaderError`` with a clear reason.

        Return a ``LoadedText`` (a list subclass) to pass warnings along with the units.
        """

    def load_bytes(self, data: bytes, path: Path) -> list[TextUnit]:
        """Extract text from ``data``, the bytes of ``path`` that the caller already read and checked.

        The file is not opened again by name (it may have been swapped for a link since it was
        checked). Loaders that read through ``read_bytes`` get the bytes directly; any other loader
        reads a private temporary copy that keeps the file's name (its extension may matter), and
        the copy's path is replaced by ``path`` in its messages.
        """
        path = Path(path)
        if self.reads_through_read_bytes:
            token = _SUPPLIED.set((str(path), data))
            try:
                return self.load(path)
            finally:
                _SUPPLIED.reset(token)
        folder = tempfile.mkdtemp(prefix="lorekeeper-load-")  # mode 0700: no one else can swap it
        copy = os.path.join(folder, path.name or "document")
        try:
            with open(copy, "xb") as handle:
                handle.write(data)
            try:
                units = self.load(Path(copy))
            except LoaderError as exc:
                raise LoaderError(str(exc).replace(copy, str(path))) from exc
            warnings = getattr(units, "warnings", None)
            if warnings:
                units.warnings = [w.replace(copy, str(path)) for w in warnings]
            return units
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# (path, bytes) handed to ``read_bytes`` by ``Loader.load_bytes`` for the load in progress
_SUPPLIED: contextvars.ContextVar[tuple[str, bytes] | None] = contextvars.ContextVar(
    "lorekeeper_supplied_bytes", default=None
)


def supplied_bytes(path: Path | str) -> bytes | None:
    """The bytes ``Loader.load_bytes`` supplied for ``path``, if a load of that file is in progress."""
    supplied = _SUPPLIED.get()
    if supplied is not None and supplied[0] == str(path):
        return supplied[1]
    return None


class Embedder(abc.ABC):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    model_id: str = "embedder"
    dimension: int = 0
    max_tokens: int = 256  # the model's window, in its own tokens

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension), dtype float32, rows of unit length."""

    def embed_query(self, text: str) -> np.ndarray:
        """Embed a search query; models with a query prefix override this."""
        return self.embed([text])[0]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's tokenizer; the rough default is words * 4/3."""
        return max(1, int(len(text.split()) * 4 / 3))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the tokens of ``text``, so chunks can be cut to fit the
        window exactly. The default counts runs of word characters and single symbols."""
        return word_spans(text)


@dataclass
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    extra: dict[str, Any] = field(default_factory=dict)


class Generator(abc.ABC):
    """Answers chat messages, streaming text pieces as they are produced.

    ``sampling_options`` names the keyword arguments beyond the basic ones that ``stream`` accepts
    (``top_p``, ``min_p``, ``repeat_penalty``, ``adapter_scale``); callers pass only those. A
    generator that applies LoRA adapters sets ``supports_adapters`` and overrides the three adapter
    methods below.
    """

    name: str = "generator"
    model_id: str = "generator"
    supports_adapters: bool = False
    sampling_options: tuple[str, ...] = ()

    @property
    def context_window(self) -> int:
        """Tokens the model can attend to, prompt and answer together."""
        return 2048

    @abc.abstractmethod
    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 256,
        temperature: float = 0.2,
        adapter: str | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the answer as they are generated."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's tokenizer; the rough default is words * 4/3."""
        return max(1, int(len(text.split()) * 4 / 3))

    def check_adapter(self, name: str) -> Path:
        """The file of adapter ``name``; raises ``LookupError`` (unknown) or ``ValueError`` (cannot)."""
        raise ValueError(
            f"the {self.name} generator cannot apply adapter {name!r}: use the llamacpp generator"
        )

    def runs_base_of(self, name: str) -> bool | None:
        """Whether this generator runs the base model adapter ``name`` was trained on (None: unknown)."""
        return None

    def adapter_warning(self, name: str) -> str | None:
        """A warning to attach to answers made with adapter ``name``, if any."""
        return None

    def close(self) -> None:
        """Free the model (a worker process, a connection); the generator may be used again later."""
        return None

    def count_message_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the chat-formatted ``messages`` take, template included."""
        return sum(self.count_tokens(m.content) + 8 for m in messages) + 4

    def generate(self, messages: Sequence[ChatMessage], **kwargs: Any) -> GenerationResult:
        pieces = list(self.stream(messages, **kwargs))
        text = "".join(pieces)
        return GenerationResult(
            text=text,
            prompt_tokens=self.count_message_tokens(messages),
            completion_tokens=self.count_tokens(text) if text else 0,
            finish_reason="stop",
        )
