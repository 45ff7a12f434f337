"""The client side of ``mcp/api.py``: ``search`` and ``ask`` borrow a running ``serve --http``.

A server already holds the embedder (and the generator) in memory, so a command that finds one
answers in milliseconds instead of loading models. It is found where the settings say it listens
(127.0.0.1 and the ``http_port`` setting), with the bearer token the server uses (the ``token``
setting or the token file in the data directory; no token file means no server was started with
this data directory). The connection must open within ``CONNECT_TIMEOUT`` seconds; otherwise, or
when the server serves another index, is too old, or fails, the command runs locally as if there
were none. Only the standard library is imported here.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ..settings import Settings, redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 0.2  # seconds: a server on this machine answers a connect in well under this
READ_TIMEOUT = 600.0  # seconds between two pieces of an answer (the server may still be loading models)


class RemoteError(Exception):
    """The server refused the request for a reason the user must see (a bad glob, an unknown adapter)."""


def _token(settings: Settings) -> str | None:
    if settings.token:
        return settings.token
    path = settings.token_path
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def index_name(settings: Settings) -> str:
    """The index as the server names it (its ``store.path``): the file, or the URL without password."""
    return redact_url(settings.db_url) if settings.db_url else str(settings.db_path.resolve())


def _post(settings: Settings, route: str, payload: dict) -> http.client.HTTPResponse | None:
    """POST ``payload`` to the running server; None when there is none to use (see module doc)."""
    if not settings.reuse_server:
        return None
    token = _token(settings)
    if token is None:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", settings.http_port, timeout=CONNECT_TIMEOUT)
    try:
        conn.connect()
        conn.sock.settimeout(READ_TIMEOUT)
        body = json.dumps(payload | {"db": index_name(settings)}).encode("utf-8")
        conn.request("POST", route, body=body, headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset
        log.info("no lorekeeper server to reuse on port %d: %s", settings.http_port, exc)
        conn.close()
        return None
    if response.status == 400:
        reason = _error_of(response.read())
        conn.close()
        raise RemoteError(reason)
    if response.status != 200:  # another index (409), an older server (404), a wrong token (401)
        log.info("the server on port %d answered %d; running locally", settings.http_port, response.status)
        conn.close()
        return None
    return response


def _error_of(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip() or "the server refused the request"


def search(settings: Settings, **kwargs: Any) -> list | None:
    """The hits of ``search.search(**kwargs)`` as the server found them, or None (run locally)."""
    response = _post(settings, "/api/search", kwargs)
    if response is None:
        return None
    try:
        data = json.loads(response.read())
    except (OSError, ValueError) as exc:
        log.warning("the server's answer was unreadable (%s); searching locally", exc)
        return None
    from ..hits import SearchHit

    return [SearchHit(**hit) for hit in data["hits"]]


def ask(settings: Settings, on_token: Callable[[str], None] | None, **kwargs: Any) -> dict | None:
    """The ``GenerateResult`` (as a dict) of an answer the server wrote, its tokens passed to
    ``on_token`` as they come; None when there is no server to ask (run locally)."""
    response = _post(settings, "/api/ask", kwargs)
    if response is None:
        return None
    for item in _lines(response):
        if "token" in item:
            if on_token is not None:
                on_token(item["token"])
        elif "error" in item:
            raise RemoteError(str(item["error"]))
        elif "result" in item:
            return item["result"]
    raise RemoteError("the lorekeeper server stopped before the answer was complete")


def _lines(response: http.client.HTTPResponse) -> Iterator[dict]:
    try:
        for raw in response:
            if raw.strip():
                yield json.loads(raw)
    except (OSError, ValueError) as exc:
        raise RemoteError(f"the lorekeeper server stopped answering: {exc}") from exc
