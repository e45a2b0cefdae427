"""`stenograph transcribe` and `stenograph models` as a user runs them: a real process on real files."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from stenograph.audio import SAMPLE_RATE, read_file
from stenograph.wer import Clip, corpus_wer, wer
from tests.conftest import API_KEY, MODEL_DIR, write_wav

CUE_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)([,.])(\d{3}) --> (\d\d):(\d\d):(\d\d)([,.])(\d{3})$")
PROGRESS_MIN_SECONDS = 30.0  # the CLI draws a progress bar only for files at least this long


def stenograph(*args: str, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STENOGRAPH_MODEL_DIR": str(MODEL_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "stenograph", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def clip(clips: list[Clip]) -> Clip:
    return next(c for c in clips if c.id == "ls-test-clean-1089-134686-0002")


@pytest.fixture(scope="module")
def second_clip(clips: list[Clip]) -> Clip:
    return next(c for c in clips if c.id == "ls-test-clean-61-70968-0000")


@pytest.fixture(scope="module")
def long_clip(clips: list[Clip], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """Consecutive utterances of one speaker joined with pauses, just long enough for a progress bar."""
    speaker = next(c for c in clips if c.subset == "librispeech_test_other").speaker
    parts, texts = [], []
    for c in clips:
        if c.speaker == speaker and sum(p.size for p in parts) < PROGRESS_MIN_SECONDS * SAMPLE_RATE:
            parts += [read_file(str(c.path)), np.zeros(SAMPLE_RATE // 2, np.float32)]
            texts.append(c.text)
    samples = np.concatenate(parts)
    path = write_wav(tmp_path_factory.mktemp("cli") / "talk.wav", samples)
    return path, " ".join(texts), samples.size / SAMPLE_RATE


def cue_times(match: re.Match[str]) -> tuple[float, float]:
    g = match.groups()
    start = int(g[0]) * 3600 + int(g[1]) * 60 + int(g[2]) + int(g[4]) / 1000
    end = int(g[5]) * 3600 + int(g[6]) * 60 + int(g[7]) + int(g[9]) / 1000
    return start, end


def parse_cues(text: str, separator: str, numbered: bool) -> list[tuple[float, float, str]]:
    """Parse SRT or WebVTT strictly: numbering, `-->` lines with the right millisecond separator, cue text."""
    cues = []
    for index, block in enumerate(text.strip().split("\n\n"), 1):
        lines = block.split("\n")
        if numbered:
            assert lines.pop(0) == str(index), block
        match = CUE_TIME.match(lines[0])
        assert match and match.group(4) == separator and match.group(9) == separator, block
        cue_text = " ".join(lines[1:]).strip()
        assert cue_text, block
        cues.append((*cue_times(match), cue_text))
    return cues


def check_cues(cues: list[tuple[float, float, str]], reference: str, duration: float) -> None:
    assert len(cues) > 1, "a half-minute talk makes several cues"
    for (start, end, _), (next_start, _, _) in itertools.pairwise(cues):
        assert start <= end <= next_start + 1e-3, cues
    assert cues[0][0] >= 0 and cues[-1][1] <= duration + 0.05
    assert corpus_wer([(reference, " ".join(c[2] for c in cues))]) < 0.2


def test_json_matches_the_api(clip, server):
    result = stenograph("transcribe", str(clip.path), "--format", "json")
    assert result.returncode == 0, result.stderr
    local = json.loads(result.stdout)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        response = c.post(
            "/stt",
            files={"file": (clip.path.name, clip.path.read_bytes())},
            data={"model": "ink-whisper", "language": "en", "timestamp_granularities[]": "word"},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    remote = response.json()
    assert set(local) == set(remote) == {"type", "text", "language", "duration", "request_id", "words"}
    assert local["type"] == "transcript" and local["language"] == "en"
    assert local["duration"] == pytest.approx(clip.duration, abs=0.01)
    assert wer(clip.text, local["text"]) < 0.15, local["text"]
    # Same engine, same settings: the CLI and the server must agree word for word and on every timestamp.
    assert local["text"] == remote["text"] and local["words"] == remote["words"]
    assert all(set(w) == {"word", "start", "end"} for w in local["words"])


def test_srt_with_a_progress_bar_on_a_terminal(long_clip):
    path, reference, duration = long_clip
    assert duration >= PROGRESS_MIN_SECONDS
    controller, terminal = pty.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO once the child has exited and the terminal is closed
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = stenograph("transcribe", str(path), "--format", "srt", stderr=terminal)
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(controller)
    assert result.returncode == 0
    check_cues(parse_cues(result.stdout, ",", numbered=True), reference, duration)
    progress = b"".join(seen).decode(errors="replace")
    assert f"{path.name}: [" in progress and "100.0%" in progress, progress


def test_vtt_and_several_files_into_an_output_dir(long_clip, clip, tmp_path):
    path, reference, duration = long_clip
    out = tmp_path / "subtitles"
    result = stenograph("transcribe", str(path), str(clip.path), "--format", "vtt", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", "with --output-dir nothing is printed"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{path.stem}.vtt", f"{clip.path.stem}.vtt"])
    talk = (out / f"{path.stem}.vtt").read_text()
    assert talk.startswith("WEBVTT\n\n")
    check_cues(parse_cues(talk.removeprefix("WEBVTT\n\n"), ".", numbered=False), reference, duration)
    short = parse_cues((out / f"{clip.path.stem}.vtt").read_text().removeprefix("WEBVTT\n\n"), ".", False)
    assert wer(clip.text, " ".join(c[2] for c in short)) < 0.15


def test_text_for_several_files(clip, second_clip):
    result = stenograph("transcribe", str(clip.path), str(second_clip.path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert lines[0] == f"# {clip.path}" and lines[2] == f"# {second_clip.path}", result.stdout
    assert wer(clip.text, lines[1]) < 0.15 and wer(second_clip.text, lines[3]) < 0.15, result.stdout


def test_bad_files_are_reported_and_the_rest_transcribed(clip, tmp_path):
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is a text file, not audio\n" * 100)
    missing = tmp_path / "missing.flac"
    result = stenograph("transcribe", str(garbage), str(clip.path), str(missing))
    assert result.returncode == 1
    assert f"error: {garbage}: could not read audio" in result.stderr, result.stderr
    assert f"error: {missing}:" in result.stderr and "No such file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert wer(clip.text, result.stdout.split(f"# {clip.path}\n")[1]) < 0.15, result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "whisper-huge"], "model 'whisper-huge' is not available"),
        (["--model", "whisper-tiny.en", "--language", "fr"], "language 'fr' is not supported"),
    ],
)
def test_bad_model_or_language(clip, args, message):
    result = stenograph("transcribe", str(clip.path), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_models_verifies_every_file():
    result = stenograph("models")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("whisper-base", "whisper-tiny.en", "silero-vad", "smart-turn"):
        line = next((row for row in result.stdout.splitlines() if row.startswith(name)), "")
        assert " ok " in line, result.stdout
    assert "ink-whisper, ink-whisper-2025-06-04 -> whisper-base" in result.stdout


@pytest.mark.parametrize("damaged", ["whisper-tiny.en/config.json", "silero_vad.onnx"])
def test_models_names_a_corrupted_file(tmp_path, damaged):
    """One flipped byte in a copy of the models: the command fails and says which file is bad."""
    copy = tmp_path / "models"
    # Link the big weights and copy only the file to damage: fast, and the originals stay untouched.
    for source in MODEL_DIR.rglob("*"):
        target = copy / source.relative_to(MODEL_DIR)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.relative_to(MODEL_DIR).as_posix() == damaged:
            target.parent.mkdir(parents=True, exist_ok=True)
            data = bytearray(source.read_bytes())
            data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    result = stenograph("models", "--model-dir", str(copy))
    assert result.returncode != 0
    bad = [row for row in result.stdout.splitlines() if "BAD" in row]
    assert len(bad) == 1 and str(copy / damaged) in bad[0] and "SHA-256" in bad[0], result.stdout
    assert "Traceback" not in result.stderr
