"""Shared fixtures: the real server in a subprocess on a loopback port, eval clips, WER helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stenograph.audio import SAMPLE_RATE, encode_pcm, read_file
from stenograph.vad import SileroVad, speech_regions
from stenograph.wer import Clip, load_manifest

ROOT = Path(__file__).resolve().parent.parent
EVAL_DIR = Path(os.environ.get("STENOGRAPH_EVAL_DIR", ROOT.parent / "shared" / "eval"))
MODEL_DIR = Path(os.environ.get("STENOGRAPH_MODEL_DIR", ROOT / "models")).resolve()
API_KEY = "sk_test_primary"
SECOND_KEY = "sk_test_secondary"


@dataclass
class LiveServer:
    url: str
    ws_url: str
    process: subprocess.Popen[str]
    log: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(extra_env: dict[str, str] | None = None, args: list[str] | None = None) -> LiveServer:
    """Start `stenograph serve` and return once uvicorn reports startup complete (read from its log)."""
    port = free_port()
    env = {
        **os.environ,
        "STENOGRAPH_MODEL_DIR": str(MODEL_DIR),
        "STENOGRAPH_API_KEYS": f"{API_KEY},{SECOND_KEY}",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "stenograph", "serve", "--port", str(port), *(args or [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        if "Uvicorn running on" in line:  # logged once the socket listens (startup completes before)
            break
    else:
        raise RuntimeError("server exited during startup:\n" + "".join(log))
    # Keep draining the log so the pipe never fills and blocks the server.
    import threading

    threading.Thread(target=lambda: log.extend(proc.stdout or []), daemon=True).start()
    return LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", proc, log)


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    # The live-captions page mints its own `stt` tokens (keyed servers need this opt-in for that).
    srv = start_server({"STENOGRAPH_APP_TOKENS": "true"})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def clips() -> list[Clip]:
    if not (EVAL_DIR / "manifest.jsonl").is_file():
        pytest.fail(f"eval data not found at {EVAL_DIR} (set STENOGRAPH_EVAL_DIR)")
    return load_manifest(EVAL_DIR)


def pick(clips: list[Clip], subset: str, n: int, max_duration: float = 20.0) -> list[Clip]:
    chosen = [c for c in clips if c.subset == subset and c.duration <= max_duration]
    return chosen[:n]


@pytest.fixture(scope="session")
def vad() -> SileroVad:
    return SileroVad(MODEL_DIR / "silero_vad.onnx")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def one_phrase_clips(clips: list[Clip], vad: SileroVad, n: int) -> list[tuple[Clip, np.ndarray]]:
    """Sentences spoken without an inner pause (one VAD region), so each is exactly one turn."""
    chosen = []
    for clip in pick(clips, "librispeech_test_clean", 25, max_duration=9.0):
        audio = read_file(str(clip.path))
        if len(speech_regions(vad.speech_probabilities(audio), min_silence_frames=8)) == 1:
            chosen.append((clip, audio))
        if len(chosen) == n:
            break
    assert len(chosen) == n, "not enough single-phrase clips in the eval set"
    return chosen


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """16-bit mono WAV from float samples in [-1, 1], for fixtures built from eval clips or synthesized."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(encode_pcm(samples, "pcm_s16le"))
    return path
