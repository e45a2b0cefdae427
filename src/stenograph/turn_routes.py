"""WebSocket transport for `/stt/turns/websocket` (Cartesia's "auto" endpoint with turn detection).

The connection's lifecycle (auth and a concurrency slot before the upgrade, bad parameters as an `error` event
in place of `connected` then close 1008, idle and session-length limits, draining on shutdown) is the shared
`StreamEndpoint`'s. `connected` is the first event. Audio arrival drives the turn logic; the JSON `close`
command ends an open turn with `turn.end` and then closes with 1000, and `config` changes the turn thresholds
mid-session (no acknowledgement; an invalid one is an `error` event, and the session goes on).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from starlette.datastructures import QueryParams
from starlette.websockets import WebSocket

from stenograph import protocol
from stenograph.asr import Engine
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE
from stenograph.auth import Authenticator
from stenograph.errors import ApiError, bad_request, model_not_found
from stenograph.limits import SessionLimiter
from stenograph.shutdown import ShutdownCoordinator
from stenograph.turns import (
    EAGER_END_RANGE,
    END_RANGE,
    END_TIMEOUT_RANGE,
    START_RANGE,
    TurnConfig,
    TurnEvent,
    TurnParams,
    TurnSession,
)
from stenograph.ws_routes import StreamEndpoint, parse_command, parse_keyterms, send_json

TURN_MODELS = ("ink-2",)
EARLY_SCORE_CHOICES = ("on", "off", "auto")  # STENOGRAPH_TURN_EARLY_SCORE
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


def early_scoring(setting: str, device: str) -> bool:
    """STENOGRAPH_TURN_EARLY_SCORE for a session whose pause decodes run on `device`."""
    return setting == "on" or (setting == "auto" and device != "cpu")


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


class TurnStream(StreamEndpoint):
    """`WS /stt/turns/websocket`: `connected`, then `turn.*` events; JSON `close` and `config`."""

    endpoint = "turns"

    def __init__(
        self, engine: Engine, auth: Authenticator, limits: SessionLimiter, shutdown: ShutdownCoordinator
    ) -> None:
        early = engine.settings.turn_early_score
        if early not in EARLY_SCORE_CHOICES:
            raise ValueError(f"STENOGRAPH_TURN_EARLY_SCORE must be on, off or auto, got {early!r}")
        super().__init__(engine, auth, limits, shutdown)

    def open_session(self, params: QueryParams) -> TurnSession:
        engine = self.engine
        config = parse_turn_config(engine, params, params.getlist("keyterm"))
        settings = engine.settings
        pauses = engine.interim_recognizer(config.model_id, "en", settings.turn_pause_model)
        updates = engine.interim_recognizer(config.model_id, "en", settings.turn_update_model)
        early = early_scoring(settings.turn_early_score, pauses.device)
        return TurnSession(engine, pauses, replace(config, early_score=early), updates)

    async def on_open(self, ws: WebSocket, request_id: str) -> None:
        await send_json(ws, protocol.simple_event("connected", request_id))

    async def feed(self, session: TurnSession, data: bytes) -> None:
        await session.feed(data)

    async def on_text(self, ws: WebSocket, session: TurnSession, request_id: str, text: str) -> bool:
        command = parse_command(text)
        try:
            if command == "close":
                await session.finish()
                return True
            if command == "config":
                session.configure(parse_turn_changes(text))
                return False
            raise bad_request(
                f"unknown message {command!r}; send audio as binary frames, or JSON "
                '{"type": "close"} or {"type": "config", "turn": {...}}',
                title="Invalid message",
            )
        except ApiError as exc:
            if exc.status == 429:  # the backlog bound: fatal, as for audio
                raise
            await send_json(ws, protocol.ws_error_event(exc, request_id))
            return False

    async def flush(self, session: TurnSession) -> None:
        await session.finish()

    def render(self, out: TurnEvent, request_id: str) -> dict[str, Any]:
        fields = {} if out.transcript is None else {"transcript": out.transcript}
        return protocol.simple_event(out.kind, request_id, **fields)
