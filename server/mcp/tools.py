"""The MCP tools: ``retrieve``, ``generate``, ``index_status``, and (opt-in) ``add_folder`` /
``remove_folder``. Each is a thin face over the same functions the CLI uses: ``search.search``,
``generation.answer_question``, ``store.status``. Expected failures become ``ToolError`` with a
reason the assistant can act on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from lorekeeper.plugins.base import Generator

from .. import generation, render
from ..search import MAX_K, parse_since
from ..settings import Settings
from .progress import Cancelled, TokenRelay, unwrap
from .schemas import (
    AdapterOut,
    EvaluationOut,
    FailedOut,
    FolderResult,
    GenerateResult,
    IndexStatusOut,
    RetrieveResult,
    RootOut,
    generate_result,
    hit_out,
)
from .state import AppState, ServerOptions, app_state

logger = logging.getLogger(__name__)

MAX_GENERATE_TOKENS = 4096
EVAL_URI = "lorekeeper://eval/"  # + retrieval or answers: the last report of that kind
MAX_FILE_TYPES = 64
EXPECTED = (ValueError, LookupError, RuntimeError, OSError)  # failures the assistant is told about

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


# generate's adapter arguments (declared here to keep the tool's signature readable)
AdapterName = Annotated[
    str | None,
    Field(max_length=64, description="name of a fine-tuned LoRA adapter to apply (see index_status / the adapters folder)"),
]  # fmt: skip
SystemText = Annotated[
    str | None,
    Field(max_length=8000, description="extra instructions for the local model (with an adapter: replaces "
          "the system prompt it was trained with)"),
]  # fmt: skip
AdapterScale = Annotated[
    float | None,
    Field(ge=0.0, le=4.0, allow_inf_nan=False,
          description="how strongly the adapter applies (default 1.0 = as trained; 0 = the base alone)"),
]  # fmt: skip


def tool_error(exc: BaseException) -> ToolError:
    return ToolError(str(exc) or exc.__class__.__name__)


def register_tools(server: Any, options: ServerOptions) -> None:
    """Add the tools to ``server``; defaults (k, answer length, temperature) come from the settings."""
    _register_retrieve(server, options.settings)
    _register_generate(server, options.settings)
    _register_status(server)
    if options.allow_folder_tools:
        _register_folder_tools(server)


def _register_retrieve(server: Any, settings: Settings) -> None:
    @server.tool(title="Search the user's documents", annotations=READ_ONLY)
    async def retrieve(
        query: Annotated[
            str, Field(min_length=1, max_length=4000, description="what to look for: a question or keywords")
        ],
        ctx: Context,
        k: Annotated[int, Field(ge=1, le=MAX_K, description="how many passages to return")] = settings.k,
        path_glob: Annotated[
            str | None,
            Field(
                max_length=1000, description="only files whose path matches, e.g. '**/*.md' or 'projects/*'"
            ),
        ] = None,
        file_types: Annotated[
            list[Annotated[str, Field(max_length=32)]] | None,
            Field(max_length=MAX_FILE_TYPES, description="only these file extensions, e.g. ['.md', 'pdf']"),
        ] = None,
        modified_after: Annotated[
            float | str | None,
            Field(
                description="only files changed after this time: ISO 8601 (a time without a zone is the "
                "user's local time) or seconds since 1970"
            ),
        ] = None,
        mode: Annotated[
            Literal["hybrid", "vector", "keyword"],
            Field(
                description="hybrid (default) fuses meaning and exact words; vector = meaning; keyword = words"
            ),
        ] = "hybrid",
    ) -> Annotated[CallToolResult, RetrieveResult]:
        """Find passages in the user's own documents (notes, papers, code, manuals) that match a query.

        Use this first whenever a question may be answered by the user's files. Results are ranked
        chunks with the file path, line range or page and section headings: cite those. Read a whole
        document through the `uri` of a hit.
        """
        from ..search import search

        state = app_state(ctx)
        try:
            after = parse_since(modified_after)
        except ValueError as exc:
            raise ToolError(f"modified_after: {exc}") from exc
        try:
            hits = await anyio.to_thread.run_sync(
                lambda: search(
                    state.store,
                    state.embedder,
                    query,
                    k=k,
                    mode=mode,
                    path_glob=path_glob,
                    file_types=file_types,
                    modified_after=after,
                    vector_weight=settings.vector_weight,
                    keyword_weight=settings.keyword_weight,
                    rrf_k=settings.rrf_k,
                )  # fmt: skip
            )
        except ValueError as exc:
            raise tool_error(exc) from exc
        result = RetrieveResult(query=query, mode=mode, hits=[hit_out(i + 1, h) for i, h in enumerate(hits)])
        return CallToolResult(
            content=[TextContent(type="text", text=render.hits_text(query, hits))],
            structured_content=result.model_dump(mode="json"),
        )


def _register_generate(server: Any, settings: Settings) -> None:
    @server.tool(
        title="Answer with the local model",
        annotations=ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False),
    )
    async def generate(
        prompt: Annotated[
            str,
            Field(
                min_length=1, max_length=20000, description="the question or instruction for the local model"
            ),
        ],
        ctx: Context,
        use_context: Annotated[
            bool,
            Field(
                description="retrieve passages from the user's documents and answer from them with citations"
            ),
        ] = True,
        k: Annotated[
            int, Field(ge=1, le=MAX_K, description="passages to retrieve for the prompt")
        ] = settings.k,
        max_tokens: Annotated[
            int, Field(ge=1, le=MAX_GENERATE_TOKENS, description="longest answer, in tokens")
        ] = settings.max_tokens,
        temperature: Annotated[
            float | None,
            Field(
                ge=0.0, le=2.0, allow_inf_nan=False, description="0 = deterministic (default: the settings')"
            ),
        ] = None,
        adapter: AdapterName = None,
        system: SystemText = None,
        adapter_scale: AdapterScale = None,
    ) -> Annotated[CallToolResult, GenerateResult]:
        """Answer with the user's local language model, grounded in their documents, with numbered citations.

        Use this when the user asks for the local model's answer (privacy, offline use, or a
        fine-tuned adapter). For your own reasoning over the documents, `retrieve` is faster and
        better. Tokens stream as progress notifications; the result lists the sources, which ones
        support the answer, citations that point to nothing, and passages dropped for lack of room.
        An adapter answers with the system prompt and sampling its record carries unless `system` or
        `temperature` is given.
        """
        state = app_state(ctx)
        generator = await _generator_for_request(state, adapter)
        if adapter and adapter_scale is not None and "adapter_scale" not in generator.sampling_options:
            raise ToolError(f"the {generator.name} generator applies adapters at their trained strength only "
                            "(its server serves an adapter as a model): leave adapter_scale out")  # fmt: skip
        answer = await _answer_streaming(
            ctx,
            max_tokens,
            lambda on_token: generation.answer_question(
                prompt,
                generator=generator,
                store=state.store,
                embedder=state.embedder,
                k=k,
                max_tokens=max_tokens,
                temperature=temperature,
                adapter=adapter,
                system=system,
                use_context=use_context,
                on_token=on_token,
                settings=settings,
                adapters=state.adapters if adapter else None,
                adapter_scale=adapter_scale if adapter else None,
            ),  # fmt: skip
        )
        result = generate_result(answer)
        return CallToolResult(
            content=[TextContent(type="text", text=render.answer_text(result))],
            structured_content=result.model_dump(mode="json"),
        )


def _register_status(server: Any) -> None:
    @server.tool(title="Index status", annotations=READ_ONLY)
    async def index_status(ctx: Context) -> Annotated[CallToolResult, IndexStatusOut]:
        """Report which folders are indexed, how many documents and chunks there are, pending work,
        files that failed with their reasons, and the fine-tuned adapters generate can apply. Use it
        when retrieve finds nothing, to check what the index covers."""
        state = app_state(ctx)
        result = await anyio.to_thread.run_sync(status_of, state)
        return CallToolResult(
            content=[TextContent(type="text", text=render.status_text(result))],
            structured_content=result.model_dump(mode="json"),
        )


async def _generator_for_request(state: AppState, adapter: str | None) -> Generator:
    """The generator that answers: the server's own, or the one running ``adapter``'s base."""
    try:
        generator = await anyio.to_thread.run_sync(lambda: state.generator)
        if adapter is None:
            return generator
        if not generator.supports_adapters:
            raise ToolError(
                f"the {generator.name} generator cannot apply adapter {adapter!r}: start the server with "
                "the llamacpp generator, or with the openai generator and the openai_adapters setting "
                "(llama-server or model-name), to use LoRA adapters"
            )
        await anyio.to_thread.run_sync(generator.check_adapter, adapter)
        return await anyio.to_thread.run_sync(state.generator_for, adapter)
    except EXPECTED as exc:
        raise tool_error(exc) from exc


async def _answer_streaming(ctx: Context, max_tokens: int, work: Any) -> generation.GroundedAnswer:
    """Run ``work(on_token)`` on a thread, relaying its tokens as progress; a client that goes
    away stops the model at its next token."""
    relay = TokenRelay(asyncio.get_running_loop())
    stop = threading.Event()

    def on_token(piece: str) -> None:
        if stop.is_set():
            raise Cancelled()
        relay.push(piece)

    def run() -> generation.GroundedAnswer:
        try:
            return work(on_token)
        finally:
            relay.close()

    async def stream_progress() -> None:
        async def send(count: int, text: str) -> None:
            await ctx.report_progress(count, float(max_tokens), text)

        await relay.forward(send)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream_progress)
            return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException as exc:
        stop.set()
        cause = unwrap(exc)
        if isinstance(cause, EXPECTED):
            raise tool_error(cause) from cause
        raise


def _register_folder_tools(server: Any) -> None:
    @server.tool(
        title="Index a folder",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
    )
    async def add_folder(
        path: Annotated[str, Field(min_length=1, description="absolute path of a folder to index and watch")],
        ctx: Context,
    ) -> FolderResult:
        """Add a folder to the index and keep it up to date. Only on the user's explicit request:
        it widens what the assistant can read."""
        state = app_state(ctx)
        folder = Path(path).expanduser()
        if not folder.is_absolute():
            raise ToolError(f"{path!r} is not an absolute path: give the full path of the folder")
        try:
            report = await anyio.to_thread.run_sync(state.indexer.add_root, folder)
        except (OSError, ValueError) as exc:
            raise tool_error(exc) from exc
        if state.watcher is not None:
            await anyio.to_thread.run_sync(lambda: state.watcher.watch(str(folder), register=False))
        return FolderResult(
            path=str(folder.resolve()),
            indexed=report.indexed,
            unchanged=report.unchanged,
            removed=report.removed,
            failed=report.failed,
            skipped=report.skipped,
            seconds=round(report.seconds, 3),
        )

    @server.tool(
        title="Stop indexing a folder",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
    )
    async def remove_folder(
        path: Annotated[
            str, Field(min_length=1, description="a registered folder, as index_status lists it")
        ],
        ctx: Context,
    ) -> FolderResult:
        """Remove a folder from the index (its files on disk are untouched). Only on the user's request."""
        state = app_state(ctx)
        folder = Path(path).expanduser()
        removed = await anyio.to_thread.run_sync(state.indexer.remove_root, folder)
        if not removed:
            known = ", ".join(r.path for r in state.store.roots()) or "none"
            raise ToolError(f"{path!r} is not a registered folder; registered: {known}")
        if state.watcher is not None:
            await anyio.to_thread.run_sync(state.watcher.unwatch, str(folder))
        return FolderResult(path=str(folder), removed=1)


# ---------------------------------------------------------------------------- status


def status_of(state: AppState) -> IndexStatusOut:
    """The index status as ``index_status`` and the status resource report it."""
    from datetime import datetime, timezone

    st = state.store.status()
    watcher = state.watcher  # it watches every registered root
    pending = watcher.pending() if watcher is not None else 0
    last = st.last_change
    return IndexStatusOut(
        db_path=str(st.db_path),
        roots=[
            RootOut(
                path=r.path,
                documents=r.documents,
                chunks=r.chunks,
                failed=r.failed,
                skipped=r.skipped,
                watched=watcher is not None,
            )  # fmt: skip
            for r in st.roots
        ],
        documents=st.documents,
        chunks=st.chunks,
        pending=pending,
        failed=[FailedOut(path=f.path, status=f.status, reason=f.error) for f in st.failed],
        last_change=datetime.fromtimestamp(last, tz=timezone.utc).isoformat(timespec="seconds")
        if last
        else None,
        embed_model=st.embed_model,
        watcher_running=watcher is not None,
        watcher_error=state.watcher_error or _watcher_errors(watcher),
        adapters=_adapters(state),
        evaluations=_evaluations(state),
    )


def _evaluations(state: AppState) -> list[EvaluationOut]:
    from ..eval_report import last_evaluations

    return [
        EvaluationOut(kind=e["kind"], date=e["date"], summary=e["summary"], uri=EVAL_URI + e["kind"])
        for e in last_evaluations(state.store)
    ]


def _adapters(state: AppState) -> list[AdapterOut]:
    """The registered adapters, and whether each was trained on the model this server runs."""
    registry = state.adapters
    names = registry.names()
    if not names:
        return []
    generator = state.generator
    out = []
    for name in names:
        record = registry.read(name)
        try:
            matches = generator.runs_base_of(name) if generator.supports_adapters else False
        except Exception as exc:  # a missing model file: say unknown rather than fail the status
            logger.warning("could not compare adapter %s with the server's model: %s", name, exc)
            matches = None
        out.append(
            AdapterOut(
                name=name,
                base_model=record.base_model,
                architecture=record.architecture,
                created=record.created,
                description=record.description,
                runs_on_server_model=matches,
            )
        )
    return out


def _watcher_errors(watcher: Any) -> str | None:
    errors = list(getattr(watcher, "errors", None) or [])
    return f"{len(errors)} watcher errors, last: {errors[-1]}" if errors else None
