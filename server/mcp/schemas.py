"""The shapes of what the MCP tools return (pydantic models: the structured output's schema).

``ask --json`` prints a ``GenerateResult`` too, built by ``generate_result``, so the CLI and MCP
agree field for field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..render import describe_location


class Hit(BaseModel):
    rank: int = Field(description="1 = best match")
    score: float = Field(description="fused relevance score; higher is better, comparable within one query")
    path: str = Field(description="absolute path of the file")
    uri: str = Field(description="resource URI to read the whole document")
    location: str = Field(description="where in the file: lines or page")
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None
    heading_path: list[str] = Field(default_factory=list, description="section headings above the chunk")
    text: str


class RetrieveResult(BaseModel):
    query: str
    mode: str
    hits: list[Hit]


class SourceOut(BaseModel):
    number: int = Field(description="the citation number [n] the model saw")
    path: str
    uri: str
    location: str
    start_line: int | None = None
    end_line: int | None = None
    page: int | None = None
    heading_path: list[str] = Field(default_factory=list)
    score: float
    cited: bool = Field(description="whether this source supports a sentence of the answer")
    support: str | None = Field(
        default=None, description="the passage of this source that supports the answer"
    )
    text: str


class SpanOut(BaseModel):
    source: int = Field(description="the source number")
    text: str = Field(description="the passage of the source that supports the sentence")
    start: int = Field(description="character offset of the passage in the source's text")
    end: int


class SentenceOut(BaseModel):
    text: str
    claim: bool = Field(description="false for sentences too short to state anything checkable")
    supported_by: list[int] = Field(description="sources that support this sentence, best first")
    markers: list[int] = Field(description="source numbers the model cited on this sentence")
    flagged: list[int] = Field(description="cited sources that do not support this sentence")
    added: list[int] = Field(description="markers lorekeeper added where a source supports the sentence")
    span: SpanOut | None = None


class DroppedOut(BaseModel):
    path: str
    rank: int
    tokens: int
    reason: str


class GenerateResult(BaseModel):
    answer: str
    sources: list[SourceOut] = Field(description="every source given to the model, numbered")
    cited: list[int] = Field(description="sources that support a sentence of the answer")
    flagged_citations: list[int] = Field(
        default_factory=list, description="sources the model cited for sentences they do not support"
    )
    invalid_citations: list[int] = Field(description="numbers the model wrote that point to no source")
    supported: bool | None = Field(
        default=None,
        description="whether any sentence of the answer is supported by a source (null: no sources)",
    )
    fallback: bool = Field(
        default=False,
        description="the answer quotes the passage that best matches the question instead of the model's "
        "answer, which no source supported or which was beside the question (see warnings)",
    )
    sentences: list[SentenceOut] = Field(default_factory=list, description="each sentence and its support")
    generated: str = Field(default="", description="the model's own text, before the check")
    dropped: list[DroppedOut] = Field(
        description="retrieved chunks left out because the context window was full"
    )
    warnings: list[str]
    used_context: bool
    model: str
    adapter: str | None = None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float


class RootOut(BaseModel):
    path: str
    documents: int
    chunks: int
    failed: int
    skipped: int
    watched: bool


class FailedOut(BaseModel):
    path: str
    status: str
    reason: str


class AdapterOut(BaseModel):
    name: str = Field(description="pass it as generate's adapter")
    base_model: str | None = Field(default=None, description="the base model it was fine-tuned on")
    architecture: str | None = None
    created: str | None = None
    description: str | None = Field(default=None, description="what the adapter was trained for")
    runs_on_server_model: bool | None = Field(
        default=None,
        description="whether this server's model is that base (null: the adapter does not say)",
    )


class EvaluationOut(BaseModel):
    kind: str = Field(description="retrieval or answers")
    date: str = Field(description="when it ran (UTC)")
    summary: str = Field(description="its result in one line")
    uri: str = Field(description="resource URI of the whole report (Markdown)")


class IndexStatusOut(BaseModel):
    db_path: str
    roots: list[RootOut]
    documents: int
    chunks: int
    pending: int = Field(description="file changes waiting to be indexed")
    failed: list[FailedOut] = Field(description="files that could not be indexed, with reasons")
    last_change: str | None = Field(description="ISO time of the last change to the index")
    embed_model: str | None
    watcher_running: bool
    watcher_error: str | None = Field(
        default=None, description="why the index is not kept live, if it is not"
    )
    adapters: list[AdapterOut] = Field(
        default_factory=list, description="fine-tuned LoRA adapters generate can apply"
    )
    evaluations: list[EvaluationOut] = Field(
        default_factory=list, description="the last `lorekeeper eval` of each kind run on this index"
    )


class FolderResult(BaseModel):
    path: str
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0


def doc_uri(path: str) -> str:
    from .documents import doc_uri as uri

    return uri(path)


def hit_out(rank: int, hit: Any) -> Hit:
    return Hit(
        rank=rank,
        score=float(hit.score),
        path=hit.path,
        uri=doc_uri(hit.path),
        location=hit.location,
        start_line=hit.start_line,
        end_line=hit.end_line,
        page=hit.page,
        heading_path=list(hit.heading_path or []),
        text=hit.text,
    )


def generate_result(answer: Any) -> GenerateResult:
    """A ``generation.GroundedAnswer`` as the structured result of ``generate`` / ``ask --json``."""
    cited = set(answer.cited)
    spans = answer.check.spans() if answer.check is not None else {}
    if getattr(answer, "fallback_span", None) is not None:
        spans[answer.fallback_span.source] = answer.fallback_span
    sentences = []
    for s in answer.check.sentences if answer.check is not None else []:
        span = (
            SpanOut(source=s.span.source, text=s.span.text, start=s.span.start, end=s.span.end)
            if s.span
            else None
        )
        sentences.append(
            SentenceOut(
                text=s.text,
                claim=s.claim,
                supported_by=s.supported_by,
                markers=s.markers,
                flagged=s.flagged,
                added=s.added,
                span=span,
            )  # fmt: skip
        )
    return GenerateResult(
        answer=answer.answer,
        sources=[
            SourceOut(
                number=s.number,
                path=s.path,
                uri=doc_uri(s.path),
                location=describe_location(s.start_line, s.end_line, s.page),
                start_line=s.start_line,
                end_line=s.end_line,
                page=s.page,
                heading_path=s.heading_path,
                score=s.score,
                cited=s.number in cited,
                support=spans[s.number].text if s.number in spans else None,
                text=s.text,
            )
            for s in answer.sources
        ],
        cited=answer.cited,
        flagged_citations=answer.flagged_citations,
        invalid_citations=answer.invalid_citations,
        supported=answer.supported,
        fallback=answer.fallback,
        sentences=sentences,
        generated=answer.streamed_text.strip(),
        dropped=[
            DroppedOut(path=d.path, rank=d.rank, tokens=d.tokens, reason=d.reason) for d in answer.dropped
        ],
        warnings=answer.warnings,
        used_context=answer.use_context,
        model=answer.model,
        adapter=answer.adapter,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        finish_reason=answer.finish_reason,
        seconds=round(answer.seconds, 3),
    )
