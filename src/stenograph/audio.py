"""Audio in: raw PCM in the six wire encodings, containers via PyAV, and resampling to 16 kHz mono float32.

Everything downstream (VAD, Whisper, smart-turn) works on 16 kHz float32 in [-1, 1], so this module is the
only place that knows about encodings, sample rates and file formats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import av
import numpy as np
import soxr

SAMPLE_RATE = 16000
MIN_INPUT_RATE = 8000
MAX_INPUT_RATE = 48000
# Containers may be sampled below the wire minimum (old 6 kHz voice files), but a header claiming less than
# this is broken or hostile: 1 Hz would turn a 32 KB upload into four and a half hours of audio to process.
MIN_FILE_RATE = 4000

ENCODINGS = ("pcm_s16le", "pcm_s32le", "pcm_f16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw")
_SAMPLE_WIDTH = {
    "pcm_s16le": 2,
    "pcm_s32le": 4,
    "pcm_f16le": 2,
    "pcm_f32le": 4,
    "pcm_mulaw": 1,
    "pcm_alaw": 1,
}


class AudioError(ValueError):
    """The bytes are not audio we can decode."""


def _mulaw_table() -> np.ndarray:
    # G.711 mu-law expansion: invert the bits, split sign/exponent/mantissa, undo the bias of 0x84.
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return (np.where(sign, -magnitude, magnitude) / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    # G.711 A-law expansion: even bits are inverted on the wire (xor 0x55).
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return (np.where(sign, magnitude, -magnitude) / 32768.0).astype(np.float32)


_MULAW = _mulaw_table()
_ALAW = _alaw_table()


def sample_width(encoding: str) -> int:
    return _SAMPLE_WIDTH[encoding]


def decode_pcm(data: bytes, encoding: str) -> np.ndarray:
    """Raw little-endian mono PCM -> float32 in [-1, 1]. `data` must hold whole samples."""
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == "pcm_s32le":
        return (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    if encoding == "pcm_f16le":
        return _finite(np.frombuffer(data, dtype="<f2").astype(np.float32))
    if encoding == "pcm_f32le":
        return _finite(np.frombuffer(data, dtype="<f4").astype(np.float32))
    if encoding == "pcm_mulaw":
        return _MULAW[np.frombuffer(data, dtype=np.uint8)]
    if encoding == "pcm_alaw":
        return _ALAW[np.frombuffer(data, dtype=np.uint8)]
    raise AudioError(f"unsupported encoding {encoding!r}")


def encode_pcm(samples: np.ndarray, encoding: str) -> bytes:
    """float32 -> wire encoding; the inverse of decode_pcm, used by the client and tests."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if encoding == "pcm_s16le":
        return (x * 32767.0).astype("<i2").tobytes()
    if encoding == "pcm_s32le":
        return (x.astype(np.float64) * 2147483647.0).astype("<i4").tobytes()
    if encoding == "pcm_f16le":
        return x.astype("<f2").tobytes()
    if encoding == "pcm_f32le":
        return x.astype("<f4").tobytes()
    if encoding in ("pcm_mulaw", "pcm_alaw"):
        table = _MULAW if encoding == "pcm_mulaw" else _ALAW
        # Nearest code by value: sort the expansion table once and search it.
        order = np.argsort(table)
        idx = np.searchsorted(table[order], x).clip(1, 255)
        left, right = table[order][idx - 1], table[order][idx]
        pick = np.where(np.abs(x - left) <= np.abs(right - x), idx - 1, idx)
        return order[pick].astype(np.uint8).tobytes()
    raise AudioError(f"unsupported encoding {encoding!r}")


class PcmDecoder:
    """Incremental decoder for one stream: keeps a partial sample across frames, resamples to 16 kHz.

    Clients may split frames anywhere (a 16-bit sample across two WebSocket messages), so the odd bytes are
    carried over; resampling keeps filter state between calls so chunk boundaries leave no clicks.
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        self.encoding = encoding
        self.width = sample_width(encoding)
        self.sample_rate = sample_rate
        self._carry = b""
        self._resampler = (
            None
            if sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        )

    def feed(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        usable = len(data) - len(data) % self.width
        self._carry = data[usable:]
        samples = decode_pcm(data[:usable], self.encoding)
        if self._resampler is None:
            return samples
        return self._resampler.resample_chunk(samples, last=False)

    def flush(self) -> np.ndarray:
        """Drain the resampler's delay line (call at the end of the stream or before a final decode)."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler.clear()  # a drained soxr stream refuses more input; audio may follow a finalize
        return tail


def iter_file(source: str | BinaryIO, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """Decode any container PyAV understands to 16 kHz mono float32 blocks, never holding the whole file.

    Raises AudioError for input with no decodable audio stream.
    """
    block = int(block_seconds * SAMPLE_RATE)
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise AudioError(f"could not read audio: {_short(exc)}") from exc
    with container:
        if not container.streams.audio:
            raise AudioError("the file contains no audio stream")
        stream = container.streams.audio[0]
        codec = stream.codec_context
        if codec is None:
            raise AudioError("the audio codec is not supported")
        if codec.sample_rate and codec.sample_rate < MIN_FILE_RATE:
            raise AudioError(f"sample rate {codec.sample_rate} Hz is below the minimum of {MIN_FILE_RATE} Hz")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[np.ndarray] = []
        pending_len = 0
        decoded_any = False
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = _finite(out.to_ndarray().reshape(-1))
                    pending.append(arr)
                    pending_len += arr.size
                    decoded_any = True
                while pending_len >= block:
                    joined = np.concatenate(pending)
                    yield joined[:block]
                    pending, pending_len = [joined[block:]], joined.size - block
            for out in resampler.resample(None):
                arr = _finite(out.to_ndarray().reshape(-1))
                pending.append(arr)
                pending_len += arr.size
        except (av.FFmpegError, ValueError) as exc:
            if not decoded_any:
                raise AudioError(f"could not decode audio: {_short(exc)}") from exc
            # A truncated tail after good audio: keep what decoded, as ffmpeg itself does.
        if not decoded_any:
            raise AudioError("the file contains no decodable audio")
        if pending_len:
            yield np.concatenate(pending)


def read_file(source: str | BinaryIO) -> np.ndarray:
    """Whole file as one array: for short clips in tests, benchmarks and the CLI."""
    blocks = list(iter_file(source))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def _finite(samples: np.ndarray) -> np.ndarray:
    """Float files can carry NaN, inf or values far outside [-1, 1]; the models expect neither."""
    return np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0).clip(-1.0, 1.0)


def _short(exc: Exception) -> str:
    """FFmpeg's own reason ("Invalid data found when processing input"), without errno and file noise."""
    text = (exc.strerror if isinstance(exc, av.FFmpegError) and exc.strerror else str(exc)).strip()
    return (text or type(exc).__name__).splitlines()[0][:200]
