"""Cartesia STT wire format: event and response builders, error shapes, and lenient query parsing.

Everything a client can observe on the wire is built here, so compatibility fixes have one home. The engine
returns plain dataclasses; the transport only sends what these functions produce.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stenograph.errors import ApiError, bad_request

# ink-whisper's languages (ISO-639-1 plus haw and yue), as the official SDK enumerates them.
WHISPER_LANGUAGES = frozenset(
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th "
    "ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr "
    "pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt "
    "haw ln ha ba jw su yue".split()
)


def words_payload(words: Iterable[Any]) -> list[dict[str, Any]]:
    """The documented `[{word, start, end}]` shape, times in seconds rounded to the millisecond."""
    return [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in words]


def batch_response(
    text: str, language: str, duration: float, request_id: str, words: Iterable[Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "transcript",
        "text": text,
        "language": language,
        "duration": round(duration, 3),
        "request_id": request_id,
    }
    if words is not None:
        body["words"] = words_payload(words)
    return body


def transcript_event(
    request_id: str,
    text: str,
    is_final: bool,
    duration: float,
    language: str,
    words: Iterable[Any],
) -> dict[str, Any]:
    return {
        "type": "transcript",
        "request_id": request_id,
        "text": text,
        "is_final": is_final,
        "duration": round(duration, 3),
        "language": language,
        "words": words_payload(words),
    }


def simple_event(kind: str, request_id: str, **fields: Any) -> dict[str, Any]:
    """`flush_done`, `done`, `connected`, `turn.*`: a type, the connection id and any extra fields."""
    return {"type": kind, "request_id": request_id, **fields}


def http_error_body(error: ApiError, request_id: str) -> dict[str, Any]:
    return {
        "error_code": error.error_code,
        "title": error.title,
        "message": error.message,
        "request_id": request_id,
    }


def ws_error_event(error: ApiError, request_id: str) -> dict[str, Any]:
    """The union of the current (`status_code`) and legacy (`code`) shapes: clients read one or the other."""
    return {
        "type": "error",
        "title": error.title,
        "message": error.message,
        "error_code": error.error_code,
        "status_code": error.status,
        "code": error.status,
        "request_id": request_id,
    }


# ---------------------------------------------------------------------------------------------------------
# Lenient parameter parsing: numbers may arrive as "16000", "16000.0" or " 0.5 "; unknown keys are ignored.


def parse_float(params: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise bad_request(f"{name} must be a number, got {raw!r}", title="Invalid parameter") from None
    if not (lo <= value <= hi):
        raise bad_request(
            f"{name} must be between {lo:g} and {hi:g}, got {value:g}", title="Invalid parameter"
        )
    return value


def parse_int(params: Mapping[str, str], name: str, default: int | None, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise bad_request(f"{name} is required", title="Missing parameter")
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {raw!r}", title="Invalid parameter") from None
    if value != int(value) or not (lo <= value <= hi):
        raise bad_request(
            f"{name} must be an integer from {lo} to {hi}, got {raw}", title="Invalid parameter"
        )
    return int(value)


def parse_encoding(params: Mapping[str, str], encodings: Iterable[str], required: bool = True) -> str | None:
    raw = (params.get("encoding") or "").strip()
    if not raw:
        if required:
            raise bad_request("encoding is required", title="Missing parameter")
        return None
    allowed = list(encodings)
    if raw not in allowed:
        raise bad_request(
            f"encoding {raw!r} is not supported; use one of: {', '.join(allowed)}", title="Invalid parameter"
        )
    return raw


def parse_language(raw: str | None, allowed: frozenset[str] | None) -> str:
    """Default `en`; reject what the chosen model cannot transcribe (None = any Whisper language)."""
    language = (raw or "").strip().lower() or "en"
    pool = WHISPER_LANGUAGES if allowed is None else allowed
    if language not in pool:
        raise ApiError(
            400,
            "unsupported_language",
            "Unsupported language",
            f"language {language!r} is not supported by this model"
            + ("" if len(pool) > 8 else f"; supported: {', '.join(sorted(pool))}"),
        )
    return language
