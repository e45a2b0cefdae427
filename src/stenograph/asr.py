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

from stenograph.config import Settings
from stenograph.errors import ApiError, model_not_found
from stenograph.models import CATALOGUE, ModelError, verify
from stenograph.protocol import WHISPER_LANGUAGES
from stenograph.scheduler import Scheduler
from stenograph.vad import SileroVad

log = logging.getLogger("stenograph.asr")

# API model ids that always mean Whisper base; `ink-2` is configurable.
WHISPER_ALIASES = ("ink-whisper", "ink-whisper-2025-06-04")


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
    """What an API model id resolves to: a loadable directory and whether it is checked against the catalogue."""

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
        self.languages: frozenset[str] | None = None if self.model.model.is_multilingual else frozenset({"en"})

    def transcribe(
        self,
        audio: np.ndarray,
        language: str,
        beam_size: int,
        word_timestamps: bool,
        offset: float = 0.0,
        hotwords: str | None = None,
    ) -> Transcription:
        segments, _ = self.model.transcribe(
            audio,
            language=language if self.languages is None else "en",
            beam_size=beam_size,
            word_timestamps=word_timestamps,
            condition_on_previous_text=False,
            vad_filter=False,
            hotwords=hotwords,
        )
        texts: list[str] = []
        words: list[Word] = []
        for seg in segments:
            texts.append(seg.text)
            for w in seg.words or ():
                token = w.word.strip()
                if token:
                    words.append(Word(token, offset + w.start, offset + w.end))
        return Transcription("".join(texts), words)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scheduler = Scheduler(settings.workers, settings.max_queued_jobs)
        self._recognizers: dict[str, Recognizer] = {}
        self._load_lock = threading.Lock()
        self._vad: SileroVad | None = None

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

    def languages(self, model_id: str) -> frozenset[str]:
        langs = self.recognizer(model_id).languages
        return WHISPER_LANGUAGES if langs is None else langs

    @property
    def vad(self) -> SileroVad:
        with self._load_lock:
            if self._vad is None:
                self._vad = SileroVad(verify(CATALOGUE["silero-vad"], self.settings.model_dir))
            return self._vad

    def preload(self, model_ids: list[str]) -> None:
        """Load (and hash-check) models up front so the first request doesn't pay for it."""
        _ = self.vad
        for model_id in model_ids:
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
