"""Grounded generation: answer a question from the user's indexed documents, with citations.

Shared by the MCP ``generate`` tool and ``lorekeeper ask`` so both behave the same. The flow:
retrieve chunks, fit as many as the model's context window allows (counted with the model's own
tokenizer and chat template, lowest-ranked dropped first and reported), number them [1]..[n], let
the model answer, then check every citation in the answer against the numbered sources.

The question is never shortened: if it cannot fit together with the requested answer length, the
caller gets a ``PromptTooLongError`` saying by how much, rather than an answer to half a question.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorekeeper.plugins.base import ChatMessage, Embedder, Generator, PromptTooLongError

logger = logging.getLogger(__name__)

# The sources go in the system message and the question alone in the user turn: small models
# (SmolLM2-135M) answer the question asked far more often that way than when a long user turn ends
# with it (measured on the demo documents: "The answer is: 2." against the right sentence).
GROUNDED_SYSTEM = (
    "You are a helpful assistant. Answer the user's question using the numbered sources below, "
    "and cite them like [1] or [2][3]. If the sources do not contain the answer, say that you do not know."
)
NO_SOURCES_NOTE = "No indexed document matched this question."

# [1], [2, 3], [4; 5], [1-3]: any bracketed list of numbers and ranges.
_CITATION = re.compile(r"\[\s*(\d+(?:\s*(?:[,;]|-|–|and)\s*\d+)*)\s*\]")
_NUMBER_OR_RANGE = re.compile(r"(\d+)\s*(?:[-–]\s*(\d+))?")
_MAX_RANGE = 50  # "[1-100000]" is noise, not 100000 citations


def describe_location(start_line: int | None, end_line: int | None, page: int | None) -> str:
    """Where in a file a chunk is, for people: ``line 4``, ``lines 3-9``, ``page 2``."""
    parts = []
    if page is not None:
        parts.append(f"page {page}")
    if start_line is not None:
        end = end_line if end_line is not None else start_line
        parts.append(f"line {start_line}" if end == start_line else f"lines {start_line}-{end}")
    return ", ".join(parts)


@dataclass
class Source:
    """A retrieved chunk as it was shown to the model, under its citation number."""

    number: int
    path: str
    text: str
    score: float
    rank: int
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None
    heading_path: list[str] = field(default_factory=list)
    tokens: int = 0

    @property
    def location(self) -> str:
        return describe_location(self.start_line, self.end_line, self.page)

    def label(self) -> str:
        bits = [self.path]
        if self.location:
            bits.append(f"({self.location})")
        if self.heading_path:
            bits.append("> " + " > ".join(self.heading_path))
        return " ".join(bits)


@dataclass
class DroppedChunk:
    """A retrieved chunk left out of the prompt, and why."""

    path: str
    rank: int
    tokens: int
    reason: str
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None


@dataclass
class PreparedPrompt:
    """Everything decided before the model runs: the messages and which chunks made it in."""

    question: str
    messages: list[ChatMessage]
    sources: list[Source]
    dropped: list[DroppedChunk]
    prompt_tokens: int
    max_tokens: int
    context_window: int
    use_context: bool
    retrieved: int = 0


@dataclass
class GroundedAnswer:
    answer: str
    sources: list[Source]  # every source shown to the model, numbered
    cited: list[int]  # source numbers the answer cites that exist
    invalid_citations: list[int]  # numbers the answer cites that point to no source
    dropped: list[DroppedChunk]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    use_context: bool
    seconds: float
    first_token_seconds: float | None
    model: str
    adapter: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def cited_sources(self) -> list[Source]:
        wanted = set(self.cited)
        return [s for s in self.sources if s.number in wanted]


# ---------------------------------------------------------------------------- citations


def parse_citations(answer: str) -> list[int]:
    """Every source number the answer cites, in order of first appearance."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        for num in _NUMBER_OR_RANGE.finditer(match.group(1)):
            start = int(num.group(1))
            end = int(num.group(2)) if num.group(2) else start
            if end < start or end - start > _MAX_RANGE:
                end = start
            for n in range(start, end + 1):
                if n not in seen:
                    seen.append(n)
    return seen


def check_citations(answer: str, source_count: int) -> tuple[list[int], list[int]]:
    """Split the answer's citations into (valid, pointing to no source)."""
    numbers = parse_citations(answer)
    valid = [n for n in numbers if 1 <= n <= source_count]
    invalid = [n for n in numbers if not 1 <= n <= source_count]
    return valid, invalid


# ---------------------------------------------------------------------------- prompt building


def _source_block(number: int, hit: Any) -> str:
    src = _to_source(number, hit, 0)
    return f"[{number}] {src.label()}\n{hit.text.strip()}"


def _to_source(number: int, hit: Any, tokens: int) -> Source:
    return Source(
        number=number,
        path=str(hit.path),
        text=hit.text,
        score=float(hit.score),
        rank=int(getattr(hit, "rank", number)),
        start_line=getattr(hit, "start_line", None),
        end_line=getattr(hit, "end_line", None),
        page=getattr(hit, "page", None),
        heading_path=list(getattr(hit, "heading_path", None) or []),
        tokens=tokens,
    )


def _grounded_messages(question: str, blocks: Sequence[str], system: str | None) -> list[ChatMessage]:
    system_text = GROUNDED_SYSTEM if not system else f"{GROUNDED_SYSTEM}\n\n{system}"
    sources = "\n\n".join(blocks) if blocks else NO_SOURCES_NOTE
    return [ChatMessage("system", f"{system_text}\n\nSources:\n\n{sources}"), ChatMessage("user", question)]


def _plain_messages(question: str, system: str | None) -> list[ChatMessage]:
    # No system message of our own: the model's chat template supplies its default one, exactly as
    # when fine-tuning data without a system turn was formatted, so an adapter sees what it learnt on.
    if system:
        return [ChatMessage("system", system), ChatMessage("user", question)]
    return [ChatMessage("user", question)]


def build_prompt(
    question: str,
    hits: Sequence[Any],
    generator: Generator,
    *,
    max_tokens: int,
    system: str | None = None,
    use_context: bool = True,
) -> PreparedPrompt:
    """Fit the question and as many hits (in rank order) as the context window allows.

    ``hits`` are search results (anything with ``path``, ``text``, ``score`` and optionally
    ``rank``, ``start_line``, ``end_line``, ``page``, ``heading_path``), best first.
    """
    question = question.strip()
    if not question:
        raise ValueError("the question is empty: ask something")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    window = generator.context_window
    if use_context:
        bare = _grounded_messages(question, [], system)
    else:
        bare = _plain_messages(question, system)
    bare_tokens = generator.count_message_tokens(bare)
    if bare_tokens + max_tokens > window:
        if bare_tokens >= window:
            raise PromptTooLongError(
                f"the question takes {bare_tokens} tokens with its instructions, but the model's context "
                f"window is {window} tokens: shorten the question (it is never cut silently)"
            )
        raise PromptTooLongError(
            f"the question takes {bare_tokens} tokens with its instructions and max_tokens asks for "
            f"{max_tokens} more, but the context window is {window} tokens: lower max_tokens to at most "
            f"{window - bare_tokens} or shorten the question"
        )
    if not use_context:
        return PreparedPrompt(question, bare, [], [], bare_tokens, max_tokens, window, False)

    budget = window - max_tokens
    blocks: list[str] = []
    kept: list[tuple[Any, int]] = []
    dropped: list[DroppedChunk] = []
    prompt_tokens = bare_tokens
    for hit in hits:
        number = len(kept) + 1
        block = _source_block(number, hit)
        candidate = _grounded_messages(question, [*blocks, block], system)
        tokens = generator.count_message_tokens(candidate)
        if tokens <= budget:
            blocks.append(block)
            kept.append((hit, tokens - prompt_tokens))
            prompt_tokens = tokens
        else:
            dropped.append(
                DroppedChunk(
                    path=str(hit.path),
                    rank=int(getattr(hit, "rank", 0)),
                    tokens=generator.count_tokens(block),
                    reason=f"did not fit: the prompt would take {tokens} of {budget} tokens "
                    f"({window}-token window minus {max_tokens} for the answer)",
                    start_line=getattr(hit, "start_line", None),
                    end_line=getattr(hit, "end_line", None),
                    page=getattr(hit, "page", None),
                )
            )
    messages = _grounded_messages(question, blocks, system)
    sources = [_to_source(i + 1, hit, tokens) for i, (hit, tokens) in enumerate(kept)]
    return PreparedPrompt(
        question, messages, sources, dropped, prompt_tokens, max_tokens, window, True, retrieved=len(hits)
    )


# ---------------------------------------------------------------------------- the whole flow


def retrieve_for(
    question: str,
    *,
    store: Any,
    embedder: Embedder,
    k: int,
    **filters: Any,
) -> list[Any]:
    """Search the index for the question (hybrid by default); filters go to ``search`` unchanged."""
    from lorekeeper.server.search import search

    return list(search(store, embedder, question, k=k, **filters))


def prepare(
    question: str,
    *,
    generator: Generator,
    store: Any = None,
    embedder: Embedder | None = None,
    k: int = 8,
    max_tokens: int = 256,
    system: str | None = None,
    use_context: bool = True,
    **filters: Any,
) -> PreparedPrompt:
    """Retrieve (when ``use_context``) and build the prompt; raises before any model time is spent."""
    if not question or not question.strip():
        raise ValueError("the question is empty: ask something")
    hits: list[Any] = []
    if use_context:
        if store is None or embedder is None:
            raise ValueError("grounded generation needs the index: pass store and embedder")
        hits = retrieve_for(question.strip(), store=store, embedder=embedder, k=k, **filters)
    return build_prompt(
        question, hits, generator, max_tokens=max_tokens, system=system, use_context=use_context
    )


def run(
    prepared: PreparedPrompt,
    generator: Generator,
    *,
    temperature: float = 0.2,
    adapter: str | None = None,
    on_token: Callable[[str], None] | None = None,
) -> GroundedAnswer:
    """Let the model answer the prepared prompt, streaming pieces to ``on_token``, then check citations."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    for piece in generator.stream(
        prepared.messages, max_tokens=prepared.max_tokens, temperature=temperature, adapter=adapter
    ):
        if first is None:
            first = time.perf_counter() - started
        pieces.append(piece)
        if on_token is not None:
            on_token(piece)
    seconds = time.perf_counter() - started
    answer = "".join(pieces).strip()
    completion_tokens = generator.count_tokens(answer)
    finish = "length" if completion_tokens >= prepared.max_tokens else "stop"
    valid, invalid = check_citations(answer, len(prepared.sources))
    warnings: list[str] = []
    if invalid:
        listed = ", ".join(f"[{n}]" for n in invalid)
        if prepared.sources:
            warnings.append(
                f"the answer cites {listed}, which point to no source (sources are [1]..[{len(prepared.sources)}])"
            )
        else:
            warnings.append(f"the answer cites {listed}, but no sources were given")
    if prepared.dropped:
        warnings.append(
            f"{len(prepared.dropped)} of {prepared.retrieved} retrieved chunks did not fit the context window "
            "and were left out (see dropped)"
        )
    if prepared.use_context and not prepared.sources:
        warnings.append(
            "no indexed chunk was given to the model: the answer is not grounded in your documents"
        )
    if finish == "length":
        warnings.append(f"the answer stopped at max_tokens={prepared.max_tokens}")
    adapter_warning = getattr(generator, "adapter_warning", None)
    if adapter is not None and adapter_warning is not None:
        note = adapter_warning(adapter)
        if note:
            warnings.append(note)
    return GroundedAnswer(
        answer=answer,
        sources=prepared.sources,
        cited=valid,
        invalid_citations=invalid,
        dropped=prepared.dropped,
        prompt_tokens=prepared.prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
        use_context=prepared.use_context,
        seconds=seconds,
        first_token_seconds=first,
        model=generator.model_id,
        adapter=adapter,
        warnings=warnings,
    )


def answer_question(
    question: str,
    *,
    generator: Generator,
    store: Any = None,
    embedder: Embedder | None = None,
    k: int = 8,
    max_tokens: int = 256,
    temperature: float = 0.2,
    adapter: str | None = None,
    system: str | None = None,
    use_context: bool = True,
    on_token: Callable[[str], None] | None = None,
    **filters: Any,
) -> GroundedAnswer:
    """Retrieve, fit, generate and check citations in one call."""
    prepared = prepare(
        question,
        generator=generator,
        store=store,
        embedder=embedder,
        k=k,
        max_tokens=max_tokens,
        system=system,
        use_context=use_context,
        **filters,
    )
    return run(prepared, generator, temperature=temperature, adapter=adapter, on_token=on_token)
