"""Soak: well-behaved and misbehaving clients against one server for minutes; does anything leak or degrade?

Well-behaved clients loop over short eval clips: batch requests and, when the server has it, real-time paced
WebSocket sessions ending in `finalize` + `close`. A rude client mixes in what flaky networks and broken
clients do: uploads cut off halfway, WebSockets dropped mid-stream without a close frame, malformed bodies
and forged tokens. `/metrics` is sampled throughout. At the end the server must be back to zero open
sessions, with its file descriptors back near where they started and its memory flat after warm-up, and
every well-behaved request must have succeeded with a sane transcript.

    python benchmarks/soak.py                       # 5 minutes, 3 batch + 2 WebSocket clients
    python benchmarks/soak.py --minutes 30 --batch-clients 6 --ws-clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets
from prometheus_client.parser import text_string_to_metric_families

from stenograph.audio import read_file
from stenograph.client import connect, stream_audio, to_wire, ws_url
from stenograph.wer import Clip, load_manifest, wer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import API_KEY, Server, machine

ROOT = Path(__file__).resolve().parent.parent
EVAL = Path(os.environ.get("STENOGRAPH_EVAL_DIR", ROOT.parent / "shared" / "eval"))
STREAM = {"model": "ink-whisper", "encoding": "pcm_s16le", "sample_rate": 16000, "language": "en"}
# A transcript this far off its reference means something broke, not that the model had a bad day.
SANE_WER = 0.5


@dataclass
class Tally:
    batch_latency: list[float] = field(default_factory=list)
    ttct: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@dataclass
class Sample:
    at: float
    rss_mb: float
    open_fds: float
    active_sessions: float
    queue_depth: float


def pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scrape(text: str) -> dict[str, float]:
    """Metric name (labels summed away) -> value."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] += sample.value
    return dict(out)


async def sampler(
    client: httpx.AsyncClient, samples: list[Sample], every: float, stop: asyncio.Event
) -> None:
    """Samples every `every` seconds, and once more when `stop` is set (the state after the run)."""
    start = time.monotonic()
    while True:
        m = scrape((await client.get("/metrics")).text)
        samples.append(
            Sample(
                at=round(time.monotonic() - start, 1),
                rss_mb=round(m.get("process_resident_memory_bytes", 0) / 2**20, 1),
                open_fds=m.get("process_open_fds", 0),
                active_sessions=m.get("stenograph_active_sessions", 0),
                queue_depth=m.get("stenograph_scheduler_queue_depth", 0),
            )
        )
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def batch_client(client: httpx.AsyncClient, clips: list[Clip], tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        clip = random.choice(clips)
        t0 = time.monotonic()
        response = await client.post(
            "/stt",
            headers={"X-API-Key": API_KEY},
            files={"file": (clip.path.name, clip.path.read_bytes())},
            data={"model": "ink-whisper", "language": "en"},
        )
        if response.status_code == 429:  # at the cap: a real client backs off and retries
            tally.outcomes["batch 429"] += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        tally.batch_latency.append(time.monotonic() - t0)
        text = response.json().get("text", "") if response.status_code == 200 else ""
        if response.status_code != 200 or wer(clip.text, text) > SANE_WER:
            tally.failures.append(f"batch {clip.id}: {response.status_code} {response.text[:200]}")
        tally.outcomes[f"batch {response.status_code}"] += 1


async def ws_client(
    url: str, clips: list[Clip], audio: dict[str, np.ndarray], tally: Tally, deadline: float
) -> None:
    while time.monotonic() < deadline:
        clip = random.choice(clips)
        try:
            ws = await connect(url, api_key=API_KEY, **STREAM)
        except websockets.InvalidStatus as exc:
            tally.outcomes[f"ws handshake {exc.response.status_code}"] += 1
            if exc.response.status_code == 429:
                await asyncio.sleep(1)
                continue
            tally.failures.append(f"ws handshake {exc.response.status_code}")
            continue
        async with ws:
            result = await stream_audio(ws, audio[clip.id], realtime=True, finalize_after=0.3)
        tally.ttct.extend(result.ttct)
        errors = [e.data for e in result.events if e.type == "error"]
        if result.close_code != 1000 or errors or wer(clip.text, result.transcript) > SANE_WER:
            tally.failures.append(
                f"ws {clip.id}: close {result.close_code} {errors[:1]} {result.transcript!r}"
            )
        tally.outcomes[f"ws close {result.close_code}"] += 1


async def cut_off(data: bytes) -> AsyncIterator[bytes]:
    yield data[: len(data) // 2]
    raise ConnectionAbortedError("the client vanished")


async def rude_client(
    client: httpx.AsyncClient,
    url: str,
    clips: list[Clip],
    audio: dict[str, np.ndarray],
    has_ws: bool,
    tally: Tally,
    deadline: float,
) -> None:
    forged = "eyJhbGciOiJIUzI1NiJ9.eyJncmFudHMiOnsic3R0Ijp0cnVlfSwiZXhwIjo5OTk5OTk5OTk5fQ.c2lnbmF0dXJl"
    while time.monotonic() < deadline:
        clip = random.choice(clips)
        kind = random.choice(["cut upload", "garbage", "forged token"] + ["dropped ws"] * has_ws)
        if kind == "cut upload":
            body = (
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                + clip.path.read_bytes()
            )
            headers = {"X-API-Key": API_KEY, "Content-Type": "multipart/form-data; boundary=b"}
            with contextlib.suppress(httpx.HTTPError, ConnectionAbortedError):
                await client.post("/stt", content=cut_off(body), headers=headers)
        elif kind == "garbage":
            status = (
                await client.post("/stt", content=os.urandom(4096), headers={"X-API-Key": API_KEY})
            ).status_code
            if status != 400:
                tally.failures.append(f"garbage got {status}")
        elif kind == "forged token":
            status = (await client.post("/stt", headers={"Authorization": f"Bearer {forged}"})).status_code
            if status != 401:
                tally.failures.append(f"forged token got {status}")
        else:
            try:
                ws = await connect(url, api_key=API_KEY, **STREAM)
            except websockets.InvalidStatus:
                continue
            samples = audio[clip.id]
            for i in range(0, samples.size // 2, 1600):
                await ws.send(to_wire(samples[i : i + 1600], "pcm_s16le", 16000))
            ws.transport.abort()  # no close frame: a dropped network
        tally.outcomes[f"rude {kind}"] += 1
        await asyncio.sleep(random.uniform(0.2, 1.0))


async def websocket_served(url: str) -> bool:
    """A refused handshake (401, no key sent) means the route exists; 404 or 403 that it does not."""
    try:
        async with websockets.connect(ws_url(url, "/stt/websocket", STREAM)):
            return True
    except websockets.InvalidStatus as exc:
        return exc.response.status_code == 401


async def soak(args: argparse.Namespace, url: str) -> dict[str, object]:
    clips = [
        c
        for c in load_manifest(EVAL)
        if c.subset == "librispeech_test_clean" and c.duration <= args.max_clip_seconds
    ]
    audio = {c.id: read_file(str(c.path)) for c in clips}
    tally, samples = Tally(), []
    deadline = time.monotonic() + args.minutes * 60
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        has_ws = await websocket_served(url)
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(sampler(client, samples, args.sample_every, stop))
        await asyncio.gather(
            *(batch_client(client, clips, tally, deadline) for _ in range(args.batch_clients)),
            *(ws_client(url, clips, audio, tally, deadline) for _ in range(args.ws_clients if has_ws else 0)),
            rude_client(client, url, clips, audio, has_ws, tally, deadline),
        )
        # Idle: every slot must come back, dropped connections included. Uploads cut off on a connection that
        # stays open are only given up by the server's upload idle timeout (30 s by default).
        idle_by = time.monotonic() + 60
        while scrape((await client.get("/metrics")).text).get("stenograph_active_sessions", 0) and (
            time.monotonic() < idle_by
        ):
            await asyncio.sleep(0.5)
        stop.set()
        await watcher
        errors = {
            s.labels["code"]: s.value
            for f in text_string_to_metric_families((await client.get("/metrics")).text)
            for s in f.samples
            if s.name == "stenograph_errors_total" and s.value
        }
    warm = [s for s in samples if s.at >= args.minutes * 60 * 0.2] or samples
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": os.getloadavg(),
        "args": vars(args),
        "websocket": has_ws,
        "outcomes": dict(tally.outcomes),
        "failures": tally.failures[:50],
        "failure_count": len(tally.failures),
        "batch_latency_s": {"p50": pctl(tally.batch_latency, 0.5), "p95": pctl(tally.batch_latency, 0.95)},
        "ttct_s": {"p50": pctl(tally.ttct, 0.5), "p95": pctl(tally.ttct, 0.95)},
        "server_errors": errors,
        "rss_mb": {"start": samples[0].rss_mb, "after_warmup": warm[0].rss_mb, "end": samples[-1].rss_mb},
        "rss_growth_after_warmup_mb": round(samples[-1].rss_mb - warm[0].rss_mb, 1),
        "open_fds": {
            "start": samples[0].open_fds,
            "max": max(s.open_fds for s in samples),
            "end": samples[-1].open_fds,
        },
        "active_sessions_at_end": samples[-1].active_sessions,
        "max_queue_depth": max(s.queue_depth for s in samples),
        "samples": [asdict(s) for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch-clients", type=int, default=3)
    parser.add_argument("--ws-clients", type=int, default=2)
    parser.add_argument("--max-clip-seconds", type=float, default=12.0)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--url", help="soak a running server (its keys must include the benchmark key)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    server = None if args.url else Server(ROOT / "models", workers=2, cpu_threads=1, beam_size=5)
    try:
        report = asyncio.run(soak(args, args.url or str(server.client.base_url).rstrip("/")))
    finally:
        if server:
            server.close()
    report["args"] = {k: str(v) for k, v in report["args"].items()}  # type: ignore[union-attr]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k not in {"samples", "machine", "args"}}
    print(json.dumps(summary, indent=2))
    print(f"written to {path}")
    leaked = report["active_sessions_at_end"] or report["open_fds"]["end"] > report["open_fds"]["start"] + 10  # type: ignore[index,operator]
    sys.exit(1 if report["failure_count"] or leaked else 0)


if __name__ == "__main__":
    main()
