"""The MCP server itself: ``create_server`` builds it, the lifespan opens what requests need.

The lifespan opens the store, starts the watcher (registered roots plus ``--watch`` folders) in the
background so the client's handshake is never kept waiting, and loads models only when a request
needs them. ``run_stdio`` and ``http.run_http`` are the transports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp_types import Resource as MCPResource
from pydantic import ValidationError

from ..indexer import warm_up
from .api import register_api
from .documents import doc_uri
from .notify import ChangeNotifier, advertise_resource_changes
from .resources import register_prompts, register_resources
from .state import AppState, ServerOptions
from .tools import register_tools

logger = logging.getLogger(__name__)

SERVER_NAME = "lorekeeper"
MAX_LISTED_DOCUMENTS = 2000  # resources/list is not paginated by the SDK: keep the answer small

INSTRUCTIONS = (
    "lorekeeper gives you the user's own documents (a live index of folders they chose) and a small "
    "local language model. Use `retrieve` to find passages that answer a question about the user's "
    "notes, files or projects, then cite the file paths. Use `generate` only when the user wants the "
    "local model to answer (for privacy, or to use a fine-tuned adapter). Read a whole document with "
    "the resource URI a result gives you."
)


class LorekeeperMCP(MCPServer[AppState]):
    """MCPServer whose resource list is the set of indexed documents."""

    def __init__(self, options: ServerOptions, **kwargs: Any) -> None:
        bus = InMemorySubscriptionBus()
        super().__init__(subscriptions=bus, **kwargs)
        self.options = options
        self.state: AppState | None = None
        self.notifier = ChangeNotifier(bus)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        """The SDK's tool call, with every failure put in words the assistant can act on: bad
        arguments name each field and what it must be; a crash says which kind (the details go to
        the log) instead of the bare "Error executing tool NAME"."""
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            cause = exc.__cause__ or exc
            logger.error("tool %s failed", name, exc_info=(type(cause), cause, cause.__traceback__))
            raise ToolError(
                f"{name} failed on an internal error ({type(cause).__name__}); the server's log has the "
                "details. Other requests are unaffected: retry, or change the arguments."
            ) from cause
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(invalid_arguments(name, exc.__cause__)) from exc.__cause__
            raise

    async def list_resources(self) -> list[MCPResource]:
        listed = await super().list_resources()
        state = self.state
        if state is None:
            return listed
        docs = await anyio.to_thread.run_sync(state.store.documents)
        for doc in docs[:MAX_LISTED_DOCUMENTS]:
            if doc.status != "indexed":
                continue
            indexed = datetime.fromtimestamp(doc.indexed_at or 0, tz=timezone.utc).isoformat(
                timespec="seconds"
            )
            listed.append(
                MCPResource(
                    uri=doc_uri(doc.path),
                    name=Path(doc.path).name,
                    title=doc.path,
                    description=f"{doc.chunk_count} chunks, indexed {indexed}",
                    mime_type="text/plain",
                    size=doc.size,
                )
            )
        return listed


def invalid_arguments(tool: str, error: ValidationError) -> str:
    """A validation failure as one line per field, without echoing the (perhaps huge) values."""
    problems = error.errors(include_url=False, include_input=False)
    lines = []
    for problem in problems[:10]:
        field = ".".join(str(part) for part in problem["loc"] if part != f"{tool}Arguments") or "arguments"
        lines.append(f"- {field}: {problem['msg']}")
    more = f"\n- ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    count = f"{len(problems)} validation error{'s' if len(problems) != 1 else ''}"
    return f"Invalid arguments for {tool} ({count}):\n" + "\n".join(lines) + more


def create_server(options: ServerOptions | None = None) -> LorekeeperMCP:
    """Build the MCP server; nothing is opened or loaded until a client connects (lifespan)."""
    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(server: LorekeeperMCP) -> AsyncIterator[AppState]:
        state = await anyio.to_thread.run_sync(_open_state, options)
        warm_up(state.embedder)  # in the background: the handshake never waits for a model
        server.notifier.open(asyncio.get_running_loop())
        state.store.add_listener(server.notifier.on_store_event)
        state._starter = threading.Thread(target=state.start_watching, name="lorekeeper-watch", daemon=True)
        state._starter.start()
        server.state = state
        logger.info("lorekeeper MCP server ready on %s", state.store.path)
        try:
            yield state
        finally:
            server.state = None
            state.store.remove_listener(server.notifier.on_store_event)
            server.notifier.close()
            await anyio.to_thread.run_sync(state.shutdown)

    server = LorekeeperMCP(
        options,
        name=SERVER_NAME,
        title="lorekeeper: your documents and a local model",
        instructions=INSTRUCTIONS,
        version=_version(),
        lifespan=lifespan,
    )
    server.middleware.append(server.notifier.track)
    advertise_resource_changes(server)
    register_tools(server, options)
    register_resources(server)
    register_prompts(server)
    register_api(server)  # plain JSON for the CLI over HTTP (api.py)
    return server


def _open_state(options: ServerOptions) -> AppState:
    from ..indexer import Indexer, embedder_for
    from ..stores import open_store

    store = open_store(options.settings.db_target)
    try:
        embedder = embedder_for(store, options.settings)
        indexer = Indexer(store, embedder, settings=options.settings)
    except BaseException:
        store.close()
        raise
    return AppState(options=options, store=store, indexer=indexer, embedder=embedder)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorekeeper")
    except Exception:
        return "0"


def run_stdio(server: LorekeeperMCP) -> None:
    """Serve over stdin/stdout (what Claude Desktop, Cursor and VS Code launch).

    The SDK moves file descriptor 1 to stderr while serving, so stray prints from libraries
    (llama.cpp included) can never corrupt the protocol stream.
    """
    anyio.run(server.run_stdio_async)
