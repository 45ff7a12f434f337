"""Plain JSON endpoints beside ``/mcp`` for ``lorekeeper search`` and ``ask``, as Ollama's CLI
talks to its server: a command finds ``serve --http`` running and borrows its loaded models
instead of loading its own (``cli/remote.py`` is the client).

- ``POST /api/search``: the arguments of ``search.search``; answers ``{"hits": [SearchHit...]}``.
- ``POST /api/ask``: the arguments of ``generation.answer_question``; answers NDJSON lines, each
  ``{"token": piece}`` as the model writes, then ``{"result": GenerateResult}`` or ``{"error": why}``.

Both sit behind the same Origin and bearer-token checks as ``/mcp`` (``http.AccessGuard``). Every
request names the index file it means (``db``); another index gets 409, so the client runs locally.
Bad arguments get 400 with the reason, which the CLI prints as its own error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio.to_thread

from .. import generation
from ..search import MAX_K, parse_since, search
from ..settings import is_database_url
from .schemas import generate_result
from .tools import EXPECTED

logger = logging.getLogger(__name__)

API_VERSION = 1


def register_api(server: Any) -> None:
    """Add ``/api/search`` and ``/api/ask`` to ``server``'s HTTP app."""
    from starlette.responses import JSONResponse, StreamingResponse

    async def read(request: Any) -> tuple[Any, dict, JSONResponse | None]:
        state = server.state
        if state is None:
            return None, {}, JSONResponse({"error": "the server is starting"}, status_code=503)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return state, {}, JSONResponse({"error": "send a JSON object"}, status_code=400)
        if not _same_index(state.store.path, body.get("db")):
            return (
                state,
                body,
                JSONResponse({"error": f"this server serves {state.store.path}"}, status_code=409),
            )
        return state, body, None

    @server.custom_route("/api/search", methods=["POST"], include_in_schema=False)
    async def api_search(request: Any) -> JSONResponse:
        state, body, refused = await read(request)
        if refused is not None:
            return refused
        try:
            kwargs = _search_args(body)
            hits = await anyio.to_thread.run_sync(lambda: search(state.store, state.embedder, **kwargs))
        except (ValueError, LookupError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"version": API_VERSION, "hits": [asdict(h) for h in hits]})

    @server.custom_route("/api/ask", methods=["POST"], include_in_schema=False)
    async def api_ask(request: Any) -> Any:
        state, body, refused = await read(request)
        if refused is not None:
            return refused
        try:
            kwargs = _ask_args(body)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return StreamingResponse(_ask_lines(state, kwargs), media_type="application/x-ndjson")


def _same_index(served: Path | str, wanted: Any) -> bool:
    if is_database_url(wanted) or is_database_url(served):
        return wanted == served  # both the URL without its password (store.path, remote.index_name)
    try:
        return isinstance(wanted, str) and Path(wanted).resolve() == Path(served).resolve()
    except OSError:
        return False


def _search_args(body: dict) -> dict:
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("give a query")
    k = int(body.get("k", 8))
    if not 1 <= k <= MAX_K:
        raise ValueError(f"-k {k} is out of range: use 1 to {MAX_K}")
    return {
        "query": query,
        "k": k,
        "mode": str(body.get("mode", "hybrid")),
        "path_glob": body.get("path_glob"),
        "file_types": body.get("file_types"),
        "modified_after": parse_since(body.get("modified_after")),
        "vector_weight": float(body.get("vector_weight", 1.0)),
        "keyword_weight": float(body.get("keyword_weight", 1.0)),
        "rrf_k": int(body.get("rrf_k", 60)),
    }


def _ask_args(body: dict) -> dict:
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("give a question")
    out: dict = {"question": question, "use_context": bool(body.get("use_context", True))}
    for key, kind in (
        ("k", int),
        ("max_tokens", int),
        ("temperature", float),
        ("adapter", str),
        ("system", str),
        ("adapter_scale", float),
    ):
        if body.get(key) is not None:
            out[key] = kind(body[key])
    return out


async def _ask_lines(state: Any, kwargs: dict):
    """Run the answer on a thread and yield its tokens, then the result, as NDJSON lines."""
    from .progress import Cancelled
    from .tools import _generator_for_request

    question = kwargs.pop("question")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def on_token(piece: str) -> None:
        if gone.is_set():
            raise Cancelled()
        loop.call_soon_threadsafe(queue.put_nowait, {"token": piece})

    def work(generator: Any) -> dict:
        answer = generation.answer_question(
            question, generator=generator, store=state.store, embedder=state.embedder,
            on_token=on_token, settings=state.settings,
            adapters=state.adapters if kwargs.get("adapter") else None, **kwargs,
        )  # fmt: skip
        return {"result": generate_result(answer).model_dump(mode="json")}

    async def run() -> None:
        try:
            generator = await _generator_for_request(state, kwargs.get("adapter"))
            final = await anyio.to_thread.run_sync(work, generator, abandon_on_cancel=True)
        except Exception as exc:  # a ToolError or an expected failure: the CLI prints it as its error
            if not isinstance(exc, EXPECTED) and not isinstance(exc.__cause__, EXPECTED):
                logger.exception("ask failed")
            final = {"error": str(exc) or exc.__class__.__name__}
        await queue.put(final)

    task = asyncio.ensure_future(run())
    try:
        while True:
            item = await queue.get()
            yield (json.dumps(item) + "\n").encode("utf-8")
            if "token" not in item:
                break
    finally:
        gone.set()
        if not task.done():
            task.cancel()
