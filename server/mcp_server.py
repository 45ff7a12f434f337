"""The MCP server: the user's documents and a local model, offered to an AI assistant.

Tools: ``retrieve`` (ranked chunks from the live index), ``generate`` (a grounded answer from the
local model, tokens streamed as progress notifications), ``index_status``, and - only when the user
starts the server with ``--allow-folder-tools`` - ``add_folder`` / ``remove_folder``. Resources:
``lorekeeper://doc/{path}`` (a document's extracted text, only inside registered roots) and
``lorekeeper://status``; the resource list changes, with a notification, whenever the index does.
Prompt: ``answer_from_documents``.

The lifespan opens the store, starts the watcher (registered roots plus ``--watch`` folders) in the
background so the client's handshake is never kept waiting, and loads models only when a request
needs them. Transports live in ``run_stdio`` and ``run_http``; the HTTP one demands a bearer token
and rejects browser origins other than the local machine (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

import anyio
import anyio.to_thread
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer, ResourceSecurity
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from mcp_types import Resource as MCPResource
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from lorekeeper import plugins
from lorekeeper.plugins.base import Embedder, Generator

from . import config, generation
from .search import MAX_K

logger = logging.getLogger(__name__)

SERVER_NAME = "lorekeeper"
DOC_SCHEME = "lorekeeper://doc/"
STATUS_URI = "lorekeeper://status"
TOKEN_ENV = "LOREKEEPER_TOKEN"
DEFAULT_PORT = config.DEFAULT_HTTP_PORT
MAX_LISTED_DOCUMENTS = 2000  # resources/list is not paginated by the SDK: keep the answer small
MAX_GENERATE_TOKENS = 4096
NOTIFY_COALESCE_SECONDS = 0.25  # a burst of file events becomes one list-changed notification
PROGRESS_INTERVAL = 0.05  # at most 20 token notifications a second; each carries what piled up

INSTRUCTIONS = (
    "lorekeeper gives you the user's own documents (a live index of folders they chose) and a small "
    "local language model. Use `retrieve` to find passages that answer a question about the user's "
    "notes, files or projects, then cite the file paths. Use `generate` only when the user wants the "
    "local model to answer (for privacy, or to use a fine-tuned adapter). Read a whole document with "
    "the resource URI a result gives you."
)


# ---------------------------------------------------------------------------- document URIs


def doc_uri(path: str | Path) -> str:
    """The resource URI of an indexed file: ``lorekeeper://doc/`` + its absolute path."""
    text = str(path).replace("\\", "/")
    return DOC_SCHEME + quote(text.lstrip("/"), safe="/:")


def _path_from_param(raw: str) -> Path:
    """Turn the ``{path}`` of a document URI back into an absolute path (POSIX or Windows drive)."""
    text = unquote(raw).replace("\\", "/")
    if re.match(r"^[A-Za-z]:/", text):
        return Path(text)
    return Path("/" + text.lstrip("/"))


class DocumentAccessError(ResourceNotFoundError):
    """A document URI that the server refuses to serve; the message says why."""


# ---------------------------------------------------------------------------- structured output


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
    cited: bool = Field(description="whether the answer cites this source")
    text: str


class DroppedOut(BaseModel):
    path: str
    rank: int
    tokens: int
    reason: str


class GenerateResult(BaseModel):
    answer: str
    sources: list[SourceOut] = Field(description="every source given to the model, numbered")
    cited: list[int] = Field(description="source numbers the answer cites")
    invalid_citations: list[int] = Field(description="numbers the answer cites that point to no source")
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
    runs_on_server_model: bool | None = Field(
        default=None,
        description="whether this server's model is that base (null: the adapter does not say)",
    )


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


class FolderResult(BaseModel):
    path: str
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------- server state


@dataclass
class ServerOptions:
    """How ``lorekeeper serve`` was started; every field has a CLI flag."""

    db_path: Path | None = None
    watch: list[Path] = field(default_factory=list)  # folders to register and watch at start
    allow_folder_tools: bool = False  # expose add_folder / remove_folder
    generator: str | None = None  # generator plugin name (None -> LOREKEEPER_GENERATOR or llamacpp)
    start_watcher: bool = True
    debounce: float = 0.2


@dataclass
class AppState:
    """What every request can reach: the store, the indexer and watcher, and lazily loaded models."""

    options: ServerOptions
    store: Any
    indexer: Any
    embedder: Embedder
    watcher: Any = None
    watcher_error: str | None = None
    _generator: Generator | None = None
    _generator_lock: threading.Lock = field(default_factory=threading.Lock)
    _base_generators: dict[str, Generator] = field(default_factory=dict)  # adapter bases, one at a time
    _starter: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            with self._generator_lock:
                if self._generator is None:
                    self._generator = plugins.get_generator(self.options.generator)
        return self._generator

    def generator_for(self, adapter: str | None) -> Generator:
        """The generator that answers with ``adapter``: the server's own, unless the adapter was
        exported for another base model (its ``NAME.json`` says which) that is still on disk; then
        one running that base, loaded on first use and kept (one such base at a time) beside the
        server's own model, as Ollama loads a fine-tune's FROM model."""
        generator = self.generator
        runs_base_of = getattr(generator, "runs_base_of", None)
        if adapter is None or runs_base_of is None or runs_base_of(adapter) is not False:
            return generator
        from lorekeeper.plugins.generators.llamacpp import adapter_base

        base = adapter_base(adapter)
        if base is None or not base.is_file():
            return generator  # it says, refusing or warning, which base the adapter needs
        key = str(base.resolve())
        with self._generator_lock:
            other = self._base_generators.get(key)
            if other is None:
                for old in self._base_generators.values():
                    old.close()
                self._base_generators.clear()
                logger.info("loading %s, the base model of adapter %s", base, adapter)
                other = self._base_generators[key] = type(generator)(base)
        return other

    def start_watching(self) -> None:
        """Register ``--watch`` folders and start the watcher; runs on a background thread.

        The watcher's first pass reconciles every root with the disk, so new folders are indexed
        there; without a watcher they are indexed here.
        """
        for folder in self.options.watch:
            if self._stopping.is_set():
                return
            try:
                if not Path(folder).is_dir():
                    raise NotADirectoryError(f"{folder} is not a folder")
                if self.options.start_watcher:
                    self.store.add_root(Path(folder).expanduser().resolve())
                else:
                    self.indexer.add_root(folder)
            except Exception as exc:
                logger.error("cannot watch %s: %s", folder, exc)
        if not self.options.start_watcher or self._stopping.is_set():
            return
        try:
            from .watcher import Watcher

            watcher = Watcher(self.indexer, debounce=self.options.debounce)
            watcher.start()
            self.watcher = watcher
        except Exception as exc:  # the index still serves; status says why it is not live
            self.watcher_error = f"the watcher did not start: {exc}"
            logger.exception("the watcher did not start")

    def shutdown(self) -> None:
        self._stopping.set()
        if self._starter is not None:
            self._starter.join(timeout=60)
        if self.watcher is not None:
            try:
                self.watcher.stop()
            except Exception:
                logger.exception("stopping the watcher failed")
        self.store.close()
        with self._generator_lock:
            for other in self._base_generators.values():
                other.close()
            self._base_generators.clear()

    def resolve_document(self, raw: str) -> Path:
        """The indexed file a document URI names, or a ``DocumentAccessError`` saying why not.

        Rejects ``..`` segments, paths outside every registered root, symlinks whose target lies
        outside the roots, and files the index does not hold (ignored files stay private).
        """
        if "\x00" in raw:
            raise DocumentAccessError("the document path contains a NUL byte")
        decoded = unquote(raw).replace("\\", "/")
        if ".." in decoded.split("/"):
            raise DocumentAccessError(
                f"'..' is not allowed in a document path ({raw!r}): use the absolute path a retrieve result gives"
            )
        wanted = _path_from_param(raw)
        roots = [Path(r.path) for r in self.store.roots()]
        if not roots:
            raise DocumentAccessError("no folders are registered: add one with `lorekeeper add FOLDER`")
        real = wanted.resolve(strict=False)
        inside = [root for root in roots if _is_within(real, root.resolve(strict=False))]
        if not inside:
            if any(_is_within(wanted, root) for root in roots):
                raise DocumentAccessError(f"{wanted} is a link that points outside the registered folders")
            raise DocumentAccessError(
                f"{wanted} is outside the registered folders ({', '.join(str(r) for r in roots)})"
            )
        for candidate in (wanted, real):
            doc = self.store.get_document(str(candidate))
            if doc is not None:
                if not Path(candidate).exists():
                    raise DocumentAccessError(f"{candidate} was indexed but no longer exists on disk")
                return Path(candidate)
        raise DocumentAccessError(f"{wanted} is not in the index (it may be ignored, unsupported or new)")


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


# ---------------------------------------------------------------------------- change notifications


class ChangeNotifier:
    """Turns committed index changes (on indexer threads) into MCP list-changed notifications.

    Clients on the 2026-07-28 protocol hear them on ``subscriptions/listen``; clients that connected
    with the initialize handshake get ``notifications/resources/list_changed`` on their session.
    """

    def __init__(self, server: LorekeeperMCP) -> None:
        self._server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending_paths: set[str] = set()
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.legacy_connections: weakref.WeakSet = weakref.WeakSet()

    def on_store_event(self, event: str, path: str) -> None:
        """Store listener; called on whichever thread committed the change."""
        with self._lock:
            if self._closed or self._loop is None:
                return
            self._pending_paths.add(path)
            if self._scheduled:
                return
            self._scheduled = True
            loop = self._loop
        try:
            loop.call_soon_threadsafe(self._start_flush, loop)
        except RuntimeError:  # the loop is gone: the server is shutting down
            pass

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        await asyncio.sleep(NOTIFY_COALESCE_SECONDS)
        with self._lock:
            paths, self._pending_paths = self._pending_paths, set()
            self._scheduled = False
        bus = self._server._subscriptions
        try:
            await bus.publish(ResourcesListChanged())
            for path in sorted(paths)[:100]:
                await bus.publish(ResourceUpdated(uri=doc_uri(path)))
        except Exception:
            logger.exception("publishing an index change failed")
        for connection in list(self.legacy_connections):
            try:
                await connection.send_resource_list_changed()
            except Exception:  # the client went away
                self.legacy_connections.discard(connection)

    async def track(self, ctx: Any, call_next: Any) -> Any:
        """Middleware: remember handshake-era connections so they can be told about changes.

        The SDK builds a ``ServerSession`` per request; the connection behind it is what lives on
        (and what has the connection-wide channel notifications travel on).
        """
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            connection = getattr(ctx.session, "_connection", None)
            if connection is not None:
                try:
                    self.legacy_connections.add(connection)
                except TypeError:
                    logger.debug("cannot track %r for change notifications", connection)
        return await call_next(ctx)

    def idle(self) -> bool:
        """True when no change is waiting to be announced."""
        with self._lock:
            return not self._scheduled and not self._tasks

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            self._closed = False
            self._scheduled = False
            self._pending_paths.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._loop = None
        for task in list(self._tasks):
            task.cancel()


# ---------------------------------------------------------------------------- the server


class LorekeeperMCP(MCPServer[AppState]):
    """MCPServer whose resource list is the set of indexed documents."""

    def __init__(self, options: ServerOptions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options
        self.state: AppState | None = None
        self.notifier: ChangeNotifier | None = None

    async def list_resources(self) -> list[MCPResource]:
        listed = await super().list_resources()
        state = self.state
        if state is None:
            return listed
        docs = await anyio.to_thread.run_sync(state.store.documents)
        for doc in docs[:MAX_LISTED_DOCUMENTS]:
            if doc.status != "indexed":
                continue
            listed.append(
                MCPResource(
                    uri=doc_uri(doc.path),
                    name=Path(doc.path).name,
                    title=doc.path,
                    description=f"{doc.chunk_count} chunks, indexed {_iso(doc.indexed_at)}",
                    mime_type="text/plain",
                    size=doc.size,
                )
            )
        return listed


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _parse_time(value: float | str | None) -> float | None:
    """``modified_after`` as epoch seconds, from a number or an ISO-8601 date/time."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ToolError(
            f"modified_after={value!r} is not a date: use ISO 8601 (2024-05-01 or 2024-05-01T12:00:00Z) "
            "or seconds since 1970"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _hit_location(hit: Any) -> str:
    return generation.describe_location(
        getattr(hit, "start_line", None), getattr(hit, "end_line", None), getattr(hit, "page", None)
    )


def _retrieve_text(result: RetrieveResult) -> str:
    if not result.hits:
        return f"No indexed passage matched {result.query!r}."
    blocks = []
    for hit in result.hits:
        where = f" ({hit.location})" if hit.location else ""
        heading = f"\n  section: {' > '.join(hit.heading_path)}" if hit.heading_path else ""
        blocks.append(f"[{hit.rank}] {hit.path}{where}  score {hit.score:.3f}{heading}\n{hit.text.strip()}")
    return "\n\n".join(blocks)


def _generate_text(result: GenerateResult) -> str:
    lines = [result.answer or "(the model returned no text)"]
    if result.sources:
        lines.append("")
        lines.append("Sources:")
        for src in result.sources:
            mark = "*" if src.cited else " "
            where = f" ({src.location})" if src.location else ""
            lines.append(f"{mark}[{src.number}] {src.path}{where}")
    for warning in result.warnings:
        lines.append(f"Note: {warning}")
    return "\n".join(lines)


def _to_tool_error(exc: BaseException) -> ToolError:
    return ToolError(str(exc) or exc.__class__.__name__)


def create_server(options: ServerOptions | None = None) -> LorekeeperMCP:
    """Build the MCP server; nothing is opened or loaded until a client connects (lifespan)."""
    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(server: LorekeeperMCP) -> AsyncIterator[AppState]:
        from .indexer import Indexer
        from .store import Store

        store = await anyio.to_thread.run_sync(Store.open, options.db_path)
        try:
            embedder = plugins.get_embedder()
            indexer = await anyio.to_thread.run_sync(Indexer, store, embedder)
        except BaseException:
            store.close()
            raise
        state = AppState(options=options, store=store, indexer=indexer, embedder=embedder)
        notifier = server.notifier
        if notifier is not None:
            notifier.open(asyncio.get_running_loop())
            store.add_listener(notifier.on_store_event)
        state._starter = threading.Thread(target=state.start_watching, name="lorekeeper-watch", daemon=True)
        state._starter.start()
        server.state = state
        logger.info("lorekeeper MCP server ready on %s", store.path)
        try:
            yield state
        finally:
            server.state = None
            if notifier is not None:
                store.remove_listener(notifier.on_store_event)
                notifier.close()
            await anyio.to_thread.run_sync(state.shutdown)

    server = LorekeeperMCP(
        options,
        name=SERVER_NAME,
        title="lorekeeper: your documents and a local model",
        instructions=INSTRUCTIONS,
        version=_version(),
        lifespan=lifespan,
    )
    server.notifier = ChangeNotifier(server)
    server.middleware.append(server.notifier.track)
    _advertise_resource_changes(server)
    _register_tools(server, options)
    _register_resources(server)
    _register_prompts(server)
    return server


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorekeeper")
    except Exception:
        return "0"


def _advertise_resource_changes(server: LorekeeperMCP) -> None:
    """Handshake-era clients learn from capabilities that the resource list changes."""
    low = server._lowlevel_server
    original = low.create_initialization_options

    def with_changes(notification_options=None, experimental_capabilities=None, extensions=None):
        return original(
            notification_options or NotificationOptions(resources_changed=True),
            experimental_capabilities,
            extensions,
        )

    low.create_initialization_options = with_changes  # type: ignore[method-assign]


READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


def _register_tools(server: LorekeeperMCP, options: ServerOptions) -> None:
    @server.tool(title="Search the user's documents", annotations=READ_ONLY)
    async def retrieve(
        query: Annotated[
            str, Field(min_length=1, max_length=4000, description="what to look for: a question or keywords")
        ],
        ctx: Context,
        k: Annotated[int, Field(ge=1, le=MAX_K, description="how many passages to return")] = 8,
        path_glob: Annotated[
            str | None, Field(description="only files whose path matches, e.g. '**/*.md' or 'projects/*'")
        ] = None,
        file_types: Annotated[
            list[str] | None, Field(description="only these file extensions, e.g. ['.md', 'pdf']")
        ] = None,
        modified_after: Annotated[
            float | str | None,
            Field(description="only files changed after this time: ISO 8601 date or seconds since 1970"),
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
        from .search import search

        state = _state(ctx)
        after = _parse_time(modified_after)
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
                )
            )
        except ValueError as exc:
            raise _to_tool_error(exc) from exc
        result = RetrieveResult(
            query=query,
            mode=mode,
            hits=[
                Hit(
                    rank=i + 1,
                    score=float(hit.score),
                    path=hit.path,
                    uri=doc_uri(hit.path),
                    location=_hit_location(hit),
                    start_line=hit.start_line,
                    end_line=hit.end_line,
                    page=hit.page,
                    heading_path=list(hit.heading_path or []),
                    text=hit.text,
                )
                for i, hit in enumerate(hits)
            ],
        )
        return CallToolResult(
            content=[TextContent(type="text", text=_retrieve_text(result))],
            structured_content=result.model_dump(mode="json"),
        )

    @server.tool(
        title="Answer with the local model",
        annotations=ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False),
    )
    async def generate(
        prompt: Annotated[
            str, Field(min_length=1, description="the question or instruction for the local model")
        ],
        ctx: Context,
        use_context: Annotated[
            bool,
            Field(
                description="retrieve passages from the user's documents and answer from them with citations"
            ),
        ] = True,
        k: Annotated[int, Field(ge=1, le=MAX_K, description="passages to retrieve for the prompt")] = 8,
        max_tokens: Annotated[
            int, Field(ge=1, le=MAX_GENERATE_TOKENS, description="longest answer, in tokens")
        ] = 256,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="0 = deterministic")] = 0.2,
        adapter: Annotated[
            str | None,
            Field(
                description="name of a fine-tuned LoRA adapter to apply (see index_status / the adapters folder)"
            ),
        ] = None,
        system: Annotated[str | None, Field(description="extra instructions for the local model")] = None,
    ) -> Annotated[CallToolResult, GenerateResult]:
        """Answer with the user's local language model, grounded in their documents, with numbered citations.

        Use this when the user asks for the local model's answer (privacy, offline use, or a
        fine-tuned adapter). For your own reasoning over the documents, `retrieve` is faster and
        better. Tokens stream as progress notifications; the result lists the sources, which ones
        the answer cites, citations that point to nothing, and passages dropped for lack of room.
        """
        state = _state(ctx)
        try:
            generator = await anyio.to_thread.run_sync(lambda: state.generator)
        except LookupError as exc:
            raise _to_tool_error(exc) from exc
        if adapter is not None:
            if not generator.supports_adapters:
                raise ToolError(
                    f"the {generator.name} generator cannot apply adapter {adapter!r}: start the server with "
                    "the llamacpp generator to use LoRA adapters"
                )
            check = getattr(generator, "check_adapter", None)
            if check is not None:
                try:
                    await anyio.to_thread.run_sync(check, adapter)
                except LookupError as exc:
                    raise _to_tool_error(exc) from exc
            try:
                generator = await anyio.to_thread.run_sync(state.generator_for, adapter)
            except (ValueError, RuntimeError, OSError) as exc:
                raise _to_tool_error(exc) from exc

        relay = _TokenRelay(asyncio.get_running_loop())
        stop = threading.Event()

        def on_token(piece: str) -> None:
            if stop.is_set():
                raise _Cancelled()
            relay.push(piece)

        def work() -> generation.GroundedAnswer:
            try:
                return generation.answer_question(
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
                )
            finally:
                relay.close()

        async def stream_progress() -> None:
            async def send(count: int, text: str) -> None:
                await ctx.report_progress(count, float(max_tokens), text)

            await relay.forward(send)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream_progress)
                answer = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException as exc:
            stop.set()
            cause = _unwrap(exc)
            if isinstance(cause, (ValueError, LookupError, RuntimeError, OSError)):
                raise _to_tool_error(cause) from cause
            raise
        result = _generate_result(answer)
        return CallToolResult(
            content=[TextContent(type="text", text=_generate_text(result))],
            structured_content=result.model_dump(mode="json"),
        )

    @server.tool(title="Index status", annotations=READ_ONLY)
    async def index_status(ctx: Context) -> Annotated[CallToolResult, IndexStatusOut]:
        """Report which folders are indexed, how many documents and chunks there are, pending work,
        files that failed with their reasons, and the fine-tuned adapters generate can apply. Use it
        when retrieve finds nothing, to check what the index covers."""
        state = _state(ctx)
        result = await anyio.to_thread.run_sync(_status, state)
        return CallToolResult(
            content=[TextContent(type="text", text=_status_text(result))],
            structured_content=result.model_dump(mode="json"),
        )

    if not options.allow_folder_tools:
        return

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
        state = _state(ctx)
        folder = Path(path).expanduser()
        if not folder.is_absolute():
            raise ToolError(f"{path!r} is not an absolute path: give the full path of the folder")
        try:
            report = await anyio.to_thread.run_sync(state.indexer.add_root, folder)
        except (OSError, ValueError) as exc:
            raise _to_tool_error(exc) from exc
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
        state = _state(ctx)
        folder = Path(path).expanduser()
        removed = await anyio.to_thread.run_sync(state.indexer.remove_root, folder)
        if not removed:
            known = ", ".join(r.path for r in state.store.roots()) or "none"
            raise ToolError(f"{path!r} is not a registered folder; registered: {known}")
        if state.watcher is not None:
            await anyio.to_thread.run_sync(state.watcher.unwatch, str(folder))
        return FolderResult(path=str(folder), removed=1)


class _TokenRelay:
    """Carries answer pieces from the generation thread to progress notifications.

    The thread only appends, and wakes the event loop for the first piece of a batch; the loop sends
    at most one notification per ``PROGRESS_INTERVAL`` with everything that piled up. The generation
    thread shares the GIL with the loop, so a notification per token would slow the model down.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._closed = False
        self._wake = asyncio.Event()

    def push(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)
            first = len(self._pieces) == 1
        if first:
            self._loop.call_soon_threadsafe(self._wake.set)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._loop.call_soon_threadsafe(self._wake.set)

    async def forward(self, send: Callable[[int, str], Awaitable[None]]) -> None:
        """Call ``send(pieces so far, new text)`` until the thread closes the relay."""
        sent = 0
        last = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = last + PROGRESS_INTERVAL - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            with self._lock:
                batch, self._pieces = self._pieces, []
                closed = self._closed
            if batch:
                sent += len(batch)
                last = self._loop.time()
                await send(sent, "".join(batch))
            if closed:
                return


class _Cancelled(Exception):
    """Raised inside the generation thread once the client has gone."""


def _unwrap(exc: BaseException) -> BaseException:
    """The single real error inside anyio's exception groups."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _generate_result(answer: generation.GroundedAnswer) -> GenerateResult:
    cited = set(answer.cited)
    return GenerateResult(
        answer=answer.answer,
        sources=[
            SourceOut(
                number=s.number,
                path=s.path,
                uri=doc_uri(s.path),
                location=s.location,
                start_line=s.start_line,
                end_line=s.end_line,
                page=s.page,
                heading_path=s.heading_path,
                score=s.score,
                cited=s.number in cited,
                text=s.text,
            )
            for s in answer.sources
        ],
        cited=answer.cited,
        invalid_citations=answer.invalid_citations,
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


def _status(state: AppState) -> IndexStatusOut:
    st = state.store.status()
    watcher = state.watcher  # it watches every registered root
    pending = watcher.pending() if watcher is not None else 0
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
            )
            for r in st.roots
        ],
        documents=st.documents,
        chunks=st.chunks,
        pending=pending,
        failed=[FailedOut(path=f.path, status=f.status, reason=f.error) for f in st.failed],
        last_change=_iso(st.last_change),
        embed_model=st.embed_model,
        watcher_running=watcher is not None,
        watcher_error=state.watcher_error or _watcher_errors(watcher),
        adapters=_adapters(state),
    )


def _adapters(state: AppState) -> list[AdapterOut]:
    """The registered adapters, and whether each was trained on the model this server runs."""
    from lorekeeper.plugins.generators.llamacpp import adapter_record, known_adapters

    names = known_adapters()
    if not names:
        return []
    generator = state.generator
    runs_base_of = getattr(generator, "runs_base_of", None) if generator.supports_adapters else None
    out = []
    for name in names:
        record = adapter_record(name)
        if runs_base_of is not None:
            try:
                matches = runs_base_of(name)
            except Exception as exc:  # a missing model file: say unknown rather than fail the status
                logger.warning("could not compare adapter %s with the server's model: %s", name, exc)
                matches = None
        else:
            matches = False
        out.append(
            AdapterOut(
                name=name,
                base_model=record.get("base_model"),
                architecture=record.get("architecture"),
                created=record.get("created"),
                runs_on_server_model=matches,
            )
        )
    return out


def _watcher_errors(watcher: Any) -> str | None:
    errors = list(getattr(watcher, "errors", None) or [])
    return f"{len(errors)} watcher errors, last: {errors[-1]}" if errors else None


def _status_text(result: IndexStatusOut) -> str:
    lines = [f"{result.documents} documents, {result.chunks} chunks in {result.db_path}"]
    if not result.roots:
        lines.append("No folders are registered yet: run `lorekeeper add FOLDER`.")
    for r in result.roots:
        live = "watched" if r.watched else "not watched"
        lines.append(f"- {r.path}: {r.documents} documents, {r.chunks} chunks, {r.failed} failed ({live})")
    if result.pending:
        lines.append(f"{result.pending} changes waiting to be indexed")
    if result.watcher_error:
        lines.append(f"! {result.watcher_error}")
    for f in result.failed[:20]:
        lines.append(f"! {f.path}: {f.status}: {f.reason}")
    if len(result.failed) > 20:
        lines.append(f"... and {len(result.failed) - 20} more")
    for a in result.adapters:
        note = {True: "", False: ", not this server's model", None: ""}[a.runs_on_server_model]
        base = f" (base {a.base_model}{note})" if a.base_model else ""
        lines.append(f"adapter {a.name}{base}")
    return "\n".join(lines)


def _register_resources(server: LorekeeperMCP) -> None:
    # Path checks are ours (resolve_document), with reasons; the SDK's generic ones would reject
    # absolute paths, which is exactly how documents are named.
    @server.resource(
        DOC_SCHEME + "{+path}",
        name="document",
        title="An indexed document",
        description="The extracted text of an indexed file, by absolute path (only inside registered folders)",
        mime_type="text/plain",
        security=ResourceSecurity(exempt_params={"path"}),
    )
    async def read_document(path: str, ctx: Context) -> str:
        state = _state(ctx)
        target = await anyio.to_thread.run_sync(state.resolve_document, path)
        try:
            return await anyio.to_thread.run_sync(state.indexer.document_text, target)
        except Exception as exc:
            raise DocumentAccessError(f"{target} could not be read: {exc}") from exc

    @server.resource(
        STATUS_URI,
        name="status",
        title="Index status",
        description="Folders, counts, pending work and failed files, as JSON",
        mime_type="application/json",
    )
    async def status_resource() -> str:
        state = server.state
        if state is None:
            return json.dumps({"error": "the server is starting or stopping"})
        result = await anyio.to_thread.run_sync(_status, state)
        return result.model_dump_json(indent=2)


def _register_prompts(server: LorekeeperMCP) -> None:
    @server.prompt(title="Answer from my documents")
    async def answer_from_documents(
        question: Annotated[str, Field(description="what you want to know from your documents")],
    ) -> str:
        """Ask a question and get an answer drawn from your own documents, with citations."""
        state = server.state
        passages = ""
        if state is not None and question.strip():
            from .search import search

            try:
                hits = await anyio.to_thread.run_sync(
                    lambda: search(state.store, state.embedder, question, k=8)
                )
            except ValueError:
                hits = []
            passages = "\n\n".join(
                f"[{i + 1}] {hit.path}"
                + (f" ({_hit_location(hit)})" if _hit_location(hit) else "")
                + f"\n{hit.text.strip()}"
                for i, hit in enumerate(hits)
            )
        if passages:
            return (
                "Answer the question using only these passages from my documents. Cite them as [n] and "
                "name the files. If they do not answer it, say so, and use the `retrieve` tool to look further.\n\n"
                f"{passages}\n\nQuestion: {question}"
            )
        return (
            "Use the `retrieve` tool to search my documents for this question, then answer from what it "
            f"returns, citing file paths. If nothing relevant is found, say so.\n\nQuestion: {question}"
        )


# ---------------------------------------------------------------------------- transports


def run_stdio(server: LorekeeperMCP) -> None:
    """Serve over stdin/stdout (what Claude Desktop, Cursor and VS Code launch).

    The SDK moves file descriptor 1 to stderr while serving, so stray prints from libraries
    (llama.cpp included) can never corrupt the protocol stream.
    """
    anyio.run(server.run_stdio_async)


def load_or_create_token(explicit: str | None = None) -> str:
    """The HTTP bearer token: ``explicit`` (flag), ``LOREKEEPER_TOKEN``, or the stored one.

    On first run a random token is written to the data directory with mode 0600.
    """
    if explicit:
        return explicit
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env
    path = config.token_path()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and os.name == "posix":
            logger.warning("%s was readable by others (mode %o); tightening to 0600", path, mode)
            path.chmod(0o600)
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    if os.name == "posix":
        path.chmod(0o600)
    logger.info("created a new bearer token in %s", path)
    return token


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def origin_allowed(origin: str | None, extra: Sequence[str] = ()) -> bool:
    """Browsers send Origin; only pages served from this machine (or listed ones) may call us."""
    if origin is None:
        return True  # not a browser: desktop clients and scripts send no Origin
    if origin in extra:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOCAL_HOSTS


class AccessGuard:
    """ASGI middleware: Origin check (403) first, then the bearer token (401)."""

    def __init__(self, app: Any, token: str, allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self._token = token.encode("utf-8")
        self._allowed = tuple(allowed_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not origin_allowed(headers.get("origin"), self._allowed):
            await _plain_response(send, 403, "Forbidden: this Origin may not use the lorekeeper server\n")
            return
        auth = headers.get("authorization", "")
        scheme, _, supplied = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode("utf-8"), self._token
        ):
            await _plain_response(
                send,
                401,
                "Unauthorized: send 'Authorization: Bearer <token>' (see `lorekeeper mcp-config --http`)\n",
                extra=[(b"www-authenticate", b'Bearer realm="lorekeeper"')],
            )
            return
        await self.app(scope, receive, send)


async def _plain_response(send: Any, status: int, body: str, extra: list | None = None) -> None:
    data = body.encode("utf-8")
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})


def http_app(
    server: LorekeeperMCP, token: str, host: str = "127.0.0.1", allowed_origins: Sequence[str] = ()
) -> Any:
    """The Streamable HTTP ASGI app at ``/mcp``, behind the Origin and token checks."""
    app = server.streamable_http_app(host=host)
    return AccessGuard(app, token=token, allowed_origins=allowed_origins)


def run_http(
    server: LorekeeperMCP,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str,
    allowed_origins: Sequence[str] = (),
) -> None:
    """Serve Streamable HTTP; blocks until interrupted."""
    import uvicorn

    if host not in LOCAL_HOSTS:
        logger.warning(
            "listening on %s: other machines can reach this server (the token still applies)", host
        )
    app = http_app(server, token, host=host, allowed_origins=allowed_origins)
    cfg = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,  # open event streams must not hold Ctrl-C hostage
    )
    logger.warning("lorekeeper MCP server on http://%s:%d/mcp", host, port)
    started = time.monotonic()
    uvicorn.Server(cfg).run()
    logger.info("server stopped after %.0f s", time.monotonic() - started)
