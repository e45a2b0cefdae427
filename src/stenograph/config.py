"""Server settings: one frozen dataclass filled from environment variables, then from CLI flags.

Every limit the server enforces lives here with its default, so an operator can find and change it in one
place (and the README's configuration table is generated from the same names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DEFAULT_API_VERSION = "2026-03-01"


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _parse_map(value: str) -> dict[str, str]:
    """`name=path,name2=path2` -> dict; used for extra model directories."""
    out: dict[str, str] = {}
    for item in _split_csv(value):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"expected NAME=PATH, got {item!r}")
        out[name.strip()] = path.strip()
    return out


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Refuse to listen beyond loopback without API keys unless this is set.
    allow_open: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    model_dir: Path = Path("models")
    # Which catalogue model (or extra model name) serves `ink-2`; `ink-whisper*` is always whisper-base.
    ink2_model: str = "whisper-base"
    # Extra CTranslate2 Whisper directories exposed under their own model ids, e.g. large-v3 on a GPU box.
    extra_models: dict[str, str] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str = "default"  # default: int8 on CPU, float16 on CUDA
    # Concurrent model calls; each call uses cpu_threads threads.
    workers: int = 2
    cpu_threads: int = 1
    # Batch decoding accuracy knob (streaming uses its own, latency-oriented setting).
    beam_size: int = 5
    # Bounds.
    max_upload_bytes: int = 200 * 1024 * 1024
    # Decoded length of one batch file: a low-bitrate codec can pack days of audio into the upload limit.
    max_audio_seconds: float = 4 * 3600.0
    upload_idle_timeout: float = 30.0  # an upload that sends nothing for this long gets 408 (frees its slot)
    max_queued_jobs: int = 64
    batch_chunk_seconds: float = 28.0
    # Concurrent STT streams (each batch request or WebSocket session is one); 0 = unlimited.
    max_sessions: int = 32
    max_sessions_per_key: int = 0
    max_frame_bytes: int = 1 << 20  # largest WebSocket message
    max_keyterms: int = 100  # per session, and at most max_keyterm_chars characters in total
    max_keyterm_chars: int = 1200
    max_session_seconds: float = 4 * 3600.0  # wall-clock length of one WebSocket session
    # On SIGTERM, how long open sessions get to deliver their pending finals before they are closed.
    shutdown_grace_seconds: float = 30.0
    # Access tokens: HS256 secret (empty: generated once into <state_dir>/token-secret), default lifetime.
    token_secret: str = field(default="", repr=False)
    state_dir: Path | None = None  # None: the model directory
    token_default_ttl: int = 60
    # The live-captions page (`/app`): whether `POST /app/token` mints `stt` tokens on a keyed server (an
    # open server always does), and how long those tokens live.
    app_tokens: bool = False
    app_token_ttl: int = 60
    # Browser origins allowed by CORS ("*" for any); none by default.
    cors_origins: tuple[str, ...] = ()
    metrics: bool = True  # serve Prometheus text at /metrics
    log_format: str = "text"  # text | json (one object per line, with request_id)
    api_version: str = DEFAULT_API_VERSION
    # Streaming (`/stt/websocket`): defaults for the query parameters and the latency/accuracy knobs.
    idle_timeout: float = 180.0  # seconds without any inbound frame before the session is closed
    stream_min_volume: float = 0.0  # frame RMS below this is silence whatever the VAD says
    stream_max_silence: float = 1.0  # auto-finalize after this much silence following speech
    stream_interim_interval: float = 1.0  # seconds of new audio between interim decodes
    stream_max_backlog: float = 300.0  # seconds of untranscribed audio a session may queue
    stream_beam_size: int = 1
    # Interims of English sessions are decoded with this smaller model (empty: the session's own model):
    # they are for display, get replaced by the final, and are most of a stream's model time.
    stream_interim_model: str = "whisper-tiny.en"
    # Turn detection (`/stt/turns/websocket`): defaults for the turn_* query parameters, and the knobs.
    turn_start_threshold: float = 0.8
    turn_eager_end_threshold: float = 0.4
    turn_end_threshold: float = 0.2
    turn_end_timeout_ms: float = 5600.0
    turn_update_interval: float = 1.0  # seconds of new speech between turn.update decodes
    # `turn.update` decodes use this smaller English model (empty: the session's own model) ...
    turn_update_model: str = "whisper-tiny.en"
    # ... and the decode at each pause, whose words end the turn and whose sentence-end probability decides
    # `turn.eager_end`/`turn.end`, this one. It is what the latency waits for: on a CPU whisper-tiny.en takes
    # half of base's time, but costs WER on harder audio (see the README).
    turn_pause_model: str = ""
    turn_threads: int = 1  # onnxruntime intra-op threads per Smart Turn call
    # Score each pause at its first silent frame too, for `turn.eager_end` (on | off | auto: on where the
    # pause decode runs on a GPU). On a CPU the decode is the wait, and the extra scores cost capacity.
    turn_early_score: str = "auto"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("STENOGRAPH_" + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(f.name, f.type, raw)
        return cls(**values)  # type: ignore[arg-type]

    def with_overrides(self, **overrides: object) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")


def _coerce(name: str, type_name: object, raw: str) -> object:
    kind = str(type_name)
    try:
        if kind == "bool":
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind in {"Path", "Path | None"}:
            return Path(raw)
        if kind.startswith("tuple"):
            return _split_csv(raw)
        if kind.startswith("dict"):
            return _parse_map(raw)
    except ValueError as exc:
        raise ValueError(f"STENOGRAPH_{name.upper()}: {exc}") from exc
    return raw
