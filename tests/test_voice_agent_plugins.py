"""pipecat's and LiveKit's Cartesia plugins, unchanged, against the live server on real speech.

Voice agents reach us through these plugins rather than the SDK: LiveKit's `cartesia.STT` opens
`/stt/turns/websocket` for `ink-2` and `/stt/websocket` for `ink-whisper`; pipecat's
`CartesiaTurnsSTTService` opens the turns endpoint and its `CartesiaSTTService` the manual one. Each session
is three LibriSpeech sentences with 1.5 s of silence after each, sent at twice real time the way the plugins
send a microphone (the turns come out as they would in real time: turn decisions follow the audio). What is
checked is what an agent built on the plugin sees.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest
from livekit import rtc
from livekit.agents import stt as livekit_stt
from livekit.plugins import cartesia as livekit_cartesia
from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.task import PipelineParams
from pipecat.services.cartesia.stt import CartesiaSTTService
from pipecat.services.cartesia.turns.stt import CartesiaTurnsSTTService
from pipecat.tests.utils import SleepFrame, run_test

from stenograph.audio import SAMPLE_RATE, encode_pcm
from stenograph.turns import TurnStateMachine
from stenograph.wer import corpus_wer
from tests.conftest import API_KEY, one_phrase_clips, silence

GAP = 1.5  # seconds of silence after each sentence
CHUNK = SAMPLE_RATE // 10  # 100 ms per message
PACE = 0.05  # seconds between messages: twice real time

Events = list[tuple[livekit_stt.SpeechEventType, str]]


@dataclass(frozen=True)
class Conversation:
    audio: np.ndarray
    references: list[str]
    mid_gaps: set[int]  # the 100 ms chunk halfway through each sentence's silence


@pytest.fixture(scope="module")
def conversation(clips, vad) -> Conversation:
    """Three one-phrase sentences, each followed by GAP of silence."""
    chosen = one_phrase_clips(clips, vad, 3)
    parts = [part for _, sentence in chosen for part in (sentence, silence(GAP))]
    sentence_ends = np.cumsum([part.size for part in parts])[0::2]
    mid_gaps = {int(end + GAP / 2 * SAMPLE_RATE) // CHUNK for end in sentence_ends}
    audio = np.concatenate(parts)
    return Conversation(audio, [clip.text for clip, _ in chosen], mid_gaps)


def chunks(audio: np.ndarray) -> list[bytes]:
    pcm = encode_pcm(audio, "pcm_s16le")
    return [pcm[i : i + 2 * CHUNK] for i in range(0, len(pcm), 2 * CHUNK)]


def check_heard(texts: list[str], references: list[str]) -> None:
    """The transcripts, joined as the client gets them, are the whole conversation's words."""
    assert corpus_wer([(" ".join(references), "".join(texts))]) < 0.12, texts


def check_transcripts(turns: list[str], references: list[str]) -> None:
    """One transcript per sentence, each close to its reference, later ones led by a space (spec 3.4)."""
    assert len(turns) == len(references), turns
    for text, reference in zip(turns, references, strict=True):
        assert corpus_wer([(reference, text)]) < 0.25, (reference, text)
    assert all(text.startswith(" ") for text in turns[1:]), turns
    check_heard(turns, references)


async def livekit_session(server, model: str, audio: np.ndarray, flush_after: set[int]) -> Events:
    """Push `audio` through LiveKit's plugin as 100 ms frames, `flush()` after the chunks in `flush_after`,
    then end the input; every speech event the stream yields, with its first alternative's text."""
    errors: list[object] = []
    async with aiohttp.ClientSession() as http:
        plugin = livekit_cartesia.STT(model=model, base_url=server.url, api_key=API_KEY, http_session=http)
        plugin.on("error", errors.append)
        stream = plugin.stream()

        async def push() -> None:
            for i, chunk in enumerate(chunks(audio)):
                stream.push_frame(
                    rtc.AudioFrame(chunk, SAMPLE_RATE, num_channels=1, samples_per_channel=len(chunk) // 2)
                )
                if i in flush_after:
                    stream.flush()
                await asyncio.sleep(PACE)
            stream.end_input()

        pusher = asyncio.ensure_future(push())
        events = [
            (event.type, event.alternatives[0].text if event.alternatives else "") async for event in stream
        ]
        await pusher
        await stream.aclose()
    assert not errors, errors
    return events


def test_livekit_plugin_on_the_turns_endpoint(server, conversation) -> None:
    """`ink-2`: START_OF_SPEECH, interim transcripts, FINAL_TRANSCRIPT and END_OF_SPEECH once per sentence;
    a final that follows a preflight (`turn.eager_end`) carries its very text, which is what lets LiveKit
    keep the reply it began preemptively; text within a turn only grows."""
    references = conversation.references
    events = asyncio.run(livekit_session(server, "ink-2", conversation.audio, set()))
    kinds = livekit_stt.SpeechEventType
    transcripts = [(kind, text) for kind, text in events if kind != kinds.RECOGNITION_USAGE]
    finals, text, previous = [], "", None
    for kind, words in transcripts:
        if kind is kinds.START_OF_SPEECH:
            assert previous in (None, kinds.END_OF_SPEECH), transcripts
            text = ""
        elif kind is kinds.END_OF_SPEECH:
            assert previous is kinds.FINAL_TRANSCRIPT, transcripts
        else:
            assert words.startswith(text), f"revised: {text!r} -> {words!r}"
            if kind is kinds.FINAL_TRANSCRIPT:
                if previous is kinds.PREFLIGHT_TRANSCRIPT:
                    assert words == text, "the final changed the preflight's text"
                finals.append(words)
            text = words
        previous = kind
    assert [kind for kind, _ in transcripts].count(kinds.START_OF_SPEECH) == len(references)
    assert previous is kinds.END_OF_SPEECH
    check_transcripts(finals, references)


def test_livekit_plugin_on_the_manual_endpoint(server, conversation) -> None:
    """`ink-whisper`: LiveKit's `flush()` after each sentence (as its VAD does at the end of speech) sends
    `finalize`, and the finals of each sentence are its words."""
    events = asyncio.run(livekit_session(server, "ink-whisper", conversation.audio, conversation.mid_gaps))
    kinds = livekit_stt.SpeechEventType
    finals = [text for kind, text in events if kind is kinds.FINAL_TRANSCRIPT and text.strip()]
    check_heard(finals, conversation.references)


async def pipecat_session(service, conversation: Conversation, vad_stops: bool) -> list[TranscriptionFrame]:
    """Run `service` in a pipeline fed the conversation as 100 ms audio frames (with `vad_stops`, a
    `VADUserStoppedSpeakingFrame` halfway through each gap, as pipecat's VAD sends); its final transcripts."""
    frames = []
    for i, chunk in enumerate(chunks(conversation.audio)):
        frames += [InputAudioRawFrame(chunk, SAMPLE_RATE, 1), SleepFrame(PACE)]
        if vad_stops and i in conversation.mid_gaps:
            frames.append(VADUserStoppedSpeakingFrame())
    params = PipelineParams(audio_in_sample_rate=SAMPLE_RATE)
    down, up = await run_test(service, frames_to_send=frames, pipeline_params=params)
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    return [f for f in down if isinstance(f, TranscriptionFrame)]


def test_pipecat_manual_service(server, conversation) -> None:
    """pipecat's `CartesiaSTTService` finalizes when its VAD says the user stopped, sends `done` and closes
    at once when the pipeline ends: every sentence arrives as final transcripts."""
    service = CartesiaSTTService(api_key=API_KEY, base_url=server.ws_url, sample_rate=SAMPLE_RATE)
    finals = asyncio.run(pipecat_session(service, conversation, vad_stops=True))
    check_heard([f.text for f in finals], conversation.references)


def test_pipecat_turns_service(server, conversation) -> None:
    """pipecat's `CartesiaTurnsSTTService` in a pipeline: its turn event handlers see spec 3.4's state
    machine, and the pipeline gets one `TranscriptionFrame` per sentence, with the `turn.end` text."""
    url = server.ws_url + "/stt/turns/websocket"
    service = CartesiaTurnsSTTService(api_key=API_KEY, url=url, sample_rate=SAMPLE_RATE)
    events: list[tuple[str, str | None]] = []

    def record(kind: str):
        async def handler(_service, transcript: str | None = None) -> None:
            events.append((kind, transcript))

        return handler

    for kind in ("start", "update", "eager_end", "resume", "end"):
        service.event_handler(f"on_turn_{kind}")(record(f"turn.{kind}"))
    finals = asyncio.run(pipecat_session(service, conversation, vad_stops=False))
    machine = TurnStateMachine()
    for kind, _ in events:
        if kind != "turn.update":
            machine.apply(kind)
    assert machine.state.value == "idle", events
    ends = [text or "" for kind, text in events if kind == "turn.end"]
    assert [f.text for f in finals] == ends
    check_transcripts(ends, conversation.references)
