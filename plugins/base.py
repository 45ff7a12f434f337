"""Base classes for the three plugin kinds: loaders, embedders and generators.

Each has one method a plugin must write; heavy models are loaded lazily on first use so that
listing plugins, or starting the server, costs nothing.
"""

from __future__ import annotations

import abc
import os
import re
import tempfile
import threading
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


class BinaryFileError(LoaderError):
    """A file named like text holds binary data."""


class TextLimitError(LoaderError):
    """A file holds more text than the index takes from one file (``max_chars_per_file``)."""


def check_text_limit(chars: int, max_chars: int | None, path: Path | str) -> None:
    """Raise ``TextLimitError`` when ``chars`` characters are over ``max_chars`` (None: no limit)."""
    if max_chars is not None and chars > max_chars:
        raise TextLimitError(
            f"{path}: more than {max_chars:,} characters of text; lorekeeper takes at most that much from "
            "one file (raise it with `lorekeeper config set max_chars_per_file N`, or split the file)"
        )


class Loader:
    """Turns a file into text units.

    ``extensions`` are lower-case suffixes with the dot (".md"). ``name`` is recorded per document so
    that a change of loader re-indexes the file. ``one_format`` says the extensions are spellings of
    one format (``.md``/``.markdown``), so a search filter on one of them takes them all; a loader
    for many formats (plain text, source code) leaves it False.

    A loader implements ``load_data`` (the bytes the indexer read and checked) or ``load`` (a path),
    or both. The indexer always calls ``load_data``: it opens each file once, checks that what it
    opened is a regular file inside a watched folder, and hands over those bytes, so a file swapped
    for a symlink between the check and the read cannot slip in. A loader written against ``load``
    alone gets a private copy of those bytes to read.
    """

    name: str = "loader"
    version: str = "1"
    extensions: tuple[str, ...] = ()
    one_format: bool = False

    def load(self, path: Path) -> list[TextUnit]:
        """Read ``path`` and return its text units; raise ``LoaderError`` with a clear reason.

        Return a ``LoadedText`` (a list subclass) to pass warnings along with the units.
        """
        if type(self).load_data is Loader.load_data:
            raise NotImplementedError(f"loader {self.name!r} implements neither load nor load_data")
        from .loaders._common import read_bytes

        return self.load_data(Path(path), read_bytes(Path(path)))

    def load_data(self, path: Path, data: bytes, *, max_chars: int | None = None) -> list[TextUnit]:
        """The text units of a file whose bytes are ``data``; ``path`` names it (its suffix may pick a
        dialect) and must not be opened again. Stop with ``TextLimitError`` (``check_text_limit``)
        once the text passes ``max_chars`` where the format allows extracting it piece by piece."""
        if type(self).load is Loader.load:
            raise NotImplementedError(f"loader {self.name!r} implements neither load nor load_data")
        with tempfile.TemporaryDirectory(prefix="lorekeeper-load-") as folder:  # mode 0700
            copy = Path(folder) / Path(path).name
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                units = self.load(copy)
            except LoaderError as exc:
                raise type(exc)(str(exc).replace(str(copy), str(path))) from exc
            warnings = getattr(units, "warnings", None)
            if warnings:  # messages name the user's file, not the private copy
                units.warnings = [w.replace(str(copy), str(path)) for w in warnings]
            return units


class QueryFirstLock:
    """A lock for a model that one thread at a time may call, where a search query goes before the
    indexer's next batch: ``with lock.hold(urgent=True)`` jumps the queue of ordinary waiters.

    A plain lock hands itself to whichever thread grabs it first, so an indexer that embeds batch
    after batch can keep a query waiting for minutes; with this lock a query waits for at most the
    one batch already running.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0

    def acquire(self, urgent: bool = False) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if urgent:
                self._urgent_waiting += 1
            try:
                while self._owner is not None or (not urgent and self._urgent_waiting):
                    self._cond.wait()
            finally:
                if urgent:
                    self._urgent_waiting -= 1
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a QueryFirstLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def hold(self, urgent: bool = False) -> _Held:
        return _Held(self, urgent)

    def __enter__(self) -> QueryFirstLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Held:
    def __init__(self, lock: QueryFirstLock, urgent: bool) -> None:
        self.lock, self.urgent = lock, urgent

    def __enter__(self) -> None:
        self.lock.acquire(self.urgent)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


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
