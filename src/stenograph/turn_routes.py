"""WebSocket transport for `/stt/turns/websocket` (Cartesia's "auto" endpoint with turn detection).

Same handshake rules as `/stt/websocket` (auth refused before the upgrade; bad parameters as an `error` event
in place of `connected`, then close 1008). `connected` is the first event. Audio arrival drives the turn
logic; the JSON `close` command ends an open turn with `turn.end` and then closes with 1000, and `config`
changes the turn thresholds mid-session (no acknowledgement; an invalid one is an `error` event, and the
session goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from stenograph import protocol
from stenograph.asr import Engine
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE
from stenograph.auth import Authenticator
from stenograph.errors import ApiError, bad_request, model_not_found
from stenograph.http_routes import new_request_id
from stenograph.turns import (
    EAGER_END_RANGE,
    END_RANGE,
    END_TIMEOUT_RANGE,
    START_RANGE,
    TurnConfig,
    TurnParams,
    TurnSession,
)
from stenograph.ws_routes import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    close,
    deny,
    parse_command,
    parse_keyterms,
    send_error_and_close,
    send_json,
)

log = logging.getLogger("stenograph.turns")

TURN_MODELS = ("ink-2",)
# Query parameter (and `config` field) names with their spec ranges.
TURN_FIELDS = {
    "start_threshold": START_RANGE,
    "eager_end_threshold": EAGER_END_RANGE,
    "end_threshold": END_RANGE,
    "end_timeout_ms": END_TIMEOUT_RANGE,
}


def parse_turn_config(engine: Engine, params: Mapping[str, str], keyterms: list[str]) -> TurnConfig:
    model_id = (params.get("model") or "").strip()
    if not model_id:
        raise bad_request("model is required", title="Missing parameter")
    if model_id not in TURN_MODELS:
        raise model_not_found(model_id, list(TURN_MODELS))
    encoding = protocol.parse_encoding(params, ENCODINGS)
    assert encoding is not None
    s = engine.settings
    defaults = TurnParams(
        s.turn_start_threshold, s.turn_eager_end_threshold, s.turn_end_threshold, s.turn_end_timeout_ms
    )
    turn = TurnParams(
        **{
            name: protocol.parse_float(params, f"turn_{name}", getattr(defaults, name), lo, hi)
            for name, (lo, hi) in TURN_FIELDS.items()
        }
    ).checked()
    return TurnConfig(
        model_id=model_id,
        encoding=encoding,
        sample_rate=protocol.parse_int(params, "sample_rate", None, MIN_INPUT_RATE, MAX_INPUT_RATE),
        params=turn,
        keyterms=parse_keyterms(keyterms, s),
        update_interval=s.turn_update_interval,
        max_backlog=s.stream_max_backlog,
        beam_size=s.stream_beam_size,
    )


def parse_turn_changes(text: str) -> dict[str, float]:
    """The `turn` object of a `config` command: known fields, each a number; unknown fields are ignored."""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise bad_request(
            'config must be a JSON object: {"type": "config", "turn": {...}}', title="Invalid message"
        )
    turn = message.get("turn", {})
    if not isinstance(turn, dict):
        raise bad_request("config.turn must be an object", title="Invalid message")
    changes: dict[str, float] = {}
    for name in TURN_FIELDS:
        value = turn.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"config.turn.{name} must be a number, got {value!r}", title="Invalid message")
        changes[name] = float(value)
    return changes


class TurnStream:
    """`WS /stt/turns/websocket`."""

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
            config = parse_turn_config(self.engine, ws.query_params, ws.query_params.getlist("keyterm"))
        except ApiError as exc:
            await send_error_and_close(ws, exc, request_id)
            return
        session = TurnSession(self.engine, self.engine.recognizer(config.model_id), config)
        await send_json(ws, protocol.simple_event("connected", request_id))
        sender = asyncio.ensure_future(self._send_outputs(ws, session, request_id))
        try:
            closing = await self._receive(ws, session, request_id, sender)
        except ApiError as exc:
            sender.cancel()
            session.cancel()
            await send_error_and_close(
                ws, exc, request_id, CLOSE_INTERNAL if exc.status >= 500 else CLOSE_POLICY
            )
            return
        except WebSocketDisconnect:
            closing = False
        if not closing:  # the client left: nobody is listening, stop decoding
            sender.cancel()
            session.cancel()
            return
        session.outputs.put_nowait(_end())
        try:
            await sender
        except Exception:
            return  # the sender already reported the failure and closed the socket
        await close(ws, CLOSE_NORMAL)

    async def _receive(
        self, ws: WebSocket, session: TurnSession, request_id: str, sender: asyncio.Future[None]
    ) -> bool:
        """Feed audio and commands until `close` (True) or the client disconnects (False)."""
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
                await session.feed(data)
                continue
            text = message.get("text") or ""
            command = parse_command(text)
            try:
                if command == "close":
                    await session.finish()
                    return True
                if command == "config":
                    session.configure(parse_turn_changes(text))
                    continue
                raise bad_request(
                    f"unknown message {command!r}; send audio as binary frames, or JSON "
                    '{"type": "close"} or {"type": "config", "turn": {...}}',
                    title="Invalid message",
                )
            except ApiError as exc:
                if exc.status == 429:
                    raise
                await send_json(ws, protocol.ws_error_event(exc, request_id))

    async def _send_outputs(self, ws: WebSocket, session: TurnSession, request_id: str) -> None:
        while True:
            item = await session.outputs.get()
            try:
                out = await item
            except ApiError as exc:
                await send_json(ws, protocol.ws_error_event(exc, request_id))
                continue
            except Exception:
                log.exception("turns %s: decode failed", request_id)
                session.cancel()
                error = ApiError(500, "internal_error", "Internal error", "transcription failed")
                await send_error_and_close(ws, error, request_id, CLOSE_INTERNAL)
                raise
            if out is _END:
                return
            if out is None:
                continue
            fields = {} if out.transcript is None else {"transcript": out.transcript}
            await send_json(ws, protocol.simple_event(out.kind, request_id, **fields))


_END: Any = object()


async def _end() -> Any:
    return _END
