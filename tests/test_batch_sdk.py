"""Batch transcription through the official cartesia and OpenAI SDKs against the live server."""

from __future__ import annotations

import pytest
from cartesia import Cartesia
from openai import OpenAI

from stenograph.wer import corpus_wer
from tests.conftest import API_KEY, pick


def check_words(words: list, duration: float) -> None:
    assert words, "word timestamps were requested but none came back"
    prev_start = 0.0
    for w in words:
        word, start, end = (
            (w["word"], w["start"], w["end"]) if isinstance(w, dict) else (w.word, w.start, w.end)
        )
        assert word.strip(), "every word has text"
        assert 0.0 <= start <= end <= duration + 0.05, (word, start, end, duration)
        assert start >= prev_start - 1e-6, "word starts are monotonic"
        prev_start = start


def test_cartesia_sdk_transcribes_librispeech(server, clips):
    client = Cartesia(api_key=API_KEY, base_url=server.url)
    pairs = []
    for clip in pick(clips, "librispeech_test_clean", 5):
        with clip.path.open("rb") as fh:
            response = client.stt.transcribe(
                file=fh, model="ink-whisper", language="en", timestamp_granularities=["word"]
            )
        assert response.type == "transcript"
        assert response.language == "en"
        assert response.duration == pytest.approx(clip.duration, abs=0.05)
        check_words(response.words, clip.duration)
        pairs.append((clip.text, response.text))
    assert corpus_wer(pairs) < 0.10, pairs


def test_openai_sdk_transcribes_with_word_timings(server, clips):
    client = OpenAI(api_key=API_KEY, base_url=server.url)
    clip = pick(clips, "librispeech_test_clean", 3)[2]
    with clip.path.open("rb") as fh:
        result = client.audio.transcriptions.create(
            file=fh,
            model="ink-whisper",
            language="en",
            timestamp_granularities=["word"],
            response_format="verbose_json",
        )
    assert corpus_wer([(clip.text, result.text)]) < 0.15, result.text
    words = [w.model_dump() for w in result.words]
    check_words(words, clip.duration)


def test_openai_sdk_v1_base_url_and_no_words_unless_asked(server, clips):
    client = OpenAI(api_key=API_KEY, base_url=server.url + "/v1")
    clip = pick(clips, "librispeech_test_clean", 1)[0]
    with clip.path.open("rb") as fh:
        result = client.audio.transcriptions.create(
            file=fh, model="ink-whisper", prompt="ignored", temperature=0.3
        )
    assert corpus_wer([(clip.text, result.text)]) < 0.15
    assert "words" not in (result.model_extra or {})


def test_multilingual_clip_in_its_language(server, clips):
    client = Cartesia(api_key=API_KEY, base_url=server.url)
    clip = next(c for c in clips if c.subset == "fleurs" and c.language == "es")
    with clip.path.open("rb") as fh:
        response = client.stt.transcribe(file=fh, model="ink-whisper", language="es")
    assert response.language == "es"
    assert corpus_wer([(clip.text, response.text)]) < 0.35, (clip.text, response.text)
