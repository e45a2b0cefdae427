"""Smart Turn v3.2 on onnxruntime: the probability that the speaker has finished their turn.

The model is a small Whisper-encoder classifier. It hears the last 8 s of 16 kHz audio (zero-padded at the
front when shorter, so the most recent sound always sits at the end of the window, where the model was
trained to look) as 80-bin log-mel features, 800 frames. The waveform is normalized to zero mean and unit
variance before the spectrogram, unlike Whisper ASR. faster-whisper's own `FeatureExtractor` computes the
same log-mel recipe (Slaney mel filters, periodic Hann, reflect-padded STFT, last frame dropped, 8-decade
clamp, (x + 4) / 4); fed the normalized window without its extra end padding, it matches the reference
features to within 7e-6 (float32 rounding), so we reuse it instead of keeping a second mel implementation.

The model reacts to prosody more than to words: a falling pitch on a complete sentence reads as "done", a
trailing "and..." as "not done". One session is shared by every stream; one intra-op thread per call, since
a call costs ~40 ms on one thread and the server runs many streams on few cores (docs/turn-detection-log.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

SAMPLE_RATE = 16000
WINDOW_SECONDS = 8
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
FRAMES = 800
NORMALIZE_EPS = 1e-7

_EXTRACTOR = FeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_SECONDS)


def turn_features(audio: np.ndarray) -> np.ndarray:
    """(80, 800) float32 features of the last 8 s of `audio` (16 kHz mono float)."""
    x = np.asarray(audio, dtype=np.float32)[-WINDOW_SAMPLES:]
    if x.size < WINDOW_SAMPLES:
        x = np.pad(x, (WINDOW_SAMPLES - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + NORMALIZE_EPS)
    return _EXTRACTOR(x, padding=0)[:, :FRAMES].astype(np.float32, copy=False)


class SmartTurn:
    def __init__(self, path: Path, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def probability(self, audio: np.ndarray) -> float:
        """Probability (0-1) that the turn is complete at the end of `audio`."""
        features = turn_features(audio)[None, :, :]
        (out,) = self._session.run(None, {"input_features": features})
        return float(np.asarray(out).reshape(-1)[0])
