"""WebSocket transport for `/stt/websocket`: handshake, the receive loop, ordered sending, and closing.

The handshake authenticates before upgrading: a refused client gets a plain HTTP status with the JSON error
body, which is what every Cartesia client reports on. Parameter problems are reported after the upgrade as
an `error` event followed by close 1008, as the spec recommends. After `close`/`done` every final still
pending is sent, then `done`, then a 1000 close, so nothing the client sent is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from stenograph import logs, metrics, protocol
from stenograph.asr import Engine
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE, sample_width
from stenograph.auth import Authenticator
from stenograph.config import Settings
from stenograph.errors import ApiError, bad_request
from stenograph.http_routes import new_request_id
from stenograph.limits import SessionLimiter
from stenograph.shutdown import ShutdownCoordinator
from stenograph.streaming import FlushDone, StreamConfig, StreamSession, TranscriptUpdate

log = logging.getLogger("stenograph.ws")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011


def parse_keyterms(values: list[str], settings: Settings) -> tuple[str, ...]:
    terms = tuple(t.strip() for t in values if t.strip())
    if len(terms) > settings.max_keyterms or sum(len(t) for t in terms) > settings.max_keyterm_chars:
        raise bad_request(
            f"at most {settings.max_keyterms} keyterms and {settings.max_keyterm_chars} characters in total",
            title="Invalid parameter",
        )
    return terms


def parse_stream_config(engine: Engine, params: Mapping[str, str], keyterms: list[str]) -> StreamConfig:
    model_id = (params.get("model") or "").strip()
    if not model_id:
        raise bad_request("model is required", title="Missing parameter")
    engine.recognizer(model_id)
    encoding = protocol.parse_encoding(params, ENCODINGS)
    assert encoding is not None
    s = engine.settings
    return StreamConfig(
        model_id=model_id,
        language=protocol.parse_language(params.get("language"), engine.languages(model_id)),
        encoding=encoding,
        sample_rate=protocol.parse_int(params, "sample_rate", None, MIN_INPUT_RATE, MAX_INPUT_RATE),
        min_volume=protocol.parse_float(params, "min_volume", s.stream_min_volume, 0.0, 1.0),
        max_silence=protocol.parse_float(
            params, "max_silence_duration_secs", s.stream_max_silence, 0.1, 30.0
        ),
        keyterms=parse_keyterms(keyterms, s),
        interim_interval=s.stream_interim_interval,
        max_backlog=s.stream_max_backlog,
        beam_size=s.stream_beam_size,
    )


def transcript_payload(out: TranscriptUpdate, request_id: str) -> dict[str, Any]:
    return protocol.transcript_event(
        request_id, out.text, out.is_final, out.duration, out.language, out.words
    )


class StreamEndpoint:
    """The lifecycle both WebSocket endpoints share; subclasses supply the session and its wire mapping.

    Order of a connection: authenticate and take a concurrency slot (refusals are HTTP statuses, before the
    upgrade) -> accept with `X-Request-Id` -> parse parameters (errors: `error` event, close 1008) ->
    `on_open` -> receive audio and commands while a sender task writes the session's outputs in order.
    It ends in one of three ways: the client's end command (pending outputs are sent, then `on_closed` and a
    1000 close), server shutdown (pending outputs are sent, then a 1001 close), or the client leaving (all
    work for the session is cancelled).
    """

    endpoint = "websocket"  # metrics label

    def __init__(
        self, engine: Engine, auth: Authenticator, limits: SessionLimiter, shutdown: ShutdownCoordinator
    ) -> None:
        self.engine = engine
        self.auth = auth
        self.limits = limits
        self.shutdown = shutdown

    # -- hooks -------------------------------------------------------------------------------------------

    def open_session(self, params: QueryParams) -> Any:
        raise NotImplementedError

    async def on_open(self, ws: WebSocket, request_id: str) -> None:
        """Called once the session exists, before any audio is read."""

    async def feed(self, session: Any, data: bytes) -> None:
        raise NotImplementedError

    async def on_text(self, ws: WebSocket, session: Any, request_id: str, text: str) -> bool:
        """Handle a text frame; True when it was the end command (the session has been flushed)."""
        raise NotImplementedError

    async def flush(self, session: Any) -> None:
        """Make everything buffered final (shutdown); outputs go through the session's queue as usual."""
        raise NotImplementedError

    def render(self, out: Any, request_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    async def on_closed(self, ws: WebSocket, request_id: str) -> None:
        """After the end command's outputs, before the 1000 close."""

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def handle(self, ws: WebSocket) -> None:
        request_id = new_request_id()
        logs.request_id.set(request_id)
        try:
            principal = self.auth.authenticate(ws.headers, ws.query_params)
            self.limits.acquire(principal)
        except ApiError as exc:
            metrics.error(exc.error_code)
            await deny(ws, exc, request_id)
            return
        try:
            with metrics.session(self.endpoint):
                await self._run(ws, request_id)
        finally:
            self.limits.release(principal)

    async def _run(self, ws: WebSocket, request_id: str) -> None:
        await ws.accept(headers=[(b"x-request-id", request_id.encode())])
        try:
            session = self.open_session(ws.query_params)
        except ApiError as exc:
            metrics.error(exc.error_code)
            await send_error_and_close(ws, exc, request_id)
            return
        await self.on_open(ws, request_id)
        sender = asyncio.ensure_future(self._send_outputs(ws, session, request_id))
        try:
            ending = await self._receive(ws, session, request_id, sender)
        except ApiError as exc:
            metrics.error(exc.error_code)
            session.cancel()
            sender.cancel()
            await send_error_and_close(ws, exc, request_id)
            return
        except WebSocketDisconnect:
            ending = "left"
        if ending == "left":  # nobody is listening any more: stop decoding
            session.cancel()
            sender.cancel()
            return
        session.outputs.put_nowait(_end())
        try:
            await sender
        except Exception:
            return  # the sender already reported the failure and closed the socket
        if ending == "closed":
            await self.on_closed(ws, request_id)
            await close(ws, CLOSE_NORMAL)
        else:
            await close(ws, CLOSE_GOING_AWAY)

    async def _receive(
        self, ws: WebSocket, session: Any, request_id: str, sender: asyncio.Future[None]
    ) -> str:
        """Feed frames until the end command ("closed"), a shutdown ("drained") or the client leaves."""
        settings = self.engine.settings
        idle = settings.idle_timeout
        deadline = time.monotonic() + settings.max_session_seconds
        draining = asyncio.ensure_future(self.shutdown.draining.wait())
        bytes_per_second = sample_width(session.config.encoding) * session.config.sample_rate
        try:
            while True:
                receiving = asyncio.ensure_future(ws.receive())
                timeout = min(idle, deadline - time.monotonic())
                done, _ = await asyncio.wait(
                    {receiving, draining}, timeout=timeout, return_when=FIRST_COMPLETED
                )
                if not done:
                    receiving.cancel()
                    if time.monotonic() >= deadline:
                        raise ApiError(
                            408,
                            "session_too_long",
                            "Session too long",
                            f"sessions last at most {settings.max_session_seconds:g} s; open a new one",
                        )
                    raise ApiError(408, "idle_timeout", "Idle timeout", f"no audio or message for {idle:g} s")
                if receiving not in done:
                    receiving.cancel()
                    await self.flush(session)
                    return "drained"
                message = receiving.result()
                if message["type"] == "websocket.disconnect" or sender.done():
                    return "left"
                data = message.get("bytes")
                if data is not None:
                    metrics.audio_seconds(len(data) / bytes_per_second, self.endpoint)
                    await self.feed(session, data)
                elif await self.on_text(ws, session, request_id, message.get("text") or ""):
                    return "closed"
        finally:
            draining.cancel()

    async def _send_outputs(self, ws: WebSocket, session: Any, request_id: str) -> None:
        while True:
            item = await session.outputs.get()
            try:
                out = await item
            except ApiError as exc:
                metrics.error(exc.error_code)
                await send_json(ws, protocol.ws_error_event(exc, request_id))
                continue
            except Exception:
                log.exception("%s %s: decode failed", self.endpoint, request_id)
                error = ApiError(500, "internal_error", "Internal error", "transcription failed")
                metrics.error(error.error_code)
                await send_error_and_close(ws, error, request_id, CLOSE_INTERNAL)
                raise
            if out is _END:
                return
            payload = None if out is None else self.render(out, request_id)
            if payload is not None:
                await send_json(ws, payload)


class ManualStream(StreamEndpoint):
    """`WS /stt/websocket`: transcripts as deltas, `finalize` -> finals + `flush_done`, `close`/`done`."""

    endpoint = "websocket"

    def open_session(self, params: QueryParams) -> StreamSession:
        config = parse_stream_config(self.engine, params, params.getlist("keyterm"))
        return StreamSession(self.engine, self.engine.recognizer(config.model_id), config)

    async def feed(self, session: StreamSession, data: bytes) -> None:
        session.feed(data)

    async def flush(self, session: StreamSession) -> None:
        session.flush_all()

    async def on_text(self, ws: WebSocket, session: StreamSession, request_id: str, text: str) -> bool:
        command = parse_command(text)
        if command == "finalize":
            session.finalize()
            return False
        if command in ("close", "done"):
            session.flush_all()
            return True
        error = bad_request(
            f"unknown message {command!r}; send audio as binary frames, or 'finalize', 'close' or 'done'",
            title="Invalid message",
        )
        await send_json(ws, protocol.ws_error_event(error, request_id))
        return False

    def render(self, out: TranscriptUpdate | FlushDone, request_id: str) -> dict[str, Any]:
        if isinstance(out, FlushDone):
            metrics.observe_ttct(time.monotonic() - out.requested_at, self.endpoint)
            return protocol.simple_event("flush_done", request_id)
        return transcript_payload(out, request_id)

    async def on_closed(self, ws: WebSocket, request_id: str) -> None:
        await send_json(ws, protocol.simple_event("done", request_id))


_END: Any = object()


async def _end() -> Any:
    return _END


def parse_command(text: str) -> str:
    """Bare `finalize`/`close`/`done`, tolerating whitespace, quotes and a JSON `{"type": ...}` wrapper."""
    text = text.strip()
    if text.startswith("{") or text.startswith('"'):
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                return str(parsed.get("type", "")).strip()
            if isinstance(parsed, str):
                return parsed.strip()
    return text


async def deny(ws: WebSocket, error: ApiError, request_id: str) -> None:
    """Refuse the upgrade with an HTTP status and the JSON error body (clients report the status)."""
    body = protocol.http_error_body(error, request_id)
    response = JSONResponse(body, status_code=error.status, headers={"X-Request-Id": request_id})
    try:
        await ws.send_denial_response(response)
    except RuntimeError:  # server without the denial extension: accept, report, close
        await send_error_and_close(ws, error, request_id)


async def send_json(ws: WebSocket, payload: dict[str, Any]) -> None:
    if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await ws.send_text(json.dumps(payload, ensure_ascii=False))


async def close(ws: WebSocket, code: int) -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code)


async def send_error_and_close(
    ws: WebSocket, error: ApiError, request_id: str, code: int = CLOSE_POLICY
) -> None:
    if ws.application_state == WebSocketState.CONNECTING:
        await ws.accept(headers=[(b"x-request-id", request_id.encode())])
    await send_json(ws, protocol.ws_error_event(error, request_id))
    await close(ws, code)
