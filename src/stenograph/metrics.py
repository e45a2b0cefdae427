"""Prometheus metrics, as module-level objects so any module records with one call and no plumbing.

Endpoint labels in use: `batch` (the three batch routes), `websocket` (`/stt/websocket`) and `turns`
(`/stt/turns/websocket`). `SessionLimiter.session` already keeps `stenograph_active_sessions` and
`stenograph_sessions_total`; session code only reports what it alone knows: audio seconds, latencies, errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `*_created` timestamps double the output and no dashboard here uses them.
disable_created_metrics()

ENDPOINTS = ("batch", "websocket", "turns")

# Latencies a person notices (transcript after end of speech), and model calls (a few ms to a long window).
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
MODEL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ACTIVE_SESSIONS = Gauge(
    "stenograph_active_sessions", "Open STT streams: batch requests and WebSocket sessions", ["endpoint"]
)
SESSIONS = Counter("stenograph_sessions", "STT streams admitted", ["endpoint"])
AUDIO_SECONDS = Counter("stenograph_audio_seconds", "Seconds of audio transcribed", ["endpoint"])
TTCT = Histogram(
    "stenograph_ttct_seconds",
    "Time to complete transcript: from finalize (or the end of the audio) to the last final transcript",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
TURN_END = Histogram(
    "stenograph_turn_end_latency_seconds",
    "From the end of speech in the audio to the turn.end event",
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("stenograph_scheduler_queue_depth", "Model jobs waiting in the scheduler")
QUEUE_WAIT = Histogram(
    "stenograph_scheduler_wait_seconds",
    "Time a model job waited in the queue",
    ["priority"],
    buckets=MODEL_BUCKETS,
)
MODEL_CALL = Histogram(
    "stenograph_model_call_seconds", "Duration of one model call", ["priority"], buckets=MODEL_BUCKETS
)
JOBS = Counter(
    "stenograph_scheduler_jobs",
    "Model jobs by outcome: completed, failed, skipped, rejected",
    ["priority", "outcome"],
)
ERRORS = Counter("stenograph_errors", "Errors returned to clients, by error_code", ["code"])

# Export every endpoint's series from the start, so a dashboard shows 0 rather than no data.
for _endpoint in ENDPOINTS:
    ACTIVE_SESSIONS.labels(_endpoint)
    SESSIONS.labels(_endpoint)
    AUDIO_SECONDS.labels(_endpoint)


@contextlib.contextmanager
def session(endpoint: str) -> Iterator[None]:
    SESSIONS.labels(endpoint).inc()
    gauge = ACTIVE_SESSIONS.labels(endpoint)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def audio_seconds(seconds: float, endpoint: str) -> None:
    if seconds > 0:
        AUDIO_SECONDS.labels(endpoint).inc(seconds)


def observe_ttct(seconds: float, endpoint: str) -> None:
    TTCT.labels(endpoint).observe(seconds)


def observe_turn_end(seconds: float) -> None:
    TURN_END.observe(seconds)


def error(code: str | None) -> None:
    ERRORS.labels(code or "unknown").inc()


def queue_depth(depth: int) -> None:
    QUEUE_DEPTH.set(depth)


def job(priority: str, outcome: str, wait: float | None = None, run: float | None = None) -> None:
    """One scheduler job's fate; called from the model threads (prometheus_client is thread-safe)."""
    JOBS.labels(priority, outcome).inc()
    if wait is not None:
        QUEUE_WAIT.labels(priority).observe(wait)
    if run is not None:
        MODEL_CALL.labels(priority).observe(run)


def render() -> tuple[bytes, str]:
    """The text exposition of every metric (process metrics included) and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
