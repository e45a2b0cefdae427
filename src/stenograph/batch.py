"""Whole-file transcription: decode incrementally, cut at silences, decode chunks in parallel, in order.

Whisper sees at most 30 s at a time. Cutting blindly every 30 s splits words, so the cut goes in the last
clear pause of each window's second half (Silero VAD), and each chunk is decoded in exactly one window.
Chunks with no speech are never decoded, which is also what keeps silence and noise from turning into
hallucinated text. Memory stays bounded: at most one window of pending audio plus the chunks in flight,
whatever the file length.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from stenograph.asr import Engine, Recognizer, Transcription, Word
from stenograph.audio import SAMPLE_RATE
from stenograph.errors import ApiError
from stenograph.scheduler import Priority
from stenograph.vad import FRAME, QUIET_THRESHOLD, SPEECH_THRESHOLD, SileroVad, quietest_cut

WHISPER_WINDOW_SECONDS = 30.0
MIN_SPEECH_FRAMES = 3  # ~100 ms of speech before a chunk is worth decoding
FINISH_STEP = 16 * FRAME  # VAD increments while looking for speech in the last chunk (0.5 s)
MIN_CUT_PAUSE_FRAMES = 8  # a pause of 256 ms lies between words: nothing is split by cutting in it


@dataclass(frozen=True)
class Chunk:
    offset: float  # seconds from the start of the file
    audio: np.ndarray


@dataclass(frozen=True)
class BatchResult:
    text: str
    words: list[Word]
    duration: float


class Chunker:
    """Accumulates 16 kHz audio and emits speech-bearing chunks no longer than `max_seconds`."""

    def __init__(self, vad: SileroVad, max_seconds: float) -> None:
        self._vad = vad.stream()
        # Recognizer.transcribe decodes a chunk in one Whisper window, so a chunk may not be longer than one.
        self._max = int(min(max_seconds, WHISPER_WINDOW_SECONDS) * SAMPLE_RATE) // FRAME * FRAME
        self._audio = np.zeros(0, dtype=np.float32)
        self._probs = np.zeros(0, dtype=np.float32)  # per frame of self._audio, only as far as analysed
        self._fed = 0  # samples of self._audio given to the VAD so far
        self._start = 0  # sample index of self._audio[0] in the whole stream
        self.total_samples = 0

    def feed(self, samples: np.ndarray) -> Iterator[Chunk]:
        self.total_samples += samples.size
        self._audio = np.concatenate([self._audio, samples])
        while self._audio.size >= self._max:
            self._analyse(self._max)
            yield from self._emit(self._cut_point())

    def finish(self) -> Iterator[Chunk]:
        """The last chunk needs no cut, only a yes or no on speech, so the VAD stops once it has heard some.

        For a file shorter than one window that is all the VAD does; running it to the end would delay the
        only decode by a few percent of its own time.
        """
        while self._speech_frames() < MIN_SPEECH_FRAMES and self._fed < self._audio.size:
            self._analyse(min(self._audio.size, self._fed + FINISH_STEP))
        if self._audio.size:
            yield from self._emit(self._audio.size)

    def _analyse(self, end: int) -> None:
        """Extend the speech probabilities over self._audio[:end], zero-padding the last frame of the file."""
        samples = self._audio[self._fed : end]
        if end == self._audio.size and (self._vad.pending_samples + samples.size) % FRAME:
            pad = FRAME - (self._vad.pending_samples + samples.size) % FRAME
            samples = np.concatenate([samples, np.zeros(pad, dtype=np.float32)])
        self._fed = end
        self._probs = np.concatenate([self._probs, self._vad.feed(samples)])

    def _speech_frames(self) -> int:
        return int((self._probs >= SPEECH_THRESHOLD).sum())

    def _cut_point(self) -> int:
        """Sample index of the cut: the middle of the last clear pause in the second half of the window.

        The later the cut, the fewer windows a file takes, and every window costs Whisper a full 30 s encoder
        pass however short it is: cutting at the longest pause instead gave 18 s chunks on average and made
        the long-form eval clip half again as slow as plain faster-whisper. Without a clear pause, the
        quietest stretch will do.
        """
        frames = self._max // FRAME
        lo = frames // 2
        quiet = self._probs[lo:frames] < QUIET_THRESHOLD
        end = len(quiet)
        while end > 0:
            while end > 0 and not quiet[end - 1]:
                end -= 1
            start = end
            while start > 0 and quiet[start - 1]:
                start -= 1
            if end - start >= MIN_CUT_PAUSE_FRAMES:
                return (lo + (start + end) // 2) * FRAME
            end = start
        return quietest_cut(self._probs, lo, frames) * FRAME

    def _emit(self, cut: int) -> Iterator[Chunk]:
        audio, probs = self._audio[:cut], self._probs[: -(-cut // FRAME)]
        self._audio, self._probs = self._audio[cut:], self._probs[-(-cut // FRAME) :]
        self._fed = max(0, self._fed - cut)
        offset = self._start / SAMPLE_RATE
        self._start += cut
        if int((probs >= SPEECH_THRESHOLD).sum()) >= MIN_SPEECH_FRAMES:
            yield Chunk(offset, audio)


def join_text(parts: list[str]) -> str:
    """Whisper segments carry their own leading space; the whole transcript does not start with one."""
    return "".join(parts).strip()


async def transcribe_blocks(
    engine: Engine,
    recognizer: Recognizer,
    blocks: Iterator[np.ndarray],
    language: str,
    word_timestamps: bool,
    on_progress: Callable[[float], None] | None = None,
) -> BatchResult:
    """Decode `blocks` (16 kHz float32) chunk by chunk; at most `workers + 1` chunks are held at once."""
    chunker = Chunker(engine.vad, engine.settings.batch_chunk_seconds)
    settings = engine.settings
    in_flight: deque[asyncio.Task[Transcription]] = deque()
    results: list[Transcription] = []

    def decode(chunk: Chunk) -> Transcription:
        return recognizer.transcribe(chunk.audio, language, settings.beam_size, word_timestamps, chunk.offset)

    async def submit(chunk: Chunk) -> None:
        in_flight.append(asyncio.ensure_future(engine.scheduler.run(lambda: decode(chunk), Priority.BATCH)))
        while len(in_flight) > settings.workers:
            results.append(await in_flight.popleft())

    def next_chunks() -> list[Chunk] | None:
        block = next(blocks, None)
        if block is None:
            return None
        if (chunker.total_samples + block.size) / SAMPLE_RATE > settings.max_audio_seconds:
            raise ApiError(
                413,
                "audio_too_long",
                "Audio too long",
                f"the audio is longer than the limit of {settings.max_audio_seconds:g} s",
            )
        return list(chunker.feed(block))

    try:
        while (ready := await asyncio.to_thread(next_chunks)) is not None:
            for chunk in ready:
                await submit(chunk)
            if on_progress:
                on_progress(chunker.total_samples / SAMPLE_RATE)
        for chunk in chunker.finish():
            await submit(chunk)
        while in_flight:
            results.append(await in_flight.popleft())
    finally:
        for task in in_flight:
            task.cancel()
    return BatchResult(
        text=join_text([r.text for r in results]),
        words=[w for r in results for w in r.words],
        duration=chunker.total_samples / SAMPLE_RATE,
    )
