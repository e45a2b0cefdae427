"""`WS /stt/turns/websocket` through the official cartesia SDK against the live server, on real speech.

Turns are built from LibriSpeech sentences separated by silence. Audio goes out faster than real time: turn
timing follows the audio, not the clock, so the turns must come out the same as in real time.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets
from cartesia import AsyncCartesia
from starlette.datastructures import QueryParams

from stenograph.asr import Engine
from stenograph.audio import encode_pcm, read_file
from stenograph.config import Settings
from stenograph.turn_routes import TurnStream
from stenograph.turns import TurnStateMachine
from stenograph.wer import corpus_wer
from tests.conftest import API_KEY, MODEL_DIR, one_phrase_clips, pick, silence

RATE = 16000
CHUNK = 1600  # 100 ms


async def stream(ws, audio: np.ndarray, speed: float | None, commands: dict[int, dict] | None = None) -> None:
    """Send 100 ms chunks (paced at `speed` x real time, or as fast as possible), then `close`."""
    pcm = encode_pcm(audio, "pcm_s16le")
    step = CHUNK * 2
    for i, start in enumerate(range(0, len(pcm), step)):
        if commands and i in commands:
            await ws.send(commands[i])
        await ws.send_raw(pcm[start : start + step])
        await asyncio.sleep(0.1 / speed if speed else 0)
    await ws.send({"type": "close"})


async def session(
    server, audio: np.ndarray, speed: float | None = None, commands: dict[int, dict] | None = None, **params
) -> list:
    client = AsyncCartesia(api_key=API_KEY, base_url=server.url)
    events = []
    async with client.stt.auto_finalize.websocket(
        model="ink-2", encoding="pcm_s16le", sample_rate=RATE, **params
    ) as ws:
        sender = asyncio.ensure_future(stream(ws, audio, speed, commands))
        async for event in ws:  # ends without an exception only on a 1000 close
            events.append(event)
        await sender
    return events


def check_events(events: list) -> list[str]:
    """Spec 3.4 and 3.3 on one session; returns the `turn.end` transcripts."""
    assert events and events[0].type == "connected", "connected comes first"
    assert sum(e.type == "connected" for e in events) == 1
    machine = TurnStateMachine()
    ends: list[str] = []
    text = ""
    request_ids = {e.request_id for e in events}
    assert len(request_ids) == 1, "one request id per connection"
    previous = None
    for event in events[1:]:
        assert event.type != "error", event
        if event.type == "turn.end" and previous is not None and previous.type == "turn.eager_end":
            # LiveKit keeps the reply it began at `turn.eager_end` only if the final text is the same string.
            assert event.transcript == previous.transcript, "turn.end changed the eager end's text"
        previous = event
        if event.type == "turn.update":
            assert machine.state.value != "idle", "updates only inside a turn"
            assert len(event.transcript) > len(text) and event.transcript.startswith(text), (text, event)
            text = event.transcript
            continue
        machine.apply(event.type)
        if event.type == "turn.start":
            text = ""
        elif event.type in ("turn.eager_end", "turn.end"):
            assert event.transcript.startswith(text), f"revised: {text!r} -> {event.transcript!r}"
            text = event.transcript
            if event.type == "turn.end":
                ends.append(event.transcript)
    assert machine.state.value == "idle", "close ends the open turn"
    for i, transcript in enumerate(ends):
        if i and transcript and "".join(ends[:i]):
            assert transcript.startswith(" "), "later turns start with their space (spec 3.4 item 7)"
    return ends


@pytest.mark.parametrize("speed", [None, 2.0], ids=["full-speed", "twice-real-time"])
def test_sdk_multi_turn_librispeech(server, clips, vad, speed: float | None) -> None:
    """At full speed the sender falls behind and updates are skipped; at twice real time it keeps up, so
    updates go out and the later decodes must extend them without repeating a word."""
    chosen = one_phrase_clips(clips, vad, 4)
    gaps = [1.0, 1.5, 2.0, 1.2]
    audio = np.concatenate(
        [part for (_, a), gap in zip(chosen, gaps, strict=True) for part in (a, silence(gap))]
    )
    events = asyncio.run(session(server, audio, speed))
    ends = check_events(events)
    if speed:
        assert sum(e.type == "turn.update" for e in events) >= len(chosen), "updates while speaking"
    assert len(ends) == len(chosen), [(e.type, getattr(e, "transcript", None)) for e in events]
    assert sum(e.type == "turn.start" for e in events) == len(chosen)
    references = " ".join(clip.text for clip, _ in chosen)
    assert corpus_wer([(references, "".join(ends))]) < 0.12, ends
    for (clip, _), transcript in zip(chosen, ends, strict=True):
        assert corpus_wer([(clip.text, transcript)]) < 0.25, (clip.text, transcript)


def test_close_flushes_the_open_turn(server, clips, vad) -> None:
    ((clip, audio),) = one_phrase_clips(clips, vad, 1)
    events = asyncio.run(session(server, audio))  # close right after the last word
    ends = check_events(events)
    assert events[-1].type == "turn.end", "the final turn.end arrives before the 1000 close"
    assert len(ends) == 1 and corpus_wer([(clip.text, ends[0])]) < 0.2, ends


def incomplete_phrase(server, clips) -> np.ndarray:
    """The first words of a sentence, cut at a word boundary where the sentence is plainly unfinished."""
    from cartesia import Cartesia

    from stenograph.smart_turn import SmartTurn

    scorer = SmartTurn(MODEL_DIR / "smart-turn-v3.2-cpu.onnx")
    client = Cartesia(api_key=API_KEY, base_url=server.url)
    for clip in pick(clips, "librispeech_test_clean", 25):
        with clip.path.open("rb") as fh:
            words = client.stt.transcribe(
                file=fh, model="ink-whisper", timestamp_granularities=["word"]
            ).words
        audio = read_file(str(clip.path))
        for w in words[3:-3]:
            part = audio[: int(w.end * RATE)]
            if scorer.probability(np.concatenate([part, silence(0.1)])) < 0.1:
                return part
    raise AssertionError("no clearly unfinished phrase found")


def test_config_command_changes_the_end_timeout(server, clips, vad) -> None:
    """An unfinished phrase, 1.5 s of silence, then a full sentence. With the default 5.6 s timeout that is
    one turn; after `config` lowers `end_timeout_ms` to 640 the silence ends the first turn: two turns."""
    ((_, sentence),) = one_phrase_clips(clips, vad, 1)
    audio = np.concatenate([incomplete_phrase(server, clips), silence(1.5), sentence, silence(0.5)])
    plain = check_events(asyncio.run(session(server, audio)))
    assert len(plain) == 1, plain
    config = {"type": "config", "turn": {"end_timeout_ms": 640}}
    configured = check_events(asyncio.run(session(server, audio, commands={2: config})))
    assert len(configured) == 2, configured
    assert (plain[0].split() == (configured[0] + configured[1]).split()) or corpus_wer(
        [(plain[0], "".join(configured))]
    ) < 0.2


async def raw_session(server, query: str, messages: list) -> tuple[list[dict], int | None]:
    url = f"{server.ws_url}/stt/turns/websocket?{query}"
    received: list[dict] = []
    async with websockets.connect(url, additional_headers={"X-API-Key": API_KEY}) as ws:
        for message in messages:
            await ws.send(message)
        try:
            async for frame in ws:
                received.append(json.loads(frame))
        except websockets.ConnectionClosed:
            pass
        return received, ws.close_code


BASE = "model=ink-2&encoding=pcm_s16le&sample_rate=16000"


@pytest.mark.parametrize(
    "extra",
    [
        "&turn_start_threshold=0.95",
        "&turn_end_threshold=0.01",
        "&turn_end_timeout_ms=100",
        "&turn_eager_end_threshold=0.35&turn_end_threshold=0.4",  # end above eager-end
        "&turn_start_threshold=0.55&turn_eager_end_threshold=0.6",  # eager-end above start
        "&turn_start_threshold=high",
    ],
)
def test_bad_thresholds_get_an_error_instead_of_connected(server, extra: str) -> None:
    events, code = asyncio.run(raw_session(server, BASE + extra, []))
    assert [e["type"] for e in events] == ["error"], events
    assert events[0]["status_code"] == 400 and events[0]["code"] == 400 and events[0]["message"]
    assert code == 1008


def test_bad_model_and_ignored_params(server) -> None:
    events, code = asyncio.run(raw_session(server, BASE.replace("ink-2", "ink-whisper"), []))
    assert events[0]["type"] == "error" and events[0]["error_code"] == "model_not_found" and code == 1008
    query = BASE + "&language=fr&whatever=1&keyterm=Hester%20Prynne&keyterm=Acme&turn_end_timeout_ms=4000"
    events, code = asyncio.run(raw_session(server, query, ['{"type":"close"}']))
    assert [e["type"] for e in events] == ["connected"] and code == 1000


def test_stray_finalize_and_bad_config_get_errors_and_the_session_goes_on(server, clips, vad) -> None:
    ((clip, audio),) = one_phrase_clips(clips, vad, 1)
    messages = [
        "finalize",
        json.dumps({"type": "config", "turn": {"end_threshold": 0.45, "eager_end_threshold": 0.4}}),
        json.dumps({"type": "config", "turn": {"end_timeout_ms": "soon"}}),
        encode_pcm(audio, "pcm_s16le"),
        '{"type":"close"}',
    ]
    events, code = asyncio.run(raw_session(server, BASE, messages))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["connected", "error", "error", "error"], kinds
    assert kinds[-1] == "turn.end" and code == 1000
    assert corpus_wer([(clip.text, events[-1]["transcript"])]) < 0.2


@pytest.mark.parametrize(
    ("pause_model", "expected"), [("", "whisper-base"), ("whisper-tiny.en", "whisper-tiny.en")]
)
def test_pause_decodes_use_the_configured_model(pause_model: str, expected: str) -> None:
    """`STENOGRAPH_TURN_PAUSE_MODEL` picks the model of the decode that ends a turn; empty: the session's."""
    engine = Engine(Settings(model_dir=MODEL_DIR, turn_pause_model=pause_model))
    try:
        stream = TurnStream(engine, None, None, None)  # type: ignore[arg-type]
        session = stream.open_session(QueryParams("model=ink-2&encoding=pcm_s16le&sample_rate=16000"))
        assert session.recognizer.spec.name == expected
        assert session.update_recognizer.spec.name == "whisper-tiny.en"
    finally:
        engine.close()  # its model worker threads


async def in_process_turns(session, audio: np.ndarray) -> list[tuple[str, str | None]]:
    """Feed a TurnSession 100 ms chunks as fast as it takes them, then `close`; its events in order."""
    done = object()
    events: list[tuple[str, str | None]] = []

    async def drain() -> None:
        while (event := await (await session.outputs.get())) is not done:
            if event is not None:
                events.append((event.kind, event.transcript))

    async def finished() -> object:
        return done

    drainer = asyncio.ensure_future(drain())
    pcm = encode_pcm(audio, "pcm_s16le")
    for start in range(0, len(pcm), CHUNK * 2):
        await session.feed(pcm[start : start + CHUNK * 2])
    await session.finish()
    session.outputs.put_nowait(finished())
    await drainer
    return events


def test_speech_after_a_long_silence_inside_a_turn_is_heard_on_tiny_en(clips) -> None:
    """An unfinished phrase, 1.5 s of silence, then a whole sentence: one turn. A whisper-tiny.en decode of
    the whole turn stopped at the silence, and the turn ended with the phrase alone; the pause decode now
    decodes what follows its last word too (the phrase is said again at the start of the sentence, which a
    decode prompted with the phrase would skip)."""
    clip = next(c for c in clips if c.id == "ls-test-clean-1089-134686-0002")
    sentence = read_file(str(clip.path))
    engine = Engine(Settings(model_dir=MODEL_DIR, turn_pause_model="whisper-tiny.en"))
    try:
        words = engine.recognizer("whisper-base").transcribe(sentence, "en", 5, word_timestamps=True).words
        would = [w.word.strip(",. ").lower() for w in words].index("would")
        phrase = sentence[: int(words[would].end * RATE)]  # "After early nightfall, the yellow lamps would"
        stream = TurnStream(engine, None, None, None)  # type: ignore[arg-type]
        session = stream.open_session(QueryParams("model=ink-2&encoding=pcm_s16le&sample_rate=16000"))
        audio = np.concatenate([phrase, silence(1.5), sentence, silence(0.5)])
        events = asyncio.run(in_process_turns(session, audio))
    finally:
        engine.close()
    machine = TurnStateMachine()
    for kind, _ in events:
        machine.apply(kind)
    ends = [text for kind, text in events if kind == "turn.end"]
    assert len(ends) == 1, events
    reference = "AFTER EARLY NIGHTFALL THE YELLOW LAMPS WOULD " + clip.text
    assert corpus_wer([(reference, ends[0])]) < 0.15, ends[0]
    assert ends[0].rstrip(".").lower().endswith("brothels"), ends[0]
