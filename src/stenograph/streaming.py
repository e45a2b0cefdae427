"""Streaming transcription for one connection: utterances, interims, speculative finals, auto-finalize.

Audio arrives in small frames; Silero VAD marks each 32 ms frame as speech or not. The open utterance is the
audio since the last final. While the speaker talks, an interim re-decodes it every `interim_interval`
seconds (never more than one in flight). As soon as the speaker pauses for `speculative_silence`, the final
decode starts at once, so a `finalize` that arrives a few hundred milliseconds later is answered from a
result that is already done or nearly so. If more speech arrives, the speculation is dropped and redone.

Output order is the wire order: finals (and the `flush_done` markers that follow them) go through one FIFO
of awaitables, so a slow decode can never let a later event overtake an earlier one. Interims are dropped if
their utterance was committed while they were decoding.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from stenograph.asr import Engine, Recognizer, Transcription, Word
from stenograph.audio import SAMPLE_RATE, PcmDecoder
from stenograph.errors import ApiError
from stenograph.scheduler import JobSkipped, Priority
from stenograph.vad import FRAME, SPEECH_THRESHOLD, quietest_cut

MIN_SPEECH_FRAMES = 3  # below ~100 ms of speech an utterance is noise, not words
FRAME_SECONDS = FRAME / SAMPLE_RATE
LEAD_IN_FRAMES = 10  # ~320 ms of audio kept before the first speech frame
# An utterance at least this long is finalized at a pause of at least SPLIT_PAUSE_FRAMES (~420 ms).
SPLIT_MIN_SECONDS = 10.0
SPLIT_PAUSE_FRAMES = 13


@dataclass(frozen=True)
class StreamConfig:
    model_id: str
    language: str
    encoding: str
    sample_rate: int
    min_volume: float = 0.0
    max_silence: float = 1.0  # auto-finalize after this much silence following speech
    keyterms: tuple[str, ...] = ()
    interim_interval: float = 1.0
    speculative_silence: float = 0.1
    max_utterance: float = 20.0  # longer utterances are cut at a pause
    max_backlog: float = 300.0  # seconds of audio not yet transcribed before the client gets an error
    beam_size: int = 1


@dataclass(frozen=True)
class TranscriptUpdate:
    """What the session tells the transport: an interim or a final transcript (text already a delta)."""

    text: str
    is_final: bool
    duration: float
    words: list[Word]
    language: str


@dataclass(frozen=True)
class FlushDone:
    requested_at: float  # time.monotonic() when `finalize` arrived, for the server-side TTCT metric


Output = TranscriptUpdate | FlushDone
T = TypeVar("T")


@dataclass
class _Speculation:
    samples: int  # utterance length the decode covered
    task: asyncio.Future[Transcription]
    running: threading.Event  # set by the model thread while the decode runs


@dataclass
class _Utterance:
    start: int  # session sample index of audio[0]
    audio: list[np.ndarray] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    samples: int = 0
    speech_frames: int = 0
    silence_frames: int = 0  # consecutive non-speech frames since the last speech frame
    last_interim_at: int = 0


class StreamSession:
    def __init__(self, engine: Engine, recognizer: Recognizer, config: StreamConfig) -> None:
        self.engine = engine
        self.recognizer = recognizer
        self._interim_recognizer = engine.interim_recognizer(
            config.model_id, config.language, engine.settings.stream_interim_model
        )
        self.config = config
        self.outputs: asyncio.Queue[Awaitable[Output | None]] = asyncio.Queue()
        self._decoder = PcmDecoder(config.encoding, config.sample_rate)
        self._vad = engine.vad.stream()
        self._utt = _Utterance(start=0)
        self._generation = 0  # bumps on every commit; stale interims compare against it
        self._interim: asyncio.Task[None] | None = None
        self._speculation: _Speculation | None = None
        # A dropped speculation that the model is still computing (a model call cannot be interrupted).
        self._abandoned: _Speculation | None = None
        self._pending_final_samples = 0
        self._hotwords = ", ".join(config.keyterms) or None
        self._emitted_text = False  # has any final carried text? decides the leading space of the next delta
        self._vad_tail = np.zeros(0, dtype=np.float32)
        self._tasks: set[asyncio.Future[Transcription]] = set()

    # -- input -------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        samples = self._decoder.feed(data)
        if samples.size:
            self._ingest(samples)

    def _ingest(self, samples: np.ndarray) -> None:
        utt = self._utt
        utt.audio.append(samples)
        utt.samples += samples.size
        probs = self._vad.feed(samples)
        if self.config.min_volume > 0 and probs.size:
            probs = self._volume_gate(samples, probs)
        split: int | None = None
        for p in probs:
            utt.probs.append(float(p))
            if p >= SPEECH_THRESHOLD:
                if split is None:
                    split = self._split_point(utt)
                    if split is None:
                        self._drop_speculation()
                utt.speech_frames += 1
                utt.silence_frames = 0
            else:
                utt.silence_frames += 1
        if split is not None:
            self._commit(split)
        if self._utt.speech_frames == 0:
            self._trim_leading_silence()
        self._after_audio()

    def _split_point(self, utt: _Utterance) -> int | None:
        """Speech resumes: where to finalize the long utterance before this pause, if anywhere.

        A long utterance that pauses has usually been decoded already by the speculation that the pause
        started. Finalizing it there keeps that work instead of throwing it away, and keeps the open utterance
        short, so the decode after the next `finalize` (and every interim until then) stays fast.
        """
        spec = self._speculation
        if spec is None or utt.silence_frames < SPLIT_PAUSE_FRAMES:
            return None
        return spec.samples if spec.samples >= SPLIT_MIN_SECONDS * SAMPLE_RATE else None

    def _trim_leading_silence(self) -> None:
        """Before any speech, keep only a short lead-in: long silence costs encoder time and invites
        hallucinations, and it would hold memory for as long as a client streams nothing."""
        utt = self._utt
        drop_frames = len(utt.probs) - LEAD_IN_FRAMES
        if drop_frames <= 0:
            return
        drop = min(drop_frames * FRAME, utt.samples)
        utt.audio = [self._audio(utt.samples)[drop:]]
        utt.samples -= drop
        utt.start += drop
        utt.probs = utt.probs[drop_frames:]
        utt.silence_frames = min(utt.silence_frames, len(utt.probs))

    def _volume_gate(self, samples: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Frames quieter than `min_volume` (RMS, full scale = 1.0) count as silence whatever the VAD says."""
        joined = np.concatenate([self._vad_tail, samples])
        usable = probs.size * FRAME
        frames = joined[-(self._vad.pending_samples + usable) :][:usable].reshape(probs.size, FRAME)
        self._vad_tail = joined[-(FRAME + self._vad.pending_samples) :]
        rms = np.sqrt(np.mean(frames * frames, axis=1))
        return np.where(rms >= self.config.min_volume, probs, 0.0)

    def _after_audio(self) -> None:
        cfg, utt = self.config, self._utt
        if self._backlog_seconds() > cfg.max_backlog:
            raise ApiError(
                429,
                "rate_limited",
                "Audio backlog exceeded",
                f"more than {cfg.max_backlog:g} s of audio is waiting to be transcribed; "
                "send audio in real time",
            )
        if utt.speech_frames >= MIN_SPEECH_FRAMES:
            silence = utt.silence_frames * FRAME_SECONDS
            if silence >= cfg.max_silence:
                self._commit(utt.samples)
                return
            if silence >= cfg.speculative_silence and self._speculation is None:
                self._speculate()
            elif silence < cfg.speculative_silence:
                self._maybe_interim()
        if utt.samples >= cfg.max_utterance * SAMPLE_RATE:
            frames = len(utt.probs)
            cut = quietest_cut(np.asarray(utt.probs), frames // 2, frames) * FRAME
            self._commit(max(cut, FRAME))

    def _backlog_seconds(self) -> float:
        return (self._pending_final_samples + self._utt.samples) / SAMPLE_RATE

    # -- decoding ----------------------------------------------------------------------------------------

    def _audio(self, samples: int) -> np.ndarray:
        joined = np.concatenate(self._utt.audio) if len(self._utt.audio) > 1 else self._utt.audio[0]
        self._utt.audio = [joined]
        return joined[:samples]

    def _decode(
        self,
        audio: np.ndarray,
        start: int,
        priority: Priority,
        generation: int | None = None,
        running: threading.Event | None = None,
    ) -> asyncio.Future[Transcription]:
        """Schedule a decode. Interims (those with a `generation` to go stale against) use the interim model
        and skip word alignment: the final replaces them anyway, and they are most of the model time."""
        offset = start / SAMPLE_RATE
        cfg = self.config
        interim = generation is not None
        recognizer = self._interim_recognizer if interim else self.recognizer

        def job() -> Transcription:
            if running is not None:
                running.set()
            try:
                return recognizer.decode_utterance(
                    audio, cfg.language, cfg.beam_size, offset, self._hotwords, word_timestamps=not interim
                )
            finally:
                if running is not None:
                    running.clear()

        stale = None if generation is None else (lambda: generation != self._generation)
        task = asyncio.ensure_future(self.engine.scheduler.run(job, priority, stale))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _speculate(self) -> None:
        """Start the final decode at a pause, unless an abandoned one still occupies the model: speculating
        again at every short pause would pile up decodes nobody will read."""
        if self._abandoned is not None and self._abandoned.running.is_set():
            return
        utt = self._utt
        running = threading.Event()
        task = self._decode(self._audio(utt.samples), utt.start, Priority.FINAL, running=running)
        self._speculation = _Speculation(utt.samples, task, running)

    def _drop_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.task.cancel()  # skipped if still queued; runs to its end if already started
            self._abandoned = self._speculation
            self._speculation = None

    def _maybe_interim(self) -> None:
        utt = self._utt
        # Each interim re-decodes the whole utterance, so a long one gets them less often: the cost per second
        # of audio stays flat instead of growing with the utterance. The first words should show up quickly.
        interval = int(max(self.config.interim_interval, utt.samples / SAMPLE_RATE / 6) * SAMPLE_RATE)
        if not utt.last_interim_at:
            interval //= 2
        if self._interim is not None or utt.samples - utt.last_interim_at < interval:
            return
        # Under load, interims are the first thing to go: finals and batch work waiting take precedence.
        if self.engine.scheduler.depth_at_or_above(Priority.INTERIM) >= self.engine.settings.workers:
            return
        utt.last_interim_at = utt.samples
        self._interim = asyncio.ensure_future(self._run_interim(self._audio(utt.samples), utt.start))

    async def _run_interim(self, audio: np.ndarray, start: int) -> None:
        generation = self._generation
        try:
            result = await self._decode(audio, start, Priority.INTERIM, generation)
        except JobSkipped:
            return
        finally:
            self._interim = None
        if generation == self._generation and result.empty:
            # Too little audio for a word yet: try again after half an interval, not a whole one.
            half = int(self.config.interim_interval * SAMPLE_RATE) // 2
            self._utt.last_interim_at = max(1, self._utt.last_interim_at - half)
        elif generation == self._generation:
            update = TranscriptUpdate(
                self._delta(result.text), False, audio.size / SAMPLE_RATE, result.words, self.config.language
            )
            self.outputs.put_nowait(ready(update))

    # -- commits -----------------------------------------------------------------------------------------

    def _commit(self, samples: int) -> None:
        """Close the utterance at `samples`: its final decode joins the output FIFO; the rest starts anew."""
        utt = self._utt
        audio = self._audio(samples) if utt.samples else np.zeros(0, dtype=np.float32)
        frames = min(len(utt.probs), -(-samples // FRAME))
        has_speech = sum(1 for p in utt.probs[:frames] if p >= SPEECH_THRESHOLD) >= MIN_SPEECH_FRAMES
        final: asyncio.Future[Transcription] | None = None
        if has_speech:
            spec = self._speculation
            tail_quiet = spec is not None and all(
                p < SPEECH_THRESHOLD for p in utt.probs[spec.samples // FRAME : frames]
            )
            if spec is not None and spec.samples <= samples and tail_quiet:
                final = spec.task
            else:
                self._drop_speculation()
                final = self._decode(audio, utt.start, Priority.FINAL)
        else:
            self._drop_speculation()
        self._speculation = None
        self._generation += 1
        duration = samples / SAMPLE_RATE
        if final is not None:
            self._pending_final_samples += samples
            self.outputs.put_nowait(self._final(final, duration, samples))
        rest = self._audio(utt.samples)[samples:] if utt.samples > samples else np.zeros(0, dtype=np.float32)
        rest_probs = utt.probs[frames:]
        self._utt = _Utterance(start=utt.start + samples)
        if rest.size:
            self._utt.audio, self._utt.samples = [rest], rest.size
            self._utt.probs = rest_probs
            self._utt.speech_frames = sum(1 for p in rest_probs if p >= SPEECH_THRESHOLD)

    async def _final(self, decode: Awaitable[Transcription], duration: float, samples: int) -> Output | None:
        try:
            result = await decode
        finally:
            self._pending_final_samples -= samples
        if result.empty:
            return None
        text = self._delta(result.text)
        self._emitted_text = True
        return TranscriptUpdate(text, True, duration, result.words, self.config.language)

    def _delta(self, text: str) -> str:
        """Verbatim spacing: the space between words opens the next delta, never closes the previous one."""
        text = text.strip()
        return (" " + text) if (text and self._emitted_text) else text

    # -- commands ----------------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Everything buffered becomes final now; `flush_done` follows those finals.

        The resampler's few milliseconds of delay line stay where they are: draining it would end the stream,
        and audio keeps coming after a `finalize`.
        """
        self._commit(self._utt.samples)
        self.outputs.put_nowait(ready(FlushDone(time.monotonic())))

    def flush_all(self) -> None:
        """For `close`/`done` and shutdown: the stream ends, so the resampler is drained too."""
        tail = self._decoder.flush()
        if tail.size:
            self._ingest(tail)
        self._commit(self._utt.samples)

    def cancel(self) -> None:
        """The client went away: stop all decoding for this session and drop what was queued."""
        if self._interim is not None:
            self._interim.cancel()
        for task in list(self._tasks):
            task.cancel()
        while not self.outputs.empty():
            item = self.outputs.get_nowait()
            if asyncio.iscoroutine(item):
                item.close()


async def ready(value: T) -> T:
    """An already-known output as an awaitable, so it can queue behind decodes in a session's output FIFO."""
    return value
