"""`WS /stt/websocket` on the wire, with a raw `websockets` client (through `stenograph.client`).

Commands, request ids, every encoding and rate, parameter validation, auth, silence, a long session that
finalizes itself at pauses, over-long utterances, disconnects and the idle timeout, all against the real
server and model on eval speech. Audio goes faster than real time except where timing is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from stenograph import client
from stenograph.audio import ENCODINGS, SAMPLE_RATE, read_file
from stenograph.wer import Clip, corpus_wer, wer
from tests.conftest import API_KEY, pick, silence, start_server, stop_server

PARAMS = {"model": "ink-whisper", "encoding": "pcm_s16le", "sample_rate": SAMPLE_RATE, "language": "en"}
ERROR_FIELDS = {"type", "title", "message", "error_code", "status_code", "code", "request_id"}
FAST = 12.0  # times real time for "fast" pacing: well above real time, yet the decode backlog stays bounded


@functools.cache
def audio_of(clip: Clip) -> np.ndarray:
    return read_file(str(clip.path))


async def open_session(base_url: str, **overrides: Any) -> ClientConnection:
    return await client.connect(base_url, api_key=API_KEY, **{**PARAMS, **overrides})


async def send_audio(
    ws: ClientConnection,
    samples: np.ndarray,
    encoding: str = "pcm_s16le",
    rate: int = SAMPLE_RATE,
    speed: float | None = None,
) -> None:
    """100 ms frames; `speed` paces them at that multiple of real time (None: as fast as possible)."""
    step = SAMPLE_RATE // 10
    start = time.monotonic()
    for i in range(0, samples.size, step):
        if speed:
            await asyncio.sleep(max(0.0, start + i / SAMPLE_RATE / speed - time.monotonic()))
        await ws.send(client.to_wire(samples[i : i + step], encoding, rate))


async def events_until(ws: ClientConnection, kind: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Read events up to and including the first one of `kind`."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not events or events[-1]["type"] != kind:
            events.append(json.loads(await ws.recv()))
    return events


async def drain(ws: ClientConnection, timeout: float = 60) -> list[dict[str, Any]]:
    """Every event until the server closes the socket (with any code: callers check `ws.close_code`)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                events.append(json.loads(await ws.recv()))
    return events


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "transcript" and e["is_final"]]


def transcript(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in finals(events))


def skeleton(events: list[dict[str, Any]]) -> list[str]:
    """Event kinds without interims (whose number depends on timing): `final`, `flush_done`, `done`..."""
    return [
        "final" if e["type"] == "transcript" else e["type"]
        for e in events
        if e["type"] != "transcript" or e["is_final"]
    ]


def check_error(event: dict[str, Any], status: int, error_code: str | None = None) -> None:
    assert event["type"] == "error", event
    assert event.keys() >= ERROR_FIELDS, event
    assert event["status_code"] == event["code"] == status, event
    assert event["title"] and event["message"], event
    if error_code:
        assert event["error_code"] == error_code, event


@pytest.fixture(scope="module")
def short_clip(clips: list[Clip]) -> Clip:
    return pick(clips, "librispeech_test_clean", 1)[0]


# -- commands -------------------------------------------------------------------------------------------


async def test_legacy_done_command_flushes_then_done_and_close_1000(server, short_clip):
    ws = await open_session(server.url)
    await send_audio(ws, audio_of(short_clip))
    await ws.send("done")
    events = await drain(ws)
    assert skeleton(events) == ["final", "done"] and ws.close_code == 1000
    assert wer(short_clip.text, transcript(events)) < 0.1, transcript(events)


async def test_request_id_header_matches_every_event(server, short_clip):
    ws = await open_session(server.url)
    request_id = ws.response.headers["X-Request-Id"]
    assert len(request_id) >= 32
    await send_audio(ws, audio_of(short_clip))
    await ws.send("hello")  # an error event carries it too
    await ws.send("finalize")
    await ws.send("close")
    events = await drain(ws)
    assert {"error", "transcript", "flush_done", "done"} <= {e["type"] for e in events}
    assert {e["request_id"] for e in events} == {request_id}


async def test_finalize_variants_each_get_flush_done_in_order(server, clips):
    """Empty finalize, JSON finalize, padded finalize and a repeat: one flush_done each, finals before it."""
    a, b = pick(clips, "librispeech_test_clean", 3)[1:3]
    ws = await open_session(server.url)
    await ws.send("finalize")  # nothing buffered yet
    head = await events_until(ws, "flush_done")
    assert skeleton(head) == ["flush_done"]
    await send_audio(ws, np.concatenate([audio_of(a), silence(0.3)]))
    await ws.send('{"type": "finalize"}')
    first = await events_until(ws, "flush_done")
    await send_audio(ws, np.concatenate([audio_of(b), silence(0.3)]))
    await ws.send("  finalize\n")
    await ws.send("finalize")
    second = await events_until(ws, "flush_done")
    third = await events_until(ws, "flush_done")
    await ws.send("close")
    rest = await drain(ws)
    assert skeleton(first) == ["final", "flush_done"], skeleton(first)
    assert skeleton(second) == ["final", "flush_done"], skeleton(second)
    assert skeleton(third) == ["flush_done"] and skeleton(rest) == ["done"]
    assert ws.close_code == 1000
    assert wer(a.text, transcript(first)) < 0.15 and wer(b.text, transcript(second)) < 0.15
    assert transcript(second).startswith(" ") and not transcript(first).startswith(" ")


async def test_unknown_text_is_an_error_event_and_the_session_goes_on(server, short_clip):
    ws = await open_session(server.url)
    await ws.send("please transcribe")
    (error,) = await events_until(ws, "error")
    check_error(error, 400)
    assert "please transcribe" in error["message"]
    await send_audio(ws, audio_of(short_clip))
    await ws.send("finalize")
    await ws.send("close")
    events = await drain(ws)
    assert skeleton(events) == ["final", "flush_done", "done"] and ws.close_code == 1000
    assert wer(short_clip.text, transcript(events)) < 0.1


# -- audio formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 48000])
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_every_encoding_and_rate_decodes_the_words(server, short_clip, encoding, rate):
    ws = await open_session(server.url, encoding=encoding, sample_rate=rate)
    await send_audio(ws, audio_of(short_clip), encoding, rate)
    await ws.send("finalize")
    events = await events_until(ws, "flush_done")
    await send_audio(ws, silence(0.5), encoding, rate)  # audio after a flush (the resampler restarts)
    await ws.send("close")
    events += await drain(ws)
    assert ws.close_code == 1000 and skeleton(events) == ["final", "flush_done", "done"], events
    text = transcript(events)
    assert wer(short_clip.text, text) < 0.15, (encoding, rate, text)
    duration = sum(f["duration"] for f in finals(events))
    assert duration <= short_clip.duration + 0.05


# -- handshake and parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error_code"),
    [
        ({"model": "ink-nonexistent"}, "model_not_found"),
        ({"model": ""}, None),
        ({"encoding": "pcm_u8"}, None),
        ({"encoding": None}, None),
        ({"sample_rate": 4000}, None),
        ({"sample_rate": 96000}, None),
        ({"sample_rate": "sixteen"}, None),
        ({"sample_rate": "16000.5"}, None),
        ({"language": "xx"}, "unsupported_language"),
        ({"keyterm": [f"term{i}" for i in range(101)]}, None),
        ({"keyterm": ["x" * 1201]}, None),
        ({"min_volume": "1.5"}, None),
        ({"min_volume": "loud"}, None),
        ({"max_silence_duration_secs": "0"}, None),
    ],
)
async def test_bad_parameters_give_error_event_then_close_1008(server, overrides, error_code):
    ws = await open_session(server.url, **overrides)
    events = await drain(ws, timeout=20)
    assert len(events) == 1, events
    check_error(events[0], 400, error_code)
    assert events[0]["request_id"] == ws.response.headers["X-Request-Id"]
    assert ws.close_code == 1008


async def test_lenient_numbers_and_repeated_keyterms(server, short_clip):
    ws = await open_session(
        server.url,
        sample_rate="16000.0",
        min_volume=" 0.0",
        max_silence_duration_secs="1.50",
        keyterm=["yellow lamps", "nightfall"],
    )
    await send_audio(ws, audio_of(short_clip))
    await ws.send("close")
    events = await drain(ws)
    assert ws.close_code == 1000 and "error" not in skeleton(events)
    assert wer(short_clip.text, transcript(events)) < 0.1


@pytest.mark.parametrize("key", [None, "sk_wrong"])
async def test_bad_auth_is_http_401_at_the_handshake(server, key):
    with pytest.raises(websockets.InvalidStatus) as refused:
        await client.connect(server.url, api_key=key, **PARAMS)
    response = refused.value.response
    assert response.status_code == 401
    body = json.loads(response.body)
    assert body["error_code"] == "unauthorized" and body["request_id"] == response.headers["X-Request-Id"]


# -- what the engine does with real input --------------------------------------------------------------


async def test_silence_and_low_noise_yield_no_text(server):
    rng = np.random.default_rng(7)
    quiet_noise = (rng.standard_normal(4 * SAMPLE_RATE) * 0.003).astype(np.float32)
    hum = (0.01 * np.sin(2 * np.pi * 50 * np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    ws = await open_session(server.url)
    for piece in (silence(4), quiet_noise, hum):
        await send_audio(ws, piece)
        await ws.send("finalize")
    await ws.send("close")
    events = await drain(ws)
    assert skeleton(events) == ["flush_done", "flush_done", "flush_done", "done"], events
    assert all(not e["text"] for e in events if e["type"] == "transcript"), events


def speaker_clips(clips: list[Clip]) -> list[Clip]:
    """One speaker's ten consecutive utterances of a chapter (test-other, so not the easiest speech)."""
    return [c for c in clips if c.speaker == "librispeech-2609" and c.subset == "librispeech_test_other"]


@pytest.fixture(scope="module")
def long_session(clips: list[Clip]) -> tuple[np.ndarray, list[Clip], list[float]]:
    """~107 s: one speaker's ten consecutive test-other utterances, with 1.5-2 s pauses between them."""
    utterances = speaker_clips(clips)
    assert len(utterances) == 10
    parts, offsets, position = [], [], 0
    for i, clip in enumerate(utterances):
        offsets.append(position / SAMPLE_RATE)
        pause = silence(2.0 if i % 2 == 0 else 1.5)
        parts += [audio_of(clip), pause]
        position += audio_of(clip).size + pause.size
    return np.concatenate(parts), utterances, offsets


async def test_long_session_finalizes_itself_at_pauses(server, long_session):
    audio, utterances, offsets = long_session
    assert audio.size / SAMPLE_RATE > 100
    ws = await open_session(server.url)
    await send_audio(ws, audio, speed=FAST)
    await ws.send("close")
    events = await drain(ws, timeout=120)
    assert ws.close_code == 1000 and skeleton(events)[-1] == "done"
    chunks = finals(events)
    # Every pause between utterances is longer than max_silence, so the server must have finalized each
    # utterance on its own: no chunk spans two utterances (long ones may also be finalized at an inner pause).
    per_utterance: list[list[dict]] = [[] for _ in utterances]
    for chunk in chunks:
        words = chunk["words"]
        assert words, chunk
        owner = [
            i
            for i, (clip, offset) in enumerate(zip(utterances, offsets, strict=True))
            if offset - 0.5 <= words[0]["start"] and words[-1]["end"] <= offset + clip.duration + 0.5
        ]
        assert len(owner) == 1, (chunk["text"], words[0], words[-1])
        per_utterance[owner[0]].append(chunk)
    assert all(per_utterance), [len(c) for c in per_utterance]
    texts = ["".join(c["text"] for c in cs) for cs in per_utterance]
    pairs = [(u.text, text) for u, text in zip(utterances, texts, strict=True)]
    assert corpus_wer(pairs) < 0.30, pairs
    whole = " ".join(u.text for u in utterances)
    assert corpus_wer([(whole, transcript(events))]) == pytest.approx(corpus_wer(pairs), abs=0.01)
    # Seams: chunks follow each other in time without overlap, so no word was decoded twice or fell between.
    previous_end = 0.0
    for chunk in chunks:
        assert chunk["words"][0]["start"] >= previous_end - 0.05, (previous_end, chunk["words"][0])
        previous_end = chunk["words"][-1]["end"]


async def test_utterance_longer_than_20_s_is_cut_and_transcribed(server, clips):
    """Back-to-back utterances (no pause anywhere near max_silence) make one 24.6 s stretch of speech."""
    chosen = speaker_clips(clips)[4:6]
    audio = np.concatenate([audio_of(c) for c in chosen])
    assert audio.size / SAMPLE_RATE > 24
    ws = await open_session(server.url, max_silence_duration_secs="30")
    await send_audio(ws, audio, speed=FAST)
    await ws.send("finalize")
    await ws.send("close")
    events = await drain(ws)
    chunks = finals(events)
    durations = [c["duration"] for c in chunks]
    assert len(chunks) >= 2 and all(d <= 20.0 + 0.04 for d in durations), durations
    assert sum(c["duration"] for c in chunks) == pytest.approx(audio.size / SAMPLE_RATE, abs=0.5)
    assert wer(" ".join(c.text for c in chosen), transcript(events)) < 0.30, transcript(events)
    starts = [w["start"] for c in chunks for w in c["words"]]
    assert starts == sorted(starts) and starts[-1] > 20.0


# -- the connection itself ------------------------------------------------------------------------------


async def test_client_disconnect_mid_audio_leaves_server_healthy(server, short_clip):
    log_start = len(server.log)
    audio = audio_of(short_clip)
    dropped = await open_session(server.url)
    await send_audio(dropped, audio[: 3 * SAMPLE_RATE])
    dropped.transport.abort()  # TCP gone without a close frame
    polite = await open_session(server.url)
    await send_audio(polite, audio[: 3 * SAMPLE_RATE])
    await polite.close()  # close frame, but no `close` command
    ws = await open_session(server.url)
    await send_audio(ws, audio)
    await ws.send("close")
    events = await drain(ws)
    assert ws.close_code == 1000 and wer(short_clip.text, transcript(events)) < 0.1
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/healthz")).json() == {"ok": True}
    new_lines = "".join(server.log[log_start:])
    assert "Traceback" not in new_lines and " ERROR " not in new_lines, new_lines


IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def impatient_server():
    srv = start_server({"STENOGRAPH_IDLE_TIMEOUT": str(IDLE_TIMEOUT)})
    yield srv
    stop_server(srv)


async def test_idle_timeout_is_reset_by_audio_and_then_closes_with_error(impatient_server, short_clip):
    ws = await open_session(impatient_server.url)
    # More than the idle timeout of real-time audio keeps the session alive: every frame resets the clock.
    audio = np.concatenate([audio_of(short_clip)[: 2 * SAMPLE_RATE], silence(1.0)])
    await send_audio(ws, audio, speed=1.0)
    assert audio.size / SAMPLE_RATE > IDLE_TIMEOUT
    await ws.send("finalize")
    alive = await events_until(ws, "flush_done")
    assert "error" not in skeleton(alive) and transcript(alive)
    events = await drain(ws, timeout=30)  # now silent on our side: the server gives up
    assert skeleton(events) == ["error"], events
    check_error(events[-1], 408, "idle_timeout")
    assert ws.close_code == 1008
