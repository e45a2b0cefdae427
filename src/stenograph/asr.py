"""The shared inference engine: model resolution, lazy verified loading, and Whisper decoding.

One Engine per process owns every model and the scheduler's threads, so the batch routes, the WebSockets
and the CLI all share the same weights in memory and the same bounded pool of model calls.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import Segment, TranscriptionOptions, get_suppressed_tokens

from stenograph.config import Settings
from stenograph.errors import ApiError, model_not_found
from stenograph.models import CATALOGUE, ModelError, verify
from stenograph.protocol import WHISPER_LANGUAGES
from stenograph.scheduler import Scheduler
from stenograph.smart_turn import SmartTurn
from stenograph.vad import SileroVad

log = logging.getLogger("stenograph.asr")

# API model ids that always mean Whisper base; `ink-2` is configurable.
WHISPER_ALIASES = ("ink-whisper", "ink-whisper-2025-06-04")

# Short-window decoding: the encoder sees the utterance plus this much padding instead of a fixed 30 s.
# Whisper loops ("It was this one. It was this one. ...") far more often on short windows, most of all on
# the 1-4 s turn prefixes a live session decodes. On 198 such prefixes of 40 LibriSpeech clips, 2 s of
# padding looped on 19, 3 s on 8, 4 s on 1, for about 10 ms more per decode; WER of the whole clips was
# unchanged (4.9-5.0 %).
SHORT_WINDOW_PAD_FRAMES = 400
FULL_WINDOW_FRAMES = 3000
# A loop used to run to Whisper's 448-token limit (2-3 s of decoding on one core, which stalled every turn
# queued behind it). Nobody says more than ~7 tokens a second, so a decode stops at 10 a second.
MAX_TOKENS_PER_SECOND = 10
MIN_MAX_TOKENS = 10
# Guards that send a short-window decode back through the full 30 s window.
MAX_COMPRESSION_RATIO = 2.4
MAX_WORDS_PER_SECOND = 6.0
REPEATED_PHRASE_WORDS = 5


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Transcription:
    text: str  # verbatim model text: segments joined, each with its own leading space
    words: list[Word]

    @property
    def empty(self) -> bool:
        return not self.text.strip()


@dataclass(frozen=True)
class ModelSpec:
    """What an API model id resolves to: a directory, and whether its files are pinned in the catalogue."""

    name: str
    path: Path
    catalogued: bool


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def default_compute_type(device: str, compute_type: str) -> str:
    if compute_type != "default":
        return compute_type
    return "float16" if device == "cuda" else "int8"


class Recognizer:
    """One loaded Whisper model plus the decode settings that don't vary per call."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.device = resolve_device(settings.device)
        self.compute_type = default_compute_type(self.device, settings.compute_type)
        self.model = WhisperModel(
            str(spec.path),
            device=self.device,
            compute_type=self.compute_type,
            cpu_threads=settings.cpu_threads,
            num_workers=settings.workers,
            local_files_only=True,
        )
        self.languages: frozenset[str] | None = (
            None if self.model.model.is_multilingual else frozenset({"en"})
        )

    def transcribe(
        self,
        audio: np.ndarray,
        language: str,
        beam_size: int,
        word_timestamps: bool,
        offset: float = 0.0,
        hotwords: str | None = None,
    ) -> Transcription:
        """Decode one batch chunk (at most Whisper's 30 s window, see batch.py) in a single window.

        With timestamp tokens Whisper often leaves a chunk's last sentence for "the next window", and with
        word timestamps faster-whisper always seeks back to the last word's end: either way the tail is
        decoded again with a whole second 30 s encoder pass, which made long files a third slower than plain
        faster-whisper (that carries the tail into its next window instead) and turned trailing silence into
        "you." hallucinations. Without timestamp tokens the first window is one segment holding the whole
        chunk, so decoding stops there; LibriSpeech WER was also lower this way (README, benchmarks/batch.py).
        """
        segments, _ = self.model.transcribe(
            audio,
            language=language if self.languages is None else "en",
            beam_size=beam_size,
            word_timestamps=word_timestamps,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
            hotwords=hotwords,
        )
        first = next(iter(segments), None)  # the generator decodes lazily: later windows never run
        if first is None:
            return Transcription("", [])
        return Transcription(first.text, _words([first], offset))

    def decode_utterance(
        self,
        audio: np.ndarray,
        language: str,
        beam_size: int,
        offset: float = 0.0,
        hotwords: str | None = None,
        prompt: str | None = None,
        word_timestamps: bool = True,
        prefix: str | None = None,
    ) -> Transcription:
        """Low-latency decode of one utterance (< 30 s) for streaming.

        The encoder gets the utterance plus a little padding rather than Whisper's fixed 30 s window, which is
        most of the cost for short audio. Whisper was trained on 30 s windows and occasionally loops on short
        ones, so a result that looks like a loop (high compression ratio, implausible word rate) is decoded
        again with the full window. `prompt` is the text said just before `audio`: a window that starts
        mid-sentence then continues it (case, punctuation, spelling of names) instead of starting a new one.
        `prefix` is text known to open `audio`: Whisper is made to say it, then goes on from there, so the
        window can start a second before the unknown part and still hear its first word in context. The
        result includes the prefix, with word times aligned as if it had been decoded.
        """
        tokenizer = Tokenizer(
            self.model.hf_tokenizer,
            self.model.model.is_multilingual,
            task="transcribe",
            language=language if self.languages is None else "en",
        )
        max_tokens = MIN_MAX_TOKENS + int(MAX_TOKENS_PER_SECOND * audio.size / 16000)
        options = _streaming_options(
            tokenizer, beam_size, hotwords, prompt, prefix, word_timestamps, max_tokens
        )
        features = self.model.feature_extractor(audio)
        short = min(FULL_WINDOW_FRAMES, features.shape[-1] + SHORT_WINDOW_PAD_FRAMES)
        result = self._decode_window(features, short, tokenizer, options)
        if short < FULL_WINDOW_FRAMES and _looks_degenerate(result, audio.size / 16000):
            result = self._decode_window(features, FULL_WINDOW_FRAMES, tokenizer, options)
        return Transcription("".join(s.text for s in result), _words(result, offset))

    def _decode_window(
        self, features: np.ndarray, window: int, tokenizer: Tokenizer, options: TranscriptionOptions
    ) -> list[Segment]:
        encoder_output = self.model.encode(pad_or_trim(features[:, :FULL_WINDOW_FRAMES], window))
        segments = self.model.generate_segments(
            features, tokenizer, options, False, encoder_output=encoder_output
        )
        # Without timestamp tokens the first window is one segment. Stop there: after it, faster-whisper seeks
        # to the last word's end and decodes the trailing pause in a fresh 30 s window, which costs a full
        # encoder pass and is where "you" and "Thank you." hallucinations come from.
        first = next(iter(segments), None)
        return [] if first is None else [first]


def _streaming_options(
    tokenizer: Tokenizer,
    beam_size: int,
    hotwords: str | None,
    prompt: str | None,
    prefix: str | None,
    word_timestamps: bool,
    max_tokens: int,
) -> TranscriptionOptions:
    """Single temperature, no timestamp tokens (word times, when wanted, come from alignment instead)."""
    return TranscriptionOptions(
        beam_size=beam_size,
        best_of=1,
        patience=1.0,
        length_penalty=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        log_prob_threshold=-1.0,
        no_speech_threshold=0.6,
        compression_ratio_threshold=MAX_COMPRESSION_RATIO,
        condition_on_previous_text=False,
        prompt_reset_on_temperature=0.5,
        temperatures=[0.0],
        initial_prompt=prompt,
        prefix=prefix,
        suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        without_timestamps=True,
        max_initial_timestamp=1.0,
        word_timestamps=word_timestamps,
        prepend_punctuations="\"'“¿([{-",
        append_punctuations="\"'.。,，!！?？:：”)]}、",
        multilingual=False,
        max_new_tokens=max_tokens,
        clip_timestamps="0",
        hallucination_silence_threshold=None,
        hotwords=hotwords,
    )


def _words(segments: list[Segment], offset: float) -> list[Word]:
    return [
        Word(w.word.strip(), offset + w.start, offset + w.end)
        for seg in segments
        for w in seg.words or ()
        if w.word.strip()
    ]


def _looks_degenerate(segments: list[Segment], seconds: float) -> bool:
    """Signs of a decoder loop: repetitive text, more words than anyone speaks, or a phrase said twice."""
    if any(seg.compression_ratio > MAX_COMPRESSION_RATIO for seg in segments):
        return True
    words = [w.lower().strip(".,!?;:") for seg in segments for w in seg.text.split()]
    if len(words) > MAX_WORDS_PER_SECOND * max(seconds, 1.0):
        return True
    grams = [
        tuple(words[i : i + REPEATED_PHRASE_WORDS]) for i in range(len(words) - REPEATED_PHRASE_WORDS + 1)
    ]
    return len(grams) != len(set(grams))


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scheduler = Scheduler(settings.workers, settings.max_queued_jobs)
        self._recognizers: dict[str, Recognizer] = {}
        self._load_lock = threading.Lock()
        self._vad: SileroVad | None = None
        self._smart_turn: SmartTurn | None = None

    # -- model ids ---------------------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [*WHISPER_ALIASES, "ink-2", *CATALOGUE_WHISPER, *self.settings.extra_models]

    def spec_for(self, model_id: str) -> ModelSpec:
        """Map an API model id to a model directory; unknown ids are the client's error (400)."""
        name = model_id.strip()
        if name in WHISPER_ALIASES:
            name = "whisper-base"
        elif name == "ink-2":
            name = self.settings.ink2_model
        if name in self.settings.extra_models:
            return ModelSpec(name, Path(self.settings.extra_models[name]), catalogued=False)
        if name in CATALOGUE_WHISPER:
            return ModelSpec(name, CATALOGUE[name].path(self.settings.model_dir), catalogued=True)
        raise model_not_found(model_id, self.model_ids())

    def recognizer(self, model_id: str) -> Recognizer:
        spec = self.spec_for(model_id)
        with self._load_lock:
            rec = self._recognizers.get(spec.name)
            if rec is None:
                if spec.catalogued:
                    verify(CATALOGUE[spec.name], self.settings.model_dir)
                elif not (spec.path / "model.bin").is_file():
                    raise ModelError(f"extra model {spec.name!r}: no model.bin in {spec.path}")
                log.info("loading model %s from %s", spec.name, spec.path)
                rec = Recognizer(spec, self.settings)
                self._recognizers[spec.name] = rec
            return rec

    def interim_recognizer(self, model_id: str, language: str) -> Recognizer:
        """The model for a session's interims: the configured small English model for English sessions."""
        name = self.settings.stream_interim_model
        if not name or language != "en":
            return self.recognizer(model_id)
        return self.recognizer(name)

    def languages(self, model_id: str) -> frozenset[str]:
        langs = self.recognizer(model_id).languages
        return WHISPER_LANGUAGES if langs is None else langs

    @property
    def vad(self) -> SileroVad:
        with self._load_lock:
            if self._vad is None:
                self._vad = SileroVad(verify(CATALOGUE["silero-vad"], self.settings.model_dir))
            return self._vad

    @property
    def smart_turn(self) -> SmartTurn:
        with self._load_lock:
            if self._smart_turn is None:
                path = verify(CATALOGUE["smart-turn-v3.2"], self.settings.model_dir)
                self._smart_turn = SmartTurn(path, self.settings.turn_threads)
            return self._smart_turn

    def preload(self, model_ids: list[str]) -> None:
        """Load (and hash-check) models up front so the first request doesn't pay for it."""
        _ = self.vad
        _ = self.smart_turn
        for model_id in [*model_ids, self.settings.stream_interim_model]:
            if model_id:
                self.recognizer(model_id)

    @property
    def ready(self) -> bool:
        return self._vad is not None and bool(self._recognizers)

    def close(self) -> None:
        self.scheduler.close()


CATALOGUE_WHISPER = tuple(name for name, entry in CATALOGUE.items() if entry.kind == "whisper")


def require_model(engine: Engine, model_id: str | None) -> Recognizer:
    if not model_id or not model_id.strip():
        raise ApiError(400, "invalid_request", "Missing parameter", "model is required")
    return engine.recognizer(model_id)
