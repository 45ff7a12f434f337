"""Grounded generation: answer a question from the user's indexed documents, with checked citations.

Shared by the MCP ``generate`` tool and ``lorekeeper ask`` so both behave the same. The flow:
retrieve chunks; keep, of those, the ``context_sentences`` sentences closest to the question
(small models answer better from a short, focused context; the check below still reads the whole
passages); fit as many as the model's context window allows (counted with the model's own
tokenizer and chat template, lowest-ranked dropped first and reported); number them [1]..[n]; let
the model answer, stopping it if it starts to loop; then check every sentence of the answer
against the sources (``citations.check_answer``). A source is *cited* only when it supports a
sentence. An answer none of whose sentences is supported is not presented as sourced: it says the
documents do not hold the answer, or (the ``extractive_fallback`` setting) quotes the passage that
best answers the question.

The question is never shortened: if it cannot fit together with the requested answer length, the
caller gets a ``PromptTooLongError`` saying by how much, rather than an answer to half a question.

Document text is data, not instructions: the sources travel in the user turn, each fenced as
``<source id="n" ...>`` with anything that looks like a fence inside it neutralised, and the system
turn only tells the model how to use them. A model that starts copying the fences back is cut there.

The module is one flow over two shared types (``PreparedPrompt`` in, ``GroundedAnswer`` out), so
it stays one file at about 650 lines (with the turns that frame a question: an adapter's prompt, a chat's
history); the sentence-level checking lives in ``citations``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from lorekeeper.plugins.base import ChatMessage, Embedder, Generator, PromptTooLongError

from . import citations
from .render import describe_location
from .settings import Settings

logger = logging.getLogger(__name__)

GROUNDED_SYSTEM = (
    "You answer questions using only the numbered sources in the user's message. Answer in one to "
    "three sentences, copy the facts exactly as the sources state them, and put the source number "
    "after each fact, like [1]. Do not list the sources at the end. If the sources do not contain the "
    "answer, say: I could not find that in your documents."
)
NO_SOURCES_NOTE = "(no indexed document matched this question)"
NOT_FOUND = "I could not find that in your documents."
FALLBACK_PREFIX = "The closest passage in your documents"

__all__ = ["PromptTooLongError", "answer_question", "build_prompt", "prepare", "run"]


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
    answer: str  # what to show: the checked answer (see the module docstring)
    sources: list[Source]  # every source shown to the model, numbered
    cited: list[int]  # sources that support a sentence of the answer
    invalid_citations: list[int]  # numbers the model wrote that point to no source
    dropped: list[DroppedChunk]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "loop"
    use_context: bool
    seconds: float
    first_token_seconds: float | None
    model: str
    adapter: str | None = None
    warnings: list[str] = field(default_factory=list)
    streamed_text: str = ""  # what the model produced, as it streamed
    check: citations.CheckedAnswer | None = None  # per-sentence support (grounded answers)
    supported: bool | None = None  # whether a source supports the answer (None: nothing to check)
    fallback: bool = False  # the answer is a quoted passage, the model's answer being unsupported
    fallback_span: citations.Span | None = None  # that passage

    @property
    def flagged_citations(self) -> list[int]:
        return list(self.check.flagged) if self.check else []

    @property
    def cited_sources(self) -> list[Source]:
        wanted = set(self.cited)
        return [s for s in self.sources if s.number in wanted]


# ---------------------------------------------------------------------------- prompt building


def _fence(text: str) -> str:
    """Document text with anything that could close or open our fences made harmless."""
    return re.sub(r"</?\s*(source|sources|system|user|assistant|tool[\w-]*)\b", r"‹\1", text, flags=re.I)


def source_block(number: int, hit: Any) -> str:
    """A retrieved passage as the model sees it: ``<source id="n" file=... location=...>`` around
    its text, fences inside it defused. The MCP prompt ``answer_from_documents`` uses it too."""
    src = _to_source(number, hit, 0)
    where = f' location="{src.location}"' if src.location else ""
    section = f' section="{_fence(" > ".join(src.heading_path))}"' if src.heading_path else ""
    shown = getattr(hit, "shown_text", hit.text)
    return f'<source id="{number}" file="{_fence(src.path)}"{where}{section}>\n{_fence(shown.strip())}\n</source>'


class _Focused:
    """A retrieved hit shown to the model as a few of its sentences (``shown_text``); everything
    else, the full ``text`` that answers are checked against included, is the hit's own."""

    def __init__(self, hit: Any, shown_text: str) -> None:
        self._hit = hit
        self.shown_text = shown_text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hit, name)


FOCUS_KEEP = 0.6  # a sentence is shown when it scores at least this share of the best one's score


def focus_hits(question: str, hits: Sequence[Any], count: int, embedder: Embedder | None) -> list[Any]:
    """The hits cut down to at most ``count`` sentences, over all of them, closest to the question
    (``citations.rank_sentences``; sentences far below the best one are left out too), each hit's
    in their own order, neighbours joined and gaps marked with "…"; hits with none left out. All
    the hits, whole, when no sentence relates to the question."""
    ranked = citations.rank_sentences(question, [h.text for h in hits], embedder)
    if count <= 0 or not ranked:
        return list(hits)
    floor = ranked[0].score * FOCUS_KEEP if ranked[0].score > 0 else float("-inf")
    chosen: dict[int, list[citations.Span]] = {}
    for span in ranked[:count]:
        if span.score >= floor:
            chosen.setdefault(span.source, []).append(span)
    focused = []
    for number, hit in enumerate(hits, start=1):
        if number in chosen:
            focused.append(_Focused(hit, _joined(hit.text, sorted(chosen[number], key=lambda s: s.start))))
    return focused


def _joined(text: str, spans: Sequence[citations.Span]) -> str:
    """The spans of ``text`` as one paragraph: sentences that follow each other run on, a gap
    between two is shown as "…"."""
    out = ""
    for i, span in enumerate(spans):
        piece = " ".join(span.text.split())
        if i and text[spans[i - 1].end : span.start].strip():
            out += " … "
        elif i:
            out += " "
        out += piece
    return out


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


@dataclass
class Turns:
    """What frames the question besides the sources: ``persona`` opens the system turn (an adapter's
    training system prompt, see ``adapter_turns``), ``system`` is extra instructions after the
    retrieval ones, ``history`` the earlier turns of a chat."""

    system: str | None = None
    persona: str | None = None
    history: Sequence[ChatMessage] = ()


def _grounded_messages(question: str, blocks: Sequence[str], turns: Turns) -> list[ChatMessage]:
    system_text = GROUNDED_SYSTEM if not turns.system else f"{GROUNDED_SYSTEM}\n\n{turns.system}"
    if turns.persona:
        system_text = f"{turns.persona}\n\n{system_text}"
    sources = "\n\n".join(blocks) if blocks else NO_SOURCES_NOTE
    user = f"Sources:\n\n{sources}\n\nQuestion: {question}"
    return [ChatMessage("system", system_text), *turns.history, ChatMessage("user", user)]


def _plain_messages(question: str, turns: Turns) -> list[ChatMessage]:
    # No system message of our own: the model's chat template supplies its default one, exactly as
    # when fine-tuning data without a system turn was formatted, so an adapter sees what it learnt on.
    system = turns.persona or turns.system
    opening = [ChatMessage("system", system)] if system else []
    return [*opening, *turns.history, ChatMessage("user", question)]


def adapter_turns(record: Any, system: str | None, history: Sequence[ChatMessage] = ()) -> Turns:
    """How an adapter is asked: its record's training system prompt opens the system turn, as in
    training (with retrieval, the retrieval instructions follow it); ``system`` given by the user
    replaces it (an empty one: no system turn). ``record`` None: the user's ``system`` as before."""
    if record is None:
        return Turns(system=system, history=history)
    return Turns(persona=system if system is not None else record.system_prompt, history=history)


def build_prompt(
    question: str,
    hits: Sequence[Any],
    generator: Generator,
    *,
    max_tokens: int,
    system: str | None = None,
    use_context: bool = True,
    turns: Turns | None = None,
) -> PreparedPrompt:
    """Fit the question and as many hits (in rank order) as the context window allows.

    ``hits`` are search results (anything with ``path``, ``text``, ``score`` and optionally
    ``rank``, ``start_line``, ``end_line``, ``page``, ``heading_path``), best first. ``turns``
    (persona, history) replaces ``system`` when given.
    """
    turns = turns or Turns(system=system)
    question = question.strip()
    if not question:
        raise ValueError("the question is empty: ask something")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    window = generator.context_window
    bare = _grounded_messages(question, [], turns) if use_context else _plain_messages(question, turns)
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
        block = source_block(len(kept) + 1, hit)
        tokens = generator.count_message_tokens(_grounded_messages(question, [*blocks, block], turns))
        if tokens <= budget:
            blocks.append(block)
            kept.append((hit, tokens - prompt_tokens))
            prompt_tokens = tokens
            continue
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
    messages = _grounded_messages(question, blocks, turns)
    sources = [_to_source(i + 1, hit, tokens) for i, (hit, tokens) in enumerate(kept)]
    return PreparedPrompt(
        question, messages, sources, dropped, prompt_tokens, max_tokens, window, True, retrieved=len(hits)
    )


# ---------------------------------------------------------------------------- loops


_WORDLIKE = re.compile(r"[^\W_]")  # a letter or digit


class LoopGuard:
    """Spots an answer that has started repeating itself, so generation can stop there.

    Small models, greedy or nearly so, fall into cycles ("--env_name=myenv --env_name=myenv ...")
    or write the same paragraph again (SmolLM2, on json.dumps: 55 words twice). A cycle is the same
    run of 1 to 200 words three times in a row (a run of 6 words or more: twice in a row, which a
    sensible answer never does). ``cut`` is where the repetition began.
    """

    MAX_PERIOD = 200

    def __init__(self) -> None:
        self.text = ""
        self.cut: int | None = None

    def feed(self, piece: str) -> bool:
        """Add a piece of the answer; True once a loop is found."""
        self.text += piece
        if self.cut is None:
            self.cut = self._find()
        return self.cut is not None

    def _find(self) -> int | None:
        # only words count: the "|" and "---" of a table's rows repeat in every sensible table
        words = [
            (m.start(), m.group(0).lower())
            for m in re.finditer(r"\S+", self.text)
            if _WORDLIKE.search(m.group(0))
        ]
        n = len(words)
        exact = [w for _, w in words]
        # a long run is compared without the punctuation around its words: a paragraph written again
        # may end "structures that..." where the first ended "structures." ("very, very, very old"
        # stays a phrase: short runs are compared as written)
        loose = [w.strip(".,;:!?\"'()[]`*") for w in exact]
        for period in range(1, min(self.MAX_PERIOD, n // 2) + 1):
            repeats = 3 if period < 6 else 2
            tokens = exact if period < 6 else loose
            if period * repeats > n or tokens[n - 1] != tokens[n - 1 - period]:
                continue  # too short to hold it, or the last word already differs
            tail = tokens[n - period :]
            if all(tokens[n - period * r : n - period * (r - 1)] == tail for r in range(2, repeats + 1)):
                if len(set(tail)) == 1 and period > 1:
                    continue  # counted at its own period
                return words[n - period * (repeats - 1)][0]
        return None


# ---------------------------------------------------------------------------- the whole flow


def retrieve_for(question: str, *, store: Any, embedder: Embedder, k: int, **filters: Any) -> list[Any]:
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
    settings: Settings | None = None,
    turns: Turns | None = None,
    **filters: Any,
) -> PreparedPrompt:
    """Retrieve (when ``use_context``) and build the prompt; raises before any model time is spent."""
    if not question or not question.strip():
        raise ValueError("the question is empty: ask something")
    hits: list[Any] = []
    if use_context:
        if store is None or embedder is None:
            raise ValueError("grounded generation needs the index: pass store and embedder")
        if settings is not None:
            filters = {"vector_weight": settings.vector_weight, "keyword_weight": settings.keyword_weight,
                       "rrf_k": settings.rrf_k, **filters}  # fmt: skip
        hits = retrieve_for(question.strip(), store=store, embedder=embedder, k=k, **filters)
        if settings is not None and settings.context_sentences > 0 and hits:
            hits = focus_hits(question.strip(), hits, settings.context_sentences, embedder)
    return build_prompt(
        question, hits, generator, max_tokens=max_tokens, system=system, use_context=use_context, turns=turns
    )


def sampling_for(
    generator: Generator,
    settings: Settings,
    temperature: float | None,
    defaults: dict[str, float] | None = None,
    adapter_scale: float | None = None,
) -> dict[str, Any]:
    """The sampling arguments ``generator.stream`` takes: temperature plus the options it declares.

    Each value comes from, first to last: the request (``temperature``, a command-line flag), an
    adapter's record (``defaults``), the settings (environment, config file, defaults)."""
    defaults = defaults or {}

    def pick(name: str) -> Any:
        if settings.sources.get(name) == "flag" or name not in defaults:
            return getattr(settings, name)
        return defaults[name]

    options: dict[str, Any] = {"temperature": pick("temperature") if temperature is None else temperature}
    for name in ("top_p", "min_p", "repeat_penalty"):
        if name in generator.sampling_options:
            options[name] = pick(name)
    if adapter_scale is not None and "adapter_scale" in generator.sampling_options:
        options["adapter_scale"] = float(adapter_scale)
    return options


def _generate(
    prepared: PreparedPrompt,
    generator: Generator,
    sampling: dict[str, Any],
    adapter: str | None,
    on_token: Callable[[str], None] | None,
) -> tuple[str, str, float, float | None]:
    """Stream the model's answer, stopping at a loop: (text, finish reason, seconds, first token)."""
    started = time.perf_counter()
    first: float | None = None
    guard = LoopGuard()
    finish = "stop"
    stop = answer_stops(prepared) if prepared.use_context else None
    stream = generator.stream(
        prepared.messages, max_tokens=prepared.max_tokens, adapter=adapter, stop=stop, **sampling
    )
    with closing(stream):  # stopping early (a loop, a client gone, an error) frees the model at once
        for piece in stream:
            if first is None:
                first = time.perf_counter() - started
            if on_token is not None:
                on_token(piece)
            if guard.feed(piece):
                finish = "loop"
                break
            if stop and _stop_at(guard.text, stop) is not None:
                break  # a generator that ignores ``stop`` (some servers do) is cut here all the same
    end = _stop_at(guard.text, stop or [])
    text = guard.text[: min(x for x in (guard.cut, end, len(guard.text)) if x is not None)]
    return text, finish, time.perf_counter() - started, first


# HTML that a small model trained on web pages drifts into after its answer ("</pre>", a <script>
# block: 12 of SmolLM2's 84 manual-page answers); never what was asked when the sources hold none
STRAY_MARKUP = ("<pre", "</pre", "<script", "</script", "<div", "</div", "<span", "</span", "<html",
                "<body", "<style", "<iframe", "<br", "<img", "<table", "<a href", "</a>", "<p>", "</p>")  # fmt: skip


def answer_stops(prepared: PreparedPrompt) -> list[str]:
    """Where an answer from sources ends: where a small model starts copying the fenced sources
    back, or starts writing HTML markup that none of the sources holds."""
    held = "\n".join(s.text for s in prepared.sources).lower()
    return ["<source", "</source"] + [tag for tag in STRAY_MARKUP if tag not in held]


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def run(
    prepared: PreparedPrompt,
    generator: Generator,
    *,
    temperature: float | None = None,
    adapter: str | None = None,
    on_token: Callable[[str], None] | None = None,
    settings: Settings | None = None,
    embedder: Embedder | None = None,
    sampling: dict[str, Any] | None = None,
) -> GroundedAnswer:
    """Let the model answer the prepared prompt, streaming pieces to ``on_token``, then check it
    (``embedder``, the index's, lets the extractive fallback rank passages by meaning).
    ``sampling``, when given, is what ``sampling_for`` chose (``temperature`` is then unused)."""
    settings = settings or Settings.load()
    sampling = sampling or sampling_for(generator, settings, temperature)
    raw, finish, seconds, first = _generate(prepared, generator, sampling, adapter, on_token)
    completion_tokens = generator.count_tokens(raw)
    if finish == "stop" and completion_tokens >= prepared.max_tokens:
        finish = "length"
    result = GroundedAnswer(
        answer=raw.strip(),
        sources=prepared.sources,
        cited=[],
        invalid_citations=[],
        dropped=prepared.dropped,
        prompt_tokens=prepared.prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
        use_context=prepared.use_context,
        seconds=seconds,
        first_token_seconds=first,
        model=generator.model_id,
        adapter=adapter,
        streamed_text=raw,
    )
    if prepared.use_context:
        _check_grounding(result, prepared, settings.extractive_fallback, embedder)
    _add_warnings(result, prepared, generator)
    return result


OFF_QUESTION_MARGIN = 0.1  # how much less closely than the best passage an answer may address the question


def _check_grounding(
    result: GroundedAnswer, prepared: PreparedPrompt, fallback: bool, embedder: Embedder | None
) -> None:
    """Check the answer's sentences against the sources; say so when nothing supports it.

    With the fallback on, a supported answer that addresses the question clearly less closely than
    the best sentence of the sources (a small model copying a true but beside-the-point sentence),
    or that no sentence of that best sentence's source supports (a true line of a neighbouring page),
    is replaced by that sentence too; unless that sentence itself holds every claim of the answer:
    a short answer ("A dangling link.") matches the question less closely than the sentence it
    comes from, yet says the same."""
    texts = [s.text for s in prepared.sources]
    check = citations.check_answer(result.answer, texts, question=prepared.question)
    result.check = check
    result.cited = check.cited
    result.invalid_citations = check.invalid
    result.supported = check.supported
    result.answer = check.text
    if not prepared.sources:
        return
    best = citations.best_sentence_for(prepared.question, texts, embedder) if fallback else None
    if check.supported:
        if best is not None and citations.says_the_same(check, prepared.question, best.text):
            return  # every claim held by that sentence: nothing left to warn about either
        supported = [c.text for c in check.claims if c.supported]
        answered = max(citations.relevance(prepared.question, supported, embedder))
        if embedder is not None and best is not None and answered < best.score - OFF_QUESTION_MARGIN:
            _quote(result, best, "the model's answer, though its sources support it, addresses the question "
                   "less closely than this passage, so the passage is quoted instead (the model said: ")  # fmt: skip
            return
        if best is not None and best.source not in check.cited:
            _quote(result, best, f"the model's answer does not draw on [{best.source}], the passage that best "
                   "matches the question, so that passage is quoted instead (the model said: ")  # fmt: skip
            return
        unsupported = [s for s in check.claims if not s.supported]
        if unsupported:
            result.warnings.append(
                f"{len(unsupported)} of {len(check.claims)} sentences of the answer are not supported by any source"
            )
        return
    if best is not None:
        why = ("the model's answer stops where it introduces what was asked" if check.unfinished and not check.claims
               else "no source supports the model's answer")  # fmt: skip
        _quote(
            result,
            best,
            f"{why}, so the passage that best matches the question is quoted instead (the model said: ",
        )
    else:
        result.answer = NOT_FOUND
        said = _short(result.streamed_text)
        if said and NOT_FOUND.lower() not in result.streamed_text.lower():
            result.warnings.append(f"no source supports the model's answer ({said})")


def _quote(result: GroundedAnswer, best: citations.Span, why: str) -> None:
    """Answer with the quoted passage ``best`` instead of the model's text."""
    result.answer = f'{FALLBACK_PREFIX} [{best.source}]: "{" ".join(best.text.split())}"'
    result.cited = [best.source]
    result.fallback = True
    result.fallback_span = best
    result.warnings.append(why + _short(result.streamed_text) + ")")


def _short(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return repr(flat[:limit] + ("…" if len(flat) > limit else ""))


def _add_warnings(result: GroundedAnswer, prepared: PreparedPrompt, generator: Generator) -> None:
    warnings = result.warnings
    if result.invalid_citations:
        listed = ", ".join(f"[{n}]" for n in result.invalid_citations)
        if prepared.sources:
            warnings.append(
                f"the answer cites {listed}, which point to no source (sources are [1]..[{len(prepared.sources)}])"
            )
        else:
            warnings.append(f"the answer cites {listed}, but no sources were given")
    if result.check is not None and result.check.flagged:
        listed = ", ".join(f"[{n}]" for n in result.check.flagged)
        warnings.append(f"the model cited {listed} for sentences those sources do not support")
    if result.check is not None and result.check.stripped_source_list:
        warnings.append(
            "the model wrote its own list of sources; it was removed (the real sources are listed)"
        )
    if prepared.dropped:
        warnings.append(
            f"{len(prepared.dropped)} of {prepared.retrieved} retrieved chunks did not fit the context window "
            "and were left out (see dropped)"
        )
    if prepared.use_context and not prepared.sources:
        warnings.append(
            "no indexed chunk was given to the model: the answer is not grounded in your documents"
        )
    if result.finish_reason == "length":
        warnings.append(f"the answer stopped at max_tokens={prepared.max_tokens}")
    if result.finish_reason == "loop":
        warnings.append("the model started repeating itself; the answer was cut where the repetition began")
    if result.adapter is not None:
        note = generator.adapter_warning(result.adapter)
        if note:
            warnings.append(note)


def answer_question(
    question: str,
    *,
    generator: Generator,
    store: Any = None,
    embedder: Embedder | None = None,
    k: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    adapter: str | None = None,
    system: str | None = None,
    use_context: bool = True,
    on_token: Callable[[str], None] | None = None,
    settings: Settings | None = None,
    adapters: Any = None,
    adapter_scale: float | None = None,
    history: Sequence[ChatMessage] = (),
    **filters: Any,
) -> GroundedAnswer:
    """Retrieve, fit, generate and check in one call; unset numbers come from ``settings``.

    With ``adapter`` and its registry ``adapters``, the adapter's record supplies the system prompt
    (``adapter_turns``) and the sampling the request and flags leave unset (``sampling_for``).
    ``history``: earlier turns of a chat, placed before the question."""
    settings = settings or Settings.load()
    record = adapters.read(adapter) if adapter is not None and adapters is not None else None
    turns = adapter_turns(record, system, history)
    defaults = dict(record.sampling) if record is not None else None
    sampling = sampling_for(generator, settings, temperature, defaults, adapter_scale)
    prepared = prepare(
        question,
        generator=generator,
        store=store,
        embedder=embedder,
        k=settings.k if k is None else k,
        max_tokens=settings.max_tokens if max_tokens is None else max_tokens,
        system=system,
        use_context=use_context,
        settings=settings,
        turns=turns,
        **filters,
    )
    return run(prepared, generator, adapter=adapter, on_token=on_token, settings=settings, embedder=embedder,
               sampling=sampling)  # fmt: skip
