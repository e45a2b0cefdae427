"""`stenograph stream FILE` against the live server: final text, TTCT, and clear errors (non-TTY output)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stenograph.wer import wer
from tests.conftest import API_KEY, pick


def stream(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stenograph", "stream", "--url", server.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "wire", [[], ["--encoding", "pcm_mulaw", "--sample-rate", "8000"]], ids=["default", "mulaw-8k"]
)
def test_stream_prints_final_text_and_ttct(server, clips, wire):
    clip = pick(clips, "librispeech_test_clean", 1)[0]
    done = stream(server, str(clip.path), "--api-key", API_KEY, *wire)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout, "no in-place updates when stdout is not a terminal"
    lines = done.stdout.splitlines()
    assert lines and all(line == line.strip() for line in lines)
    assert wer(clip.text, " ".join(lines)) < 0.15, done.stdout
    ttct = [line for line in done.stderr.splitlines() if line.startswith("TTCT ")]
    assert len(ttct) == 1 and ttct[0].split()[1].isdigit() and " ms " in ttct[0], done.stderr


def test_stream_reports_refused_key_and_bad_model(server, clips):
    clip = pick(clips, "librispeech_test_clean", 1)[0]
    refused = stream(server, str(clip.path), "--api-key", "sk_wrong")
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "Traceback" not in refused.stderr
    bad_model = stream(server, str(clip.path), "--api-key", API_KEY, "--model", "ink-nope")
    assert bad_model.returncode == 1 and "Traceback" not in bad_model.stderr
    assert "error: Invalid model:" in bad_model.stderr, bad_model.stderr
    assert bad_model.stdout == ""


def test_stream_rejects_a_file_that_is_not_audio(server, tmp_path):
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio at all")
    done = stream(server, str(junk), "--api-key", API_KEY)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {junk}:")
    assert "Traceback" not in done.stderr
