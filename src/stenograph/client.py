"""A small async client for the streaming endpoints, shared by the CLI, the tests and the benchmarks.

It paces audio like a live source (or as fast as possible), timestamps every event on arrival, and measures
time-to-complete-transcript (TTCT): from sending `finalize` to receiving `flush_done`, by which time every
final for the flushed audio has arrived.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np
import soxr
import websockets
from websockets.asyncio.client import ClientConnection

from stenograph.audio import SAMPLE_RATE, encode_pcm


@dataclass
class Event:
    at: float  # time.monotonic() on arrival
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type"))


@dataclass
class StreamResult:
    events: list[Event] = field(default_factory=list)
    ttct: list[float] = field(default_factory=list)  # one per finalize
    close_code: int | None = None

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == "transcript" and e.data.get("is_final")]

    @property
    def transcript(self) -> str:
        """The session transcript: all final deltas concatenated exactly as sent."""
        return "".join(f["text"] for f in self.finals)


def ws_url(base_url: str, path: str, params: dict[str, Any]) -> str:
    base = base_url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    query = urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
    return f"{base}{path}?{query}"


async def connect(
    base_url: str,
    path: str = "/stt/websocket",
    api_key: str | None = None,
    **params: Any,
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return await websockets.connect(
        ws_url(base_url, path, params), additional_headers=headers, max_size=1 << 22
    )


def to_wire(samples: np.ndarray, encoding: str, sample_rate: int) -> bytes:
    """16 kHz float32 -> the wire encoding at `sample_rate`."""
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, SAMPLE_RATE, sample_rate, quality="HQ").astype(np.float32)
    return encode_pcm(samples, encoding)


async def pace(chunks: list[bytes], chunk_seconds: float, realtime: bool) -> AsyncIterator[bytes]:
    """Yield chunks on a real-time schedule anchored at the start (no drift from per-chunk sleeps)."""
    start = time.monotonic()
    for i, chunk in enumerate(chunks):
        if realtime:
            delay = start + i * chunk_seconds - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield chunk


async def stream_audio(
    ws: ClientConnection,
    samples: np.ndarray,
    encoding: str = "pcm_s16le",
    sample_rate: int = SAMPLE_RATE,
    realtime: bool = True,
    chunk_seconds: float = 0.1,
    finalize_after: float | None = 0.0,
    end: str = "close",
    on_event: Callable[[Event], None] | None = None,
) -> StreamResult:
    """Send `samples` (16 kHz float32) in `chunk_seconds` pieces, then, unless `finalize_after` is None, that
    many seconds of silence followed by `finalize`; then the end command, and wait for the server to close.
    """
    result = StreamResult()
    flushes: asyncio.Queue[float | None] = asyncio.Queue()  # None: the socket closed first

    async def receive() -> None:
        try:
            async for raw in ws:
                event = Event(time.monotonic(), json.loads(raw))
                result.events.append(event)
                if event.type == "flush_done":
                    flushes.put_nowait(event.at)
                if on_event:
                    on_event(event)
        except websockets.ConnectionClosed:
            pass
        result.close_code = ws.close_code
        flushes.put_nowait(None)

    receiver = asyncio.ensure_future(receive())
    chunk = int(chunk_seconds * SAMPLE_RATE)
    pieces = [to_wire(samples[i : i + chunk], encoding, sample_rate) for i in range(0, samples.size, chunk)]
    async for piece in pace(pieces, chunk_seconds, realtime):
        await ws.send(piece)
    if finalize_after is not None:
        # A live microphone keeps sending silence after the speaker stops; `finalize` comes on top of it.
        silence = to_wire(np.zeros(chunk, dtype=np.float32), encoding, sample_rate)
        n_silent = round(finalize_after / chunk_seconds)
        async for piece in pace([silence] * n_silent, chunk_seconds, realtime):
            await ws.send(piece)
        if realtime and n_silent:
            await asyncio.sleep(chunk_seconds)
        t0 = time.monotonic()
        await ws.send("finalize")
        flushed = await flushes.get()
        if flushed is None:  # closed without acknowledging (after an error event): nothing more to wait for
            await receiver
            return result
        result.ttct.append(flushed - t0)
    await ws.send(end)
    await receiver
    return result
