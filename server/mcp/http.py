"""Streamable HTTP for ``lorekeeper serve --http``: a bearer token and an Origin check in front.

The server binds to loopback by default. Every request needs ``Authorization: Bearer <token>``
(compared in constant time; 401 otherwise), and a browser page from another origin gets 403 (DNS
rebinding). The token lives in the data directory with mode 0600.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from ..settings import Settings

logger = logging.getLogger(__name__)


def load_or_create_token(settings: Settings) -> str:
    """The HTTP bearer token: the ``token`` setting (flag, LOREKEEPER_TOKEN, config), or the one
    stored in the data directory; on first run a random one is written there with mode 0600."""
    if settings.token:
        return settings.token
    path = settings.token_path
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


def http_app(server: Any, token: str, host: str = "127.0.0.1", allowed_origins: Sequence[str] = ()) -> Any:
    """The Streamable HTTP ASGI app at ``/mcp``, behind the Origin and token checks."""
    app = server.streamable_http_app(host=host)
    return AccessGuard(app, token=token, allowed_origins=allowed_origins)


def run_http(
    server: Any,
    *,
    host: str = "127.0.0.1",
    port: int,
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
