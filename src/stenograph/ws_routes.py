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
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from stenograph import protocol
from stenograph.asr import Engine
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE
from stenograph.auth import Authenticator
from stenograph.errors import ApiError, bad_request
from stenograph.http_routes import new_request_id
from stenograph.streaming import FlushDone, StreamConfig, StreamSession, TranscriptUpdate

log = logging.getLogger("stenograph.ws")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
MAX_KEYTERMS = 100
MAX_KEYTERM_CHARS = 1200


def parse_keyterms(values: list[str]) -> tuple[str, ...]:
    terms = tuple(t.strip() for t in values if t.strip())
    if len(terms) > MAX_KEYTERMS or sum(len(t) for t in terms) > MAX_KEYTERM_CHARS:
        raise bad_request(
            f"at most {MAX_KEYTERMS} keyterms and {MAX_KEYTERM_CHARS} characters in total",
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
        keyterms=parse_keyterms(keyterms),
        interim_interval=s.stream_interim_interval,
        max_backlog=s.stream_max_backlog,
        beam_size=s.stream_beam_size,
    )


def transcript_payload(out: TranscriptUpdate, request_id: str, language: str) -> dict[str, Any]:
    return protocol.transcript_event(request_id, out.text, out.is_final, out.duration, language, out.words)


class ManualStream:
    """`WS /stt/websocket` (manual finalize)."""

    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth

    async def handle(self, ws: WebSocket) -> None:
        request_id = new_request_id()
        try:
            self.auth.authenticate(ws.headers, ws.query_params)
        except ApiError as exc:
            await deny(ws, exc, request_id)
            return
        await ws.accept(headers=[(b"x-request-id", request_id.encode())])
        try:
            config = parse_stream_config(self.engine, ws.query_params, ws.query_params.getlist("keyterm"))
        except ApiError as exc:
            await send_error_and_close(ws, exc, request_id)
            return
        session = StreamSession(self.engine, self.engine.recognizer(config.model_id), config)
        sender = asyncio.ensure_future(self._send_outputs(ws, session, request_id, config.language))
        try:
            closing = await self._receive(ws, session, request_id, sender)
        except ApiError as exc:
            session.cancel()
            sender.cancel()
            await send_error_and_close(ws, exc, request_id)
            return
        except WebSocketDisconnect:
            closing = False
        if not closing:  # the client left without `close`: nobody is listening, stop decoding
            session.cancel()
            sender.cancel()
            return
        session.outputs.put_nowait(_end())
        try:
            await sender
        except Exception:
            return  # the sender already reported the failure and closed the socket
        await send_json(ws, protocol.simple_event("done", request_id))
        await close(ws, CLOSE_NORMAL)

    async def _receive(
        self, ws: WebSocket, session: StreamSession, request_id: str, sender: asyncio.Future[None]
    ) -> bool:
        """Feed audio and commands until `close`/`done` (True) or the client disconnects (False)."""
        idle = self.engine.settings.idle_timeout
        while True:
            try:
                message = await asyncio.wait_for(ws.receive(), timeout=idle)
            except TimeoutError:
                raise ApiError(
                    408, "idle_timeout", "Idle timeout", f"no audio or message for {idle:g} s; closing"
                ) from None
            if message["type"] == "websocket.disconnect" or sender.done():
                return False
            data = message.get("bytes")
            if data is not None:
                session.feed(data)
                continue
            command = parse_command(message.get("text") or "")
            if command == "finalize":
                session.finalize()
            elif command in ("close", "done"):
                session.flush_all()
                return True
            else:
                await send_json(
                    ws,
                    protocol.ws_error_event(
                        bad_request(
                            f"unknown message {command!r}; send audio as binary frames, or "
                            "'finalize', 'close' or 'done'",
                            title="Invalid message",
                        ),
                        request_id,
                    ),
                )

    async def _send_outputs(
        self, ws: WebSocket, session: StreamSession, request_id: str, language: str
    ) -> None:
        while True:
            item = await session.outputs.get()
            try:
                out = await item
            except ApiError as exc:
                await send_json(ws, protocol.ws_error_event(exc, request_id))
                continue
            except Exception:
                log.exception("stream %s: decode failed", request_id)
                error = ApiError(500, "internal_error", "Internal error", "transcription failed")
                await send_error_and_close(ws, error, request_id, CLOSE_INTERNAL)
                raise
            if out is _END:
                return
            if isinstance(out, TranscriptUpdate):
                await send_json(ws, transcript_payload(out, request_id, language))
            elif isinstance(out, FlushDone):
                await send_json(ws, protocol.simple_event("flush_done", request_id))


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
