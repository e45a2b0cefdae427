"""What the batch API decodes: every container, raw PCM encoding and rate, long files, silence and noise.

Fixtures are made from one eval clip with ffmpeg (the way a user's files come about) and from consecutive
utterances of one LibriSpeech speaker, so the words to expect are always known.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soxr

from stenograph.audio import ENCODINGS, SAMPLE_RATE, encode_pcm, read_file
from stenograph.wer import Clip, corpus_wer, normalize, wer
from tests.conftest import API_KEY, LiveServer, write_wav

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CLIP_ID = "ls-test-clean-1089-134686-0002"  # 6.6 s, clean read speech
PAUSE_SECONDS = 1.0
LONG_SECONDS = 60.0

# Container and codec per format; rates and channels vary so decoding, downmixing and resampling all run.
FFMPEG_ARGS = {
    "wav": ["-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le"],
    "flac": ["-ar", "16000", "-ac", "1", "-c:a", "flac"],
    "mp3": ["-ar", "22050", "-ac", "1", "-c:a", "libmp3lame", "-b:a", "48k"],
    "ogg": ["-ar", "48000", "-ac", "1", "-c:a", "libopus", "-b:a", "24k"],
    "webm": ["-ar", "48000", "-ac", "2", "-c:a", "libopus", "-b:a", "32k"],
    "m4a": ["-ar", "32000", "-ac", "1", "-c:a", "aac", "-b:a", "48k"],
}


@dataclass(frozen=True)
class Utterance:
    clip: Clip
    start: float  # where it begins in the long file, seconds
    end: float


@dataclass(frozen=True)
class LongFile:
    path: Path
    duration: float
    utterances: list[Utterance]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def source(clips: list[Clip]) -> Clip:
    return next(c for c in clips if c.id == CLIP_ID)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def transcribe(client: httpx.Client, path: Path, words: bool = False, **params: str) -> dict:
    data = {"model": "ink-whisper", "language": "en"}
    if words:
        data["timestamp_granularities[]"] = "word"
    response = client.post("/stt", files={"file": (path.name, path.read_bytes())}, data=data, params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("fmt", [*FFMPEG_ARGS, "mp4"])
def test_container_formats(client, source, fixture_dir, fmt):
    out = fixture_dir / f"clip.{fmt}"
    if fmt == "mp4":  # a real video file: the audio track must be found next to a video track
        ffmpeg(
            "-f",
            "lavfi",
            "-i",
            "color=c=black:s=64x64:r=5",
            "-i",
            str(source.path),
            "-shortest",
            "-c:v",
            "mpeg4",
            "-c:a",
            "aac",
            "-b:a",
            "48k",
            str(out),
        )
    else:
        ffmpeg("-i", str(source.path), *FFMPEG_ARGS[fmt], str(out))
    body = transcribe(client, out)
    assert wer(source.text, body["text"]) < 0.15, (fmt, body["text"])
    # Codec priming and frame padding may add a few tens of milliseconds, never more.
    assert body["duration"] == pytest.approx(source.duration, abs=0.1)


@pytest.mark.parametrize("rate", [8000, 48000])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_raw_pcm(client, source, fixture_dir, encoding, rate):
    samples = soxr.resample(read_file(str(source.path)), SAMPLE_RATE, rate, quality="HQ")
    out = fixture_dir / f"clip-{encoding}-{rate}.raw"
    out.write_bytes(encode_pcm(samples, encoding))
    body = transcribe(client, out, encoding=encoding, sample_rate=str(rate))
    assert wer(source.text, body["text"]) < 0.15, (encoding, rate, body["text"])
    assert body["duration"] == pytest.approx(source.duration, abs=0.02)


@pytest.fixture(scope="module")
def long_file(clips: list[Clip], fixture_dir: Path) -> LongFile:
    """Consecutive utterances of one speaker with pauses between them, just over a minute."""
    first = next(c for c in clips if c.subset == "librispeech_test_other")
    parts: list[np.ndarray] = []
    utterances: list[Utterance] = []
    position = 0.0
    for clip in (c for c in clips if c.speaker == first.speaker and c.subset == first.subset):
        if position > LONG_SECONDS:
            break
        if parts:
            parts.append(np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), np.float32))
            position += PAUSE_SECONDS
        audio = read_file(str(clip.path))
        parts.append(audio)
        utterances.append(Utterance(clip, position, position + audio.size / SAMPLE_RATE))
        position += audio.size / SAMPLE_RATE
    samples = np.concatenate(parts)
    assert samples.size / SAMPLE_RATE > LONG_SECONDS, "one speaker's utterances must add up to over a minute"
    return LongFile(write_wav(fixture_dir / "long.wav", samples), samples.size / SAMPLE_RATE, utterances)


def test_long_file(client, long_file):
    body = transcribe(client, long_file.path, words=True)
    assert body["duration"] == pytest.approx(long_file.duration, abs=0.01)

    words = body["words"]
    starts = [w["start"] for w in words]
    assert starts == sorted(starts), "word timestamps run forward across chunk boundaries"
    assert all(0 <= w["start"] <= w["end"] <= long_file.duration + 0.05 for w in words)
    assert " ".join(w["word"] for w in words).split() == body["text"].split(), "words and text agree"

    references = [u.clip.text for u in long_file.utterances]
    assert corpus_wer([(" ".join(references), body["text"])]) < 0.2, body["text"]
    # Every utterance is there, and at the time it was spoken: the words timed within its span match it.
    for u in long_file.utterances:
        spoken = " ".join(w["word"] for w in words if u.start - 0.5 <= w["start"] <= u.end + 0.5)
        assert wer(u.clip.text, spoken) < 0.4, (u.clip.id, u.clip.text, spoken)
    assert len(normalize(body["text"])) >= 0.9 * len(normalize(" ".join(references)))


def noise(kind: str, seconds: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    if kind == "white":
        return 0.1 * white
    brown = np.cumsum(white)
    brown -= np.convolve(brown, np.ones(1601) / 1601, mode="same")  # keep the random walk from drifting
    return (0.3 * brown / np.abs(brown).max()).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "seconds"),
    [("silence", 35.0), ("white", 12.0), ("brown", 12.0)],
)
def test_no_speech_gives_no_text(client, fixture_dir, name, seconds):
    """Whisper alone invents "Thank you." on silence and noise; windows without speech must never reach it."""
    samples = np.zeros(int(seconds * SAMPLE_RATE), np.float32) if name == "silence" else noise(name, seconds)
    body = transcribe(client, write_wav(fixture_dir / f"{name}.wav", samples), words=True)
    assert body["text"] == "" and body["words"] == []
    assert body["duration"] == pytest.approx(seconds, abs=0.01)
