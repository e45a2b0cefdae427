"""`WS /stt/websocket` through the official cartesia SDK (4.2.0), sync and async, on real speech.

Audio is sent faster than real time (timing is not what these tests check), except in the async test, which
paces at twice real time so that interims have a chance to arrive between finals.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from cartesia import AsyncCartesia, Cartesia

from stenograph.audio import SAMPLE_RATE, encode_pcm, read_file
from stenograph.wer import corpus_wer, wer
from tests.conftest import API_KEY, pick

CHUNK = SAMPLE_RATE // 10  # 100 ms, the size the SDK docs recommend
GAP = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)  # the speaker pauses before finalize


def chunks(samples: np.ndarray) -> list[bytes]:
    return [encode_pcm(samples[i : i + CHUNK], "pcm_s16le") for i in range(0, samples.size, CHUNK)]


def as_dict(event: Any) -> dict[str, Any]:
    # The SDK types `words` with the TTS timestamp shape but parses leniently (spec 2.3): dump quietly.
    return event.model_dump(warnings=False)


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "transcript" and e["is_final"]]


def check_deltas(events: list[dict[str, Any]]) -> str:
    """Verbatim spacing on the wire: nothing before the first final starts with a space, everything with text
    after a final with text does; no delta ends with one. Returns the transcript (finals concatenated)."""
    seen_text = False
    for e in events:
        if e["type"] != "transcript" or not e["text"]:
            continue
        text = e["text"]
        assert text == text.rstrip(), f"a delta never ends with a space: {text!r}"
        if seen_text:
            assert text.startswith(" ") and not text.startswith("  "), f"one space opens the delta: {text!r}"
        else:
            assert not text.startswith(" "), f"the first text has no leading space: {text!r}"
        if e["is_final"]:
            seen_text = True
    transcript = "".join(f["text"] for f in finals(events))
    assert transcript == transcript.strip()
    return transcript


def check_words(events: list[dict[str, Any]], session_seconds: float) -> list[dict[str, Any]]:
    """Word times of every final: seconds since the session's first audio, monotonic, inside the audio."""
    words = [w for f in finals(events) for w in f["words"]]
    assert words, "finals carry word timestamps"
    previous = 0.0
    for w in words:
        assert w["word"].strip(), w
        assert 0.0 <= w["start"] <= w["end"] <= session_seconds + 0.05, (w, session_seconds)
        assert w["start"] >= previous - 1e-6, ("word starts are monotonic", w, previous)
        previous = w["start"]
    return words


def until(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    index = next(i for i, e in enumerate(events) if e["type"] == kind)
    return events[: index + 1]


def test_sync_sdk_transcribes_librispeech(server, clips):
    client = Cartesia(api_key=API_KEY, base_url=server.url)
    pairs = []
    for clip in pick(clips, "librispeech_test_clean", 3):
        audio = np.concatenate([read_file(str(clip.path)), GAP])
        events: list[dict[str, Any]] = []
        with client.stt.manual_finalize.websocket(
            model="ink-whisper", encoding="pcm_s16le", sample_rate=SAMPLE_RATE, language="en"
        ) as connection:
            for piece in chunks(audio):
                connection.send_raw(piece)
            connection.send("finalize")
            for event in connection:
                events.append(as_dict(event))
                if event.type == "flush_done":
                    break
            connection.send("close")
            # The iterator ends only on a clean close (both close frames 1000/1001); anything else raises.
            events += [as_dict(e) for e in connection]
            assert connection._connection.close_code == 1000
        kinds = [e["type"] for e in events]
        assert kinds[-2:] == ["flush_done", "done"], kinds
        assert kinds.count("flush_done") == 1 and kinds.count("done") == 1
        assert finals(until(events, "flush_done")), "the finals for flushed audio come before flush_done"
        assert not finals(events[kinds.index("flush_done") :]), "nothing was left to finalize after flush"
        transcript = check_deltas(events)
        check_words(events, audio.size / SAMPLE_RATE)
        for e in events:
            assert e["request_id"] == events[0]["request_id"]
            if e["type"] == "transcript":
                assert e["language"] == "en"
        pairs.append((clip.text, transcript))
    assert corpus_wer(pairs) < 0.10, pairs


async def test_async_sdk_two_utterances_one_session(server, clips):
    """Two utterances, each finalized; the second one's word times continue from the first's audio."""
    first, second = pick(clips, "librispeech_test_clean", 5)[3:5]
    a = np.concatenate([read_file(str(first.path)), GAP])
    b = np.concatenate([read_file(str(second.path)), GAP])
    client = AsyncCartesia(api_key=API_KEY, base_url=server.url)
    events: list[dict[str, Any]] = []
    flushes: asyncio.Queue[None] = asyncio.Queue()

    async def send(connection: Any, audio: np.ndarray) -> None:
        start = time.monotonic()
        for i, piece in enumerate(chunks(audio)):  # twice real time: fast, yet interims can land
            await asyncio.sleep(max(0.0, start + i * 0.05 - time.monotonic()))
            await connection.send_raw(piece)
        await connection.send("finalize")
        await flushes.get()

    async with client.stt.manual_finalize.websocket(
        model="ink-whisper", encoding="pcm_s16le", sample_rate=SAMPLE_RATE, language="en"
    ) as connection:

        async def receive() -> None:
            async for event in connection:
                events.append(as_dict(event))
                if event.type == "flush_done":
                    flushes.put_nowait(None)

        receiver = asyncio.ensure_future(receive())
        await send(connection, a)
        split = len(events)
        await send(connection, b)
        await connection.send("close")
        await asyncio.wait_for(receiver, 60)
        assert connection._connection.close_code == 1000

    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and kinds.count("flush_done") == 2, kinds
    head, tail = events[:split], events[split:]
    assert head[-1]["type"] == "flush_done" and tail[-2]["type"] == "flush_done"
    assert wer(first.text, "".join(f["text"] for f in finals(head))) < 0.15
    assert wer(second.text, "".join(f["text"] for f in finals(tail))) < 0.15
    transcript = check_deltas(events)
    assert wer(first.text + " " + second.text, transcript) < 0.12, transcript
    interims = [e for e in events if e["type"] == "transcript" and not e["is_final"]]
    assert interims, "at twice real time, interims arrive between finals"

    session = (a.size + b.size) / SAMPLE_RATE
    words = check_words(events, session)
    second_words = [w for f in finals(tail) for w in f["words"]]
    offset = a.size / SAMPLE_RATE
    # The second utterance's words sit in the second half of the session audio, not at 0.
    assert second_words[0]["start"] >= offset - 0.05, (second_words[0], offset)
    assert second_words[-1]["end"] <= session + 0.05
    assert words[-1] is second_words[-1] or words[-1] == second_words[-1]
    first_words = [w for f in finals(head) for w in f["words"]]
    assert first_words[-1]["end"] <= offset + 0.05
