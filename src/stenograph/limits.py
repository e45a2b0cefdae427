"""Concurrent-session limits: every open STT stream, a batch request or a WebSocket session, holds one slot.

The caps are the server's admission control, in front of the model queue: past them a new stream is refused
at once with 429 `concurrency_limited` (and `Retry-After`), before any audio is read, instead of being
admitted and then starved. Slots are counted globally and per API key; an access token counts against the
key that minted it. On an open server (no keys) every caller is the same identity, so only the global cap
applies there.

Counting happens on the event loop only (acquire and release are synchronous), so no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from stenograph import metrics
from stenograph.auth import OPEN, Principal
from stenograph.errors import ApiError, overloaded


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "Shutting down", "the server is shutting down; retry shortly")


class SessionLimiter:
    def __init__(self, max_sessions: int, max_sessions_per_key: int) -> None:
        self.max_sessions = max_sessions  # 0 = unlimited
        self.max_sessions_per_key = max_sessions_per_key  # 0 = unlimited
        self._per_key: Counter[str] = Counter()
        self._active = 0
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    @contextlib.asynccontextmanager
    async def session(self, principal: Principal, endpoint: str) -> AsyncIterator[None]:
        """Hold a slot for the whole stream: `async with app.state.limits.session(principal, "websocket"):`.

        Raises ApiError (429 `concurrency_limited`, or 503 `shutting_down` once shutdown has begun) on entry,
        before the body is yielded to; the caller turns it into the HTTP error or the refused handshake.
        """
        self.acquire(principal)
        try:
            with metrics.session(endpoint):
                yield
        finally:
            self.release(principal)

    def acquire(self, principal: Principal) -> None:
        if self._closed:
            raise shutting_down()
        if self.max_sessions and self._active >= self.max_sessions:
            raise self._refusal(f"the server is at its limit of {self.max_sessions} concurrent streams")
        per_key = principal.key_id != OPEN.key_id and self.max_sessions_per_key
        if per_key and self._per_key[principal.key_id] >= self.max_sessions_per_key:
            raise self._refusal(f"this API key is at its limit of {self.max_sessions_per_key} open streams")
        self._active += 1
        self._per_key[principal.key_id] += 1
        self._idle.clear()

    def release(self, principal: Principal) -> None:
        self._active -= 1
        self._per_key[principal.key_id] -= 1
        if self._per_key[principal.key_id] <= 0:
            del self._per_key[principal.key_id]
        if self._active == 0:
            self._idle.set()

    def close(self) -> None:
        """Refuse every new stream from now on (shutdown); open ones keep their slots until they finish."""
        self._closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream is open; False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _refusal(message: str) -> ApiError:
        error = overloaded(message)
        error.headers = {"Retry-After": "1"}
        return error
