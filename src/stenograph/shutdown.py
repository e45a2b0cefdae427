"""Graceful shutdown: on SIGTERM, stop accepting, let open streams finish, then let uvicorn close the rest.

Uvicorn's own shutdown closes every WebSocket at once with 1012, which would lose the final transcript of
audio a client has already sent. So the server runs as `GracefulServer`, which puts a drain in front of it:

1. the listening sockets close (no new connections) and the limiter refuses new streams with 503
   `shutting_down` (keep-alive HTTP connections can still ask); `/readyz` turns 503;
2. `ShutdownCoordinator.draining` is set;
3. the server waits, at most `shutdown_grace_seconds`, until every stream has released its limiter slot;
4. uvicorn's normal shutdown follows: in-flight HTTP responses complete, remaining sockets are closed.

Contract for session code (the WebSocket endpoints):

- Hold `app.state.limits.session(principal, endpoint)` for the whole session: releasing the slot is how the
  drain knows the session is done.
- Watch `app.state.shutdown.draining` (an `asyncio.Event`), e.g. race `draining.wait()` against the
  receive loop. When it fires, stop taking audio, finalize what is buffered exactly as on `close` (emit the
  pending final transcripts, or `turn.end` for an open turn), then close the socket with code 1001
  ("going away"), which the SDKs treat as a clean end (and a reason to reconnect elsewhere, if configured).
- Batch requests need nothing: they simply finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn
from starlette.applications import Starlette

from stenograph.config import Settings
from stenograph.limits import SessionLimiter

log = logging.getLogger("stenograph")

# After the drain, how long uvicorn may still wait for responses being written before it cancels them.
FINAL_FLUSH_SECONDS = 5


class ShutdownCoordinator:
    def __init__(self, limiter: SessionLimiter, grace_seconds: float) -> None:
        self.limiter = limiter
        self.grace_seconds = grace_seconds
        self.draining = asyncio.Event()

    @property
    def is_draining(self) -> bool:
        return self.draining.is_set()

    async def drain(self) -> None:
        """Refuse new streams, signal open ones, and wait (bounded) for them to finish."""
        if self.draining.is_set():
            return
        self.limiter.close()
        self.draining.set()
        open_streams = self.limiter.active
        if not open_streams:
            return
        log.info("shutting down: waiting up to %.0f s for %d stream(s)", self.grace_seconds, open_streams)
        started = time.monotonic()
        if await self.limiter.wait_idle(self.grace_seconds):
            log.info("all streams finished in %.2f s", time.monotonic() - started)
        else:
            log.warning("shutdown grace period over; closing %d stream(s)", self.limiter.active)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, coordinator: ShutdownCoordinator) -> None:
        super().__init__(config)
        self.coordinator = coordinator

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        drain = asyncio.ensure_future(self.coordinator.drain())
        # A second Ctrl-C (uvicorn's force exit) cuts the grace period short.
        while not drain.done() and not self.force_exit:
            await asyncio.wait({drain}, timeout=0.1)
        drain.cancel()
        await super().shutdown(sockets)


def serve(app: Starlette, settings: Settings, log_level: str) -> None:
    """Run an app from `create_app` under uvicorn with the drain above; logging as `logs.configure` set it."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,
        ws_max_size=settings.max_frame_bytes,
        timeout_graceful_shutdown=FINAL_FLUSH_SECONDS,
    )
    GracefulServer(config, app.state.shutdown).run()
