"""Index changes become MCP list-changed notifications, and all of the SDK's private parts we use.

Clients on the 2026-07-28 protocol hear changes on ``subscriptions/listen`` through the server's
subscription bus (``InMemorySubscriptionBus``, handed to ``MCPServer`` so we hold it publicly).
Clients that connected with the older initialize handshake get
``notifications/resources/list_changed`` on their connection.

Private SDK parts, mcp 2.3.0, all in this module:

- ``ServerSession._connection``: the connection behind a request's session, which lives on after the
  request and carries connection-wide notifications. The public replacement would be a
  connection-scoped notification API on ``Context`` for handshake-era clients (the SDK's
  ``ctx.notify_resources_changed`` reaches ``subscriptions/listen`` streams only).
- ``MCPServer._lowlevel_server.create_initialization_options``: wrapped so that the capabilities
  say ``resources.listChanged``. The public replacement would be a ``NotificationOptions``
  argument to ``MCPServer`` (its ``run_*`` methods call this without one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .documents import doc_uri

logger = logging.getLogger(__name__)

NOTIFY_COALESCE_SECONDS = 0.25  # a burst of file events becomes one list-changed notification


class ChangeNotifier:
    """Turns committed index changes (on indexer threads) into MCP list-changed notifications.

    Clients on the 2026-07-28 protocol hear them on ``subscriptions/listen``; clients that connected
    with the initialize handshake get ``notifications/resources/list_changed`` on their session.
    """

    def __init__(self, bus: InMemorySubscriptionBus) -> None:
        self.bus = bus
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
        bus = self.bus
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
            connection = getattr(ctx.session, "_connection", None)  # private: see the module docstring
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


def advertise_resource_changes(server: Any) -> None:
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
