"""Streaming an answer's tokens to the client as MCP progress notifications.

Generation runs on a worker thread; the event loop forwards what it produced. The thread only
appends, and wakes the loop for the first piece of a batch; the loop sends at most one
notification per ``PROGRESS_INTERVAL`` with everything that piled up, so notifications never slow
the model (the thread shares the GIL with the loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

PROGRESS_INTERVAL = 0.05  # at most 20 token notifications a second; each carries what piled up


class TokenRelay:
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


class Cancelled(Exception):
    """Raised inside the generation thread once the client has gone."""


def unwrap(exc: BaseException) -> BaseException:
    """The single real error inside anyio's exception groups."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
