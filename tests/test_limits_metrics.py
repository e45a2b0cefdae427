"""Concurrency caps, Prometheus metrics, health probes, CORS, and graceful shutdown, on the live server.

A batch request is held open deterministically by streaming its upload from a generator that stops halfway
and waits on an event: the server admits the request (and takes its slot) as soon as the headers arrive, and
the test sees that happen in `/metrics` before it goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cartesia
import httpx
import numpy as np
import pytest
import websockets
from cartesia import Cartesia
from prometheus_client.parser import text_string_to_metric_families

from stenograph.audio import iter_file
from stenograph.client import to_wire, ws_url
from stenograph.wer import Clip, wer
from tests.conftest import API_KEY, SECOND_KEY, LiveServer, start_server, stop_server

ORIGIN = "http://app.example"
MAX_FRAME = 64 * 1024
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def limited() -> Iterator[LiveServer]:
    """Two streams in all, one per key; WebSocket messages up to 64 KiB; CORS open to one origin."""
    srv = start_server(
        {
            "STENOGRAPH_MAX_SESSIONS": "2",
            "STENOGRAPH_MAX_SESSIONS_PER_KEY": "1",
            "STENOGRAPH_MAX_FRAME_BYTES": str(MAX_FRAME),
            "STENOGRAPH_CORS_ORIGINS": ORIGIN,
        }
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def clip(clips: list[Clip]) -> Clip:
    return min((c for c in clips if c.subset == "librispeech_test_clean"), key=lambda c: c.duration)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll an observable server state (a metric, a log line) until it holds; fail after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class HeldUpload:
    """A batch request whose upload stops halfway until `release()`; the response arrives in `result`."""

    def __init__(self, url: str, clip: Clip, headers: dict[str, str]) -> None:
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nink-whisper\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{clip.path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        audio = clip.path.read_bytes()
        self._first = head + audio[: len(audio) // 2]
        self._rest = audio[len(audio) // 2 :] + f"\r\n--{boundary}--\r\n".encode()
        self._gate = threading.Event()
        self._pool = ThreadPoolExecutor(1)
        self.result: Future[httpx.Response] = self._pool.submit(
            httpx.post,
            url + "/stt",
            content=self._body(),
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=WAIT_SECONDS,
        )

    def _body(self) -> Iterator[bytes]:
        yield self._first
        if not self._gate.wait(WAIT_SECONDS):
            raise TimeoutError("the test never released the upload")
        yield self._rest

    def release(self) -> httpx.Response:
        self._gate.set()
        response = self.result.result(WAIT_SECONDS)
        self._pool.shutdown()
        return response


def post_clip(url: str, clip: Clip, headers: dict[str, str]) -> httpx.Response:
    with clip.path.open("rb") as fh:
        return httpx.post(
            url + "/stt",
            headers=headers,
            files={"file": fh},
            data={"model": "ink-whisper"},
            timeout=WAIT_SECONDS,
        )


def assert_limited(response: httpx.Response, says: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error_code"] == "concurrency_limited"
    assert says in body["message"]
    assert response.headers["retry-after"] == "1"
    assert body["request_id"] == response.headers["x-request-id"]


def test_session_caps_refuse_with_429_and_recover(limited: LiveServer, clip: Clip) -> None:
    key_a = {"Authorization": f"Bearer {API_KEY}"}
    key_b = {"X-API-Key": SECOND_KEY}
    minted = httpx.post(limited.url + "/access-token", headers=key_a, json={"grants": {"stt": True}})
    token_a = {"Authorization": f"Bearer {minted.json()['token']}"}
    active = lambda: metric(limited.url, "stenograph_active_sessions", endpoint="batch")  # noqa: E731

    first = HeldUpload(limited.url, clip, key_a)
    wait_until(lambda: active() == 1, "the held request to be admitted")
    # Per key: key A is at its cap, whether it comes as the key or as a token the key minted.
    assert_limited(post_clip(limited.url, clip, key_a), "this API key")
    assert_limited(post_clip(limited.url, clip, token_a), "this API key")
    # The official SDK surfaces it as its RateLimitError.
    sdk = Cartesia(api_key=API_KEY, base_url=limited.url, max_retries=0)
    with clip.path.open("rb") as fh, pytest.raises(cartesia.RateLimitError):
        sdk.stt.transcribe(file=fh, model="ink-whisper")

    second = HeldUpload(limited.url, clip, key_b)
    wait_until(lambda: active() == 2, "the second held request to be admitted")
    # Globally: two streams are open, so even a fresh key is refused.
    assert_limited(post_clip(limited.url, clip, key_b), "the server")

    for held in (first, second):
        response = held.release()
        assert response.status_code == 200, response.text
        assert wer(clip.text, response.json()["text"]) < 0.15
    assert active() == 0
    # Slots are back: both keys transcribe again.
    for headers in (key_a, key_b):
        assert post_clip(limited.url, clip, headers).status_code == 200


def test_metrics_move_with_traffic(limited: LiveServer, clip: Clip) -> None:
    before = scrape(limited.url)
    assert post_clip(limited.url, clip, {"X-API-Key": API_KEY}).status_code == 200
    assert post_clip(limited.url, clip, {"X-API-Key": "sk_wrong"}).status_code == 401
    after = scrape(limited.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("stenograph_sessions_total", endpoint="batch") == 1
    assert delta("stenograph_audio_seconds_total", endpoint="batch") == pytest.approx(clip.duration, abs=0.05)
    assert delta("stenograph_model_call_seconds_count", priority="batch") >= 1
    assert delta("stenograph_model_call_seconds_sum", priority="batch") > 0
    assert delta("stenograph_scheduler_wait_seconds_count", priority="batch") >= 1
    assert delta("stenograph_scheduler_jobs_total", outcome="completed", priority="batch") >= 1
    assert delta("stenograph_errors_total", code="unauthorized") == 1
    assert after[("stenograph_scheduler_queue_depth", ())] == 0
    # Every endpoint is exported from the start, and latency histograms exist for the streaming code to fill.
    for endpoint in ("batch", "websocket", "turns"):
        assert ("stenograph_active_sessions", (("endpoint", endpoint),)) in after
    assert ("stenograph_turn_end_latency_seconds_count", ()) in after


def test_a_stalled_upload_times_out_and_frees_its_slot(clip: Clip) -> None:
    srv = start_server({"STENOGRAPH_MAX_SESSIONS": "1", "STENOGRAPH_UPLOAD_IDLE_TIMEOUT": "1"})
    try:
        stalled = HeldUpload(srv.url, clip, {"X-API-Key": API_KEY})
        # The upload stops halfway and is never resumed: the server gives up on it and takes its slot back.
        wait_until(lambda: metric(srv.url, "stenograph_errors_total", code="idle_timeout") == 1, "the 408")
        assert metric(srv.url, "stenograph_active_sessions", endpoint="batch") == 0
        response = post_clip(srv.url, clip, {"X-API-Key": API_KEY})
        assert response.status_code == 200, response.text
        with contextlib.suppress(httpx.HTTPError):  # the server may have closed the stalled connection
            assert stalled.release().status_code == 408
    finally:
        stop_server(srv)


def test_json_logs_carry_the_request_id(clip: Clip) -> None:
    srv = start_server({"STENOGRAPH_LOG_FORMAT": "json"})
    try:
        response = post_clip(srv.url, clip, {"X-API-Key": API_KEY})
        assert response.status_code == 200
        request_id = response.json()["request_id"]
        assert response.headers["x-request-id"] == request_id
        refused = post_clip(srv.url, clip, {}).json()["request_id"]
        wait_until(lambda: sum(refused in line for line in srv.log) >= 1, "the refusal to be logged")
        lines = list(srv.log)
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert len(entries) == len(lines), "every log line is one JSON object"
        mine = [e for e in entries if e.get("request_id") == request_id]
        assert {e["logger"] for e in mine} >= {"stenograph.http", "uvicorn.access"}, mine
        assert any(e.get("request_id") == refused and "401" in e["message"] for e in entries)
        assert {"time", "level", "logger", "message"} <= set(entries[0])
    finally:
        stop_server(srv)


def test_health_and_readiness(limited: LiveServer) -> None:
    health = httpx.get(limited.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"ok": True}
    ready = httpx.get(limited.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ok"] is True


def test_cors_preflight_for_a_configured_origin(limited: LiveServer, server: LiveServer, clip: Clip) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, cartesia-version",
    }
    allowed = httpx.options(limited.url + "/stt", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()

    other = httpx.options(limited.url + "/stt", headers={**preflight, "Origin": "http://evil.example"})
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers

    # The actual request carries the header too, and exposes the request id to the page.
    response = post_clip(limited.url, clip, {"X-API-Key": API_KEY, "Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()

    # By default no origin is allowed.
    default = httpx.options(server.url + "/stt", headers=preflight)
    assert "access-control-allow-origin" not in default.headers


def test_sigterm_lets_an_inflight_batch_request_finish(clip: Clip) -> None:
    srv = start_server({"STENOGRAPH_SHUTDOWN_GRACE_SECONDS": "60"})
    try:
        held = HeldUpload(srv.url, clip, {"X-API-Key": API_KEY})
        wait_until(lambda: metric(srv.url, "stenograph_active_sessions", endpoint="batch") == 1, "admission")
        srv.process.send_signal(signal.SIGTERM)
        wait_until(lambda: any("waiting up to 60 s for 1 stream" in line for line in srv.log), "the drain")
        # No new connections once the drain has begun.
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/healthz", timeout=5)

        response = held.release()
        assert response.status_code == 200, response.text
        assert wer(clip.text, response.json()["text"]) < 0.15, response.json()["text"]
        # uvicorn re-raises the signal once shut down, so the exit status is SIGTERM's.
        assert srv.process.wait(timeout=WAIT_SECONDS) in {0, -signal.SIGTERM}
        log = "".join(srv.log)
        assert "all streams finished" in log and "Application shutdown complete" in log
    finally:
        stop_server(srv)


# -- WebSocket sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    label: str  # the metrics label
    path: str
    params: dict[str, str]
    close: str


MANUAL = Endpoint(
    "websocket",
    "/stt/websocket",
    {"model": "ink-whisper", "encoding": "pcm_s16le", "sample_rate": "16000", "language": "en"},
    "close",
)
TURNS = Endpoint(
    "turns",
    "/stt/turns/websocket",
    {"model": "ink-2", "encoding": "pcm_s16le", "sample_rate": "16000", "language": "en"},
    json.dumps({"type": "close"}),
)
ENDPOINTS = [
    pytest.param(MANUAL, id="manual"),
    pytest.param(TURNS, id="turns"),
]


def pcm16(clip: Clip) -> list[bytes]:
    audio = np.concatenate(list(iter_file(str(clip.path))))
    return [to_wire(audio[i : i + 1600], "pcm_s16le", 16000) for i in range(0, audio.size, 1600)]


def final_text(events: list[dict]) -> str:
    """Manual: the final deltas concatenated; turns: each ended turn's transcript."""
    finals = [e["text"] for e in events if e["type"] == "transcript" and e["is_final"]]
    turns = [e["transcript"] for e in events if e["type"] == "turn.end"]
    return "".join(finals) + " ".join(turns)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_websocket_sessions_count_against_the_caps(
    limited: LiveServer, clip: Clip, endpoint: Endpoint
) -> None:
    url = ws_url(limited.url, endpoint.path, {**endpoint.params, "api_key": API_KEY})
    active = lambda: metric(limited.url, "stenograph_active_sessions", endpoint=endpoint.label)  # noqa: E731
    async with websockets.connect(url) as first:
        assert active() == 1
        # Key A's only slot is taken: another session, or a batch request, with that key is refused.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["error_code"] == "concurrency_limited"
        assert_limited(post_clip(limited.url, clip, {"X-API-Key": API_KEY}), "this API key")

        for piece in pcm16(clip):
            await first.send(piece)
        await first.send(endpoint.close)
        events = [json.loads(message) async for message in first]
    assert wer(clip.text, final_text(events)) < 0.15, events
    await asyncio.to_thread(wait_until, lambda: active() == 0, "the slot to be released")
    assert post_clip(limited.url, clip, {"X-API-Key": API_KEY}).status_code == 200


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_sigterm_delivers_pending_finals_then_closes_1001(clip: Clip, endpoint: Endpoint) -> None:
    srv = start_server({"STENOGRAPH_SHUTDOWN_GRACE_SECONDS": "60"})
    try:
        url = ws_url(srv.url, endpoint.path, {**endpoint.params, "api_key": API_KEY})
        async with websockets.connect(url) as ws:
            assert metric(srv.url, "stenograph_active_sessions", endpoint=endpoint.label) == 1
            for piece in pcm16(clip):
                await ws.send(piece)
            # Everything sent has been taken in (no `finalize`, no `close`): now the server is told to stop.
            received = lambda: metric(srv.url, "stenograph_audio_seconds_total", endpoint=endpoint.label)  # noqa: E731
            await asyncio.to_thread(wait_until, lambda: received() >= clip.duration - 0.01, "all audio in")
            srv.process.send_signal(signal.SIGTERM)
            events = [json.loads(message) async for message in ws]
            assert ws.close_code == 1001
        assert wer(clip.text, final_text(events)) < 0.15, events
        assert srv.process.wait(timeout=WAIT_SECONDS) in {0, -signal.SIGTERM}
        assert "all streams finished" in "".join(srv.log)
    finally:
        stop_server(srv)


async def test_websocket_frames_over_the_limit_close_the_session_1009(
    limited: LiveServer, clip: Clip
) -> None:
    url = ws_url(limited.url, MANUAL.path, {**MANUAL.params, "api_key": API_KEY})
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(b"\0" * MAX_FRAME)  # at the limit: fine
        await ws.send(b"\0" * (MAX_FRAME + 1))
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), WAIT_SECONDS)
    assert ws.close_code == 1009
    # The slot is given back and the server goes on serving.
    active = lambda: metric(limited.url, "stenograph_active_sessions", endpoint="websocket")  # noqa: E731
    await asyncio.to_thread(wait_until, lambda: active() == 0, "the slot to be released")
    assert post_clip(limited.url, clip, {"X-API-Key": API_KEY}).status_code == 200


def test_streaming_latency_histograms_are_filled(limited: LiveServer, clip: Clip) -> None:
    """A manual session's `finalize` lands in the TTCT histogram; a turn's end in the turn-end histogram."""
    audio = np.concatenate([np.concatenate(list(iter_file(str(clip.path)))), np.zeros(32000, np.float32)])
    wire = to_wire(audio, "pcm_s16le", 16000)
    headers = {"X-API-Key": API_KEY}
    before = scrape(limited.url)

    async def session(path: str, params: dict[str, str], end: str) -> None:
        url = ws_url(limited.url, path, {"encoding": "pcm_s16le", "sample_rate": 16000, **params})
        async with websockets.connect(url, additional_headers=headers) as ws:
            for i in range(0, len(wire), 3200):
                await ws.send(wire[i : i + 3200])
            if path == "/stt/websocket":
                await ws.send("finalize")
            await ws.send(end)
            async for _ in ws:
                pass

    asyncio.run(session("/stt/websocket", {"model": "ink-whisper", "language": "en"}, "close"))
    asyncio.run(session("/stt/turns/websocket", {"model": "ink-2"}, json.dumps({"type": "close"})))
    after = scrape(limited.url)
    ttct = ("stenograph_ttct_seconds_count", (("endpoint", "websocket"),))
    turn_end = ("stenograph_turn_end_latency_seconds_count", ())
    assert after.get(ttct, 0) - before.get(ttct, 0) == 1
    assert after[turn_end] - before.get(turn_end, 0) >= 1
