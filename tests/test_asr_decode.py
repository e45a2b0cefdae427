"""`Recognizer.decode_utterance` on real speech with the real models: the sentence-end probability that turn
detection relies on, and the single-window decode it comes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from stenograph import asr
from stenograph.asr import Engine, ModelSpec, Recognizer
from stenograph.audio import SAMPLE_RATE, read_file
from stenograph.config import Settings
from stenograph.wer import corpus_wer
from tests.conftest import MODEL_DIR

EVAL_CLIP = "audio/librispeech_test_clean/1089-134686-0002.flac"  # "... the squalid quarter of the brothels"


@pytest.fixture(scope="module")
def base() -> Recognizer:
    settings = Settings(model_dir=MODEL_DIR, workers=1, cpu_threads=1)
    return Recognizer(ModelSpec("whisper-base", MODEL_DIR / "whisper-base", catalogued=True), settings)


@pytest.fixture(scope="module")
def sentence(clips) -> np.ndarray:
    clip = next(c for c in clips if c.path.as_posix().endswith(EVAL_CLIP))
    return read_file(str(Path(clip.path)))


def test_end_probability_is_high_after_a_sentence_and_low_inside_one(base: Recognizer, sentence) -> None:
    whole = base.decode_utterance(sentence, "en", 1, end_probability=True)
    assert whole.text.strip().lower().endswith("brothels.")
    assert whole.end_probability is not None and whole.end_probability > 0.5
    # Cut after "the squalid quarter of": nobody ends a sentence on "of".
    of = [w for w in whole.words if w.word.lower() == "of"][-1]
    inside = base.decode_utterance(sentence[: int(of.end * SAMPLE_RATE)], "en", 1, end_probability=True)
    assert inside.text.strip().lower().rstrip(".").endswith("quarter of")
    assert inside.end_probability is not None and inside.end_probability < 0.1


def test_end_probability_only_when_asked_and_only_for_greedy_decoding(base: Recognizer, sentence) -> None:
    assert base.decode_utterance(sentence, "en", 1).end_probability is None
    beam = base.decode_utterance(sentence, "en", 5, end_probability=True)
    assert beam.end_probability is None  # beam search returns no per-step probabilities
    assert beam.text.strip().lower().endswith("brothels.")


def test_prefix_is_said_and_aligned_and_prompt_is_not_repeated(base: Recognizer, sentence) -> None:
    whole = base.decode_utterance(sentence, "en", 1)
    here = next(i for i, w in enumerate(whole.words) if w.word.lower() == "here")
    start = whole.words[here].start
    tail = sentence[int(start * SAMPLE_RATE) :]
    said = " ".join(w.word for w in whole.words[:here])
    context = " ".join(w.word for w in whole.words[here : here + 3])
    out = base.decode_utterance(tail, "en", 1, offset=start, prompt=said, prefix=context)
    words = [w.word for w in out.words]
    assert words[:3] == context.split(), "the prefix opens the result verbatim"
    assert words[-1].lower().startswith("brothels")
    assert all(start <= w.start <= w.end for w in out.words), "times are offset into the caller's audio"
    assert out.words[-1].end == pytest.approx(whole.words[-1].end, abs=0.3)


class _FakeGpuRecognizer:
    """Stands in for a CUDA-loaded model (this machine has no GPU): records the decodes asked of it."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec, self.device, self.decoded = spec, "cuda", []

    def transcribe(self, audio: np.ndarray, language: str, beam_size: int, word_timestamps: bool) -> None:
        self.decoded.append((audio.size, word_timestamps))


def test_preload_warms_each_gpu_model_once_with_fake_gpu_recognizer(monkeypatch) -> None:
    """A GPU's first decode is slow (CUDA setup): preload decodes once per distinct model, not per alias."""
    monkeypatch.setattr(asr, "Recognizer", _FakeGpuRecognizer)
    engine = Engine(Settings(model_dir=MODEL_DIR))
    try:
        engine.preload(["ink-whisper", "whisper-base", "ink-2"])
        warmed = {name: rec.decoded for name, rec in engine._recognizers.items()}
    finally:
        engine.close()
    assert warmed == {"whisper-base": [(SAMPLE_RATE, True)], "whisper-tiny.en": [(SAMPLE_RATE, True)]}


def test_preload_leaves_cpu_models_cold(base: Recognizer, monkeypatch) -> None:
    """On the CPU the first decode costs no more than later ones: no warm-up decode at startup."""
    calls: list[str] = []
    monkeypatch.setattr(Recognizer, "transcribe", lambda self, *a, **k: calls.append(self.spec.name))
    engine = Engine(Settings(model_dir=MODEL_DIR))
    try:
        engine.preload(["whisper-base"])
        assert {rec.device for rec in engine._recognizers.values()} == {"cpu"}
    finally:
        engine.close()
    assert calls == []


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_engine_keeps_numpy_blas_on_one_thread() -> None:
    """A second BLAS thread only spins between the feature extractors' small matrix products, taking a core
    from the models; the engine caps the pool at one thread for the whole process."""
    with threadpool_limits(2, user_api="blas"):
        if _blas_threads() != {2}:
            pytest.skip("this process's BLAS cannot run two threads")
        engine = Engine(Settings(model_dir=MODEL_DIR))
        try:
            assert _blas_threads() == {1}
        finally:
            engine.close()


def test_long_utterances_get_less_encoder_padding(base: Recognizer, clips, monkeypatch) -> None:
    """Short windows (turn prefixes, tails) keep 4 s of padding against loops; from 8 s of audio on, 2 s,
    which every long streaming final gains from."""
    assert asr.short_window(300) == 700, "3 s of audio: 4 s of padding"
    assert asr.short_window(700) == 1000, "7 s: a 10 s window"
    assert asr.short_window(1200) == 1400, "12 s: 2 s of padding"
    windows: list[tuple[int, int]] = []
    decode_window = Recognizer._decode_window

    def spy(self: Recognizer, features: np.ndarray, window: int, *args: object) -> asr.Transcription:
        windows.append((features.shape[-1], window))
        return decode_window(self, features, window, *args)

    monkeypatch.setattr(Recognizer, "_decode_window", spy)
    clip = next(c for c in clips if c.subset == "librispeech_test_clean" and 10.0 <= c.duration <= 15.0)
    result = base.decode_utterance(read_file(str(clip.path)), "en", 1)
    ((frames, window),) = windows
    assert window == frames + asr.SHORT_WINDOW_MIN_PAD_FRAMES
    assert corpus_wer([(clip.text, result.text)]) < 0.1, result.text
