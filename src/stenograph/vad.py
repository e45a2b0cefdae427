"""Silero VAD v6 on onnxruntime: speech probability per 32 ms frame, with per-stream recurrent state.

One InferenceSession is shared by every stream (onnxruntime sessions are safe to call from several threads);
each stream carries only its 2x1x128 state and the 64-sample context the model expects before each frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

FRAME = 512  # samples at 16 kHz = 32 ms
CONTEXT = 64
SPEECH_THRESHOLD = 0.5  # a frame at or above this probability is speech
QUIET_THRESHOLD = 0.35  # a frame below this is a pause, with some hysteresis below the speech line


class SileroVad:
    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(16000, dtype=np.int64)

    def stream(self) -> VadStream:
        return VadStream(self)

    def run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames: (batch, CONTEXT + FRAME) float32; state: (2, batch, 128). Returns (probs, new state)."""
        out, new_state = self._session.run(None, {"input": frames, "state": state, "sr": self._sr})
        return out[:, 0], new_state

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities for a whole clip (fresh state); trailing partial frame is zero-padded."""
        stream = self.stream()
        probs = stream.feed(samples)
        tail = stream.pending_samples
        if tail:
            probs = np.concatenate([probs, stream.feed(np.zeros(FRAME - tail, dtype=np.float32))])
        return probs


@dataclass
class VadStream:
    """Streaming state for one audio source; feed any number of samples, get one probability per frame."""

    vad: SileroVad
    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, dtype=np.float32))
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def pending_samples(self) -> int:
        return int(self._buffer.size)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._buffer, samples.astype(np.float32, copy=False)])
        n = buf.size // FRAME
        probs = np.empty(n, dtype=np.float32)
        for i in range(n):
            frame = buf[i * FRAME : (i + 1) * FRAME]
            x = np.concatenate([self.context, frame])[None, :]
            p, self.state = self.vad.run(x, self.state)
            probs[i] = p[0]
            self.context = frame[-CONTEXT:]
        self._buffer = buf[n * FRAME :]
        return probs


def speech_regions(
    probs: np.ndarray,
    threshold: float = SPEECH_THRESHOLD,
    min_silence_frames: int = 10,
    pad_frames: int = 6,
) -> list[tuple[int, int]]:
    """Frame-index spans of speech: hysteresis on the probability, short gaps bridged, edges padded."""
    regions: list[tuple[int, int]] = []
    start: int | None = None
    silent = 0
    for i, p in enumerate(probs):
        if p >= threshold:
            if start is None:
                start = i
            silent = 0
        elif start is not None:
            silent += 1
            if p < threshold - 0.15 and silent >= min_silence_frames:
                regions.append((start, i - silent + 1))
                start, silent = None, 0
    if start is not None:
        regions.append((start, len(probs) - silent))
    n = len(probs)
    return [(max(0, s - pad_frames), min(n, e + pad_frames)) for s, e in regions]


def quietest_cut(probs: np.ndarray, lo: int, hi: int, threshold: float = QUIET_THRESHOLD) -> int:
    """Frame index in [lo, hi) to cut a long stretch of audio: the middle of the longest quiet run.

    Cutting inside a pause keeps every word whole on one side of the seam; with no pause at all, the least
    speech-like frame is the best remaining choice.
    """
    window = probs[lo:hi]
    best_len, best_mid, run = 0, len(window) - 1, 0
    for i, quiet in enumerate(window < threshold):
        run = run + 1 if quiet else 0
        if run > best_len:
            best_len, best_mid = run, i - run // 2
    if best_len == 0:
        best_mid = int(np.argmin(window))
    return lo + best_mid
