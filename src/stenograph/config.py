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
    api_keys: tuple[str, ...] = ()
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
    max_queued_jobs: int = 64
    batch_chunk_seconds: float = 28.0
    api_version: str = DEFAULT_API_VERSION

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
        if kind == "Path":
            return Path(raw)
        if kind.startswith("tuple"):
            return _split_csv(raw)
        if kind.startswith("dict"):
            return _parse_map(raw)
    except ValueError as exc:
        raise ValueError(f"STENOGRAPH_{name.upper()}: {exc}") from exc
    return raw
