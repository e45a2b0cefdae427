"""Streaming latency, accuracy and capacity of `WS /stt/websocket`, measured the way a live client sees it.

The server is started here as a subprocess (default settings: whisper-base int8, 2 workers of 1 thread) and
every session goes over loopback through `stenograph.client`, paced in real time in 100 ms frames. Measured:

- TTCT (time to complete transcript): from sending `finalize` to receiving `flush_done`, by when every final
  for the audio has arrived. `finalize` goes 0, 100 or 300 ms after the end of the speech, with the silence a
  live microphone keeps sending in between (the speculative final starts on that silence).
- First interim: from the speech onset (the first word's start time in the session's finals) to the arrival
  of the first interim with text.
- Streaming WER (the finals) next to batch WER (`POST /stt`) on the same clips.
- Capacity: N concurrent real-time streams, each a sequence of push-to-talk sessions (clip, 300 ms, finalize),
  starts staggered; TTCT p50/p95 and the server's CPU time (utime + stime from /proc) / wall time / N.

    python benchmarks/streaming.py                          # 8 clips, sweep 1,2,4,8,16 (about 10 minutes)
    python benchmarks/streaming.py --clips 3 --sweep 1,8    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from stenograph.audio import read_file
from stenograph.client import Event, connect, stream_audio
from stenograph.wer import Clip, corpus_wer, load_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test suite's server launcher
sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import machine, process_cpu_seconds

from tests.conftest import API_KEY, EVAL_DIR, LiveServer, start_server, stop_server

RESULTS = Path(__file__).resolve().parent / "results"
STREAM = {"model": "ink-whisper", "encoding": "pcm_s16le", "sample_rate": 16000, "language": "en"}
DELAYS = (0.0, 0.1, 0.3)
SWEEP_DELAY = 0.3
TARGETS = {
    "ttct_p50_at_300ms": 0.050,
    "ttct_p95_at_300ms": 0.150,
    "ttct_p50_at_0ms": 0.300,
    "wer_gap_points": 0.5,
    "streams_with_p95_under_500ms": 8,
}


@dataclass
class Session:
    clip: str
    delay: float
    ttct: float
    first_interim: float | None  # seconds from speech onset to the first interim with text
    interims: int
    transcript: str
    reference: str
    close_code: int | None


@dataclass
class Stage:
    streams: int
    sessions: int
    wall_s: float
    ttct_p50: float
    ttct_p95: float
    ttct_max: float
    cpu_per_stream: float  # server CPU seconds per wall second, per stream (1.0 = one core)
    final_decodes_per_session: float  # > 1: speculative finals redone because speech resumed
    model_seconds: dict[str, float]  # time the model threads spent, by job priority
    wer: float
    failures: int
    ttct: list[float]


def pctl(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (numpy's default, as in the plot's boxes); NaN for no values."""
    return float(np.percentile(values, q * 100)) if values else float("nan")


async def model_work(url: str) -> Counter[str]:
    """Model calls and model-thread seconds by job priority, from the server's /metrics counters."""
    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    work: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stenograph_model_call_seconds_sum":
                work[sample.labels["priority"] + "_seconds"] += sample.value
            elif sample.name == "stenograph_model_call_seconds_count":
                work[sample.labels["priority"] + "_calls"] += sample.value
    return work


async def wait_until_serving(url: str) -> None:
    """The process logs startup before its socket listens; wait for an answer, not for a log line."""
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(200):
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"server at {url} never answered /healthz")


async def one_session(url: str, clip: Clip, audio: np.ndarray, delay: float) -> Session:
    ws = await connect(url, api_key=API_KEY, **STREAM)
    first_interim: list[float] = []

    def on_event(event: Event) -> None:
        if event.type == "transcript" and not event.data["is_final"] and event.data["text"]:
            first_interim.append(event.at)

    started = time.monotonic()  # the first frame goes out now; frame i at started + i * 0.1 s
    async with ws:
        result = await stream_audio(ws, audio, realtime=True, finalize_after=delay, on_event=on_event)
    words = [w for f in result.finals for w in f["words"]]
    onset = started + words[0]["start"] if words else None
    return Session(
        clip=clip.id,
        delay=delay,
        ttct=result.ttct[0] if result.ttct else float("nan"),
        first_interim=first_interim[0] - onset if first_interim and onset is not None else None,
        interims=sum(1 for e in result.events if e.type == "transcript" and not e.data["is_final"]),
        transcript=result.transcript,
        reference=clip.text,
        close_code=result.close_code,
    )


async def latency(url: str, clips: list[Clip], audio: dict[str, np.ndarray]) -> list[Session]:
    sessions = []
    for delay in DELAYS:
        for clip in clips:
            s = await one_session(url, clip, audio[clip.id], delay)
            sessions.append(s)
            print(
                f"  finalize +{delay * 1000:3.0f} ms  {clip.id}: TTCT {s.ttct * 1000:6.0f} ms, first interim "
                f"{'-' if s.first_interim is None else f'{s.first_interim * 1000:.0f} ms'}",
                file=sys.stderr,
            )
    return sessions


async def batch_texts(url: str, clips: list[Clip]) -> dict[str, str]:
    texts = {}
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
    ) as client:
        for clip in clips:
            response = await client.post(
                "/stt",
                files={"file": (clip.path.name, clip.path.read_bytes())},
                data={"model": "ink-whisper", "language": "en"},
            )
            response.raise_for_status()
            texts[clip.id] = response.json()["text"]
    return texts


async def stream_loop(
    url: str, index: int, clips: list[Clip], audio: dict[str, np.ndarray], seconds: float
) -> list[Session]:
    """One live stream: push-to-talk sessions back to back until `seconds` of audio have been sent."""
    await asyncio.sleep(index * 0.37 % 2.0)  # stagger, so finalizes do not all land in the same instant
    sessions, sent, i = [], 0.0, index
    while sent < seconds:
        clip = clips[i % len(clips)]
        sessions.append(await one_session(url, clip, audio[clip.id], SWEEP_DELAY))
        sent += clip.duration + SWEEP_DELAY
        i += 1
    return sessions


async def capacity(
    url: str, pid: int, n: int, clips: list[Clip], audio: dict[str, np.ndarray], seconds: float
) -> Stage:
    work0, cpu0, wall0 = await model_work(url), process_cpu_seconds(pid), time.monotonic()
    runs = await asyncio.gather(*(stream_loop(url, i, clips, audio, seconds) for i in range(n)))
    wall = time.monotonic() - wall0
    cpu = process_cpu_seconds(pid) - cpu0
    work = await model_work(url)
    work.subtract(work0)
    sessions = [s for run in runs for s in run]
    ttct = [s.ttct for s in sessions if s.ttct == s.ttct]
    return Stage(
        streams=n,
        sessions=len(sessions),
        wall_s=round(wall, 1),
        ttct_p50=round(pctl(ttct, 0.5), 4),
        ttct_p95=round(pctl(ttct, 0.95), 4),
        ttct_max=round(max(ttct, default=float("nan")), 4),
        cpu_per_stream=round(cpu / wall / n, 3),
        final_decodes_per_session=round(work["final_calls"] / max(1, len(sessions)), 2),
        model_seconds={k: round(work[f"{k}_seconds"], 1) for k in ("final", "interim", "batch")},
        wer=round(corpus_wer([(s.reference, s.transcript) for s in sessions]), 4),
        failures=sum(1 for s in sessions if s.close_code != 1000 or s.ttct != s.ttct),
        ttct=[round(t, 4) for t in ttct],
    )


@dataclass
class DelayRow:
    finalize_after_ms: int
    sessions: int
    ttct_p50: float
    ttct_p95: float
    ttct_mean: float
    first_interim_p50: float | None
    first_interim_p95: float | None
    stream_wer: float
    batch_wer: float


def summarize(sessions: list[Session], batch: dict[str, str]) -> list[DelayRow]:
    rows = []
    for delay in DELAYS:
        at = [s for s in sessions if s.delay == delay]
        ttct = [s.ttct for s in at]
        interim = [s.first_interim for s in at if s.first_interim is not None]
        rows.append(
            DelayRow(
                finalize_after_ms=round(delay * 1000),
                sessions=len(at),
                ttct_p50=round(pctl(ttct, 0.5), 4),
                ttct_p95=round(pctl(ttct, 0.95), 4),
                ttct_mean=round(statistics.fmean(ttct), 4),
                first_interim_p50=round(pctl(interim, 0.5), 4) if interim else None,
                first_interim_p95=round(pctl(interim, 0.95), 4) if interim else None,
                stream_wer=round(corpus_wer([(s.reference, s.transcript) for s in at]), 4),
                batch_wer=round(corpus_wer([(s.reference, batch[s.clip]) for s in at]), 4),
            )
        )
    return rows


def verdicts(rows: list[DelayRow], stages: list[Stage]) -> dict[str, dict[str, float | bool]]:
    by_delay = {r.finalize_after_ms: r for r in rows}
    values: dict[str, float] = {}
    if 300 in by_delay:
        values["ttct_p50_at_300ms"] = by_delay[300].ttct_p50
        values["ttct_p95_at_300ms"] = by_delay[300].ttct_p95
    if 0 in by_delay:
        values["ttct_p50_at_0ms"] = by_delay[0].ttct_p50
    values["wer_gap_points"] = round(max(abs(r.stream_wer - r.batch_wer) * 100 for r in rows), 2)
    if stages:
        values["streams_with_p95_under_500ms"] = max(
            (s.streams for s in stages if s.ttct_p95 <= 0.5 and not s.failures), default=0
        )
    at_least = {"streams_with_p95_under_500ms"}
    return {
        name: {
            "target": TARGETS[name],
            "value": value,
            "met": value >= TARGETS[name] if name in at_least else value <= TARGETS[name],
        }
        for name, value in values.items()
    }


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def print_report(
    rows: list[DelayRow], stages: list[Stage], checks: dict[str, dict[str, float | bool]]
) -> None:
    print(
        f"{'finalize after':>14} {'n':>3} {'TTCT p50':>9} {'p95':>6} {'1st interim p50':>16} {'p95':>6} "
        f"{'WER stream':>11} {'WER batch':>10}"
    )
    for r in rows:
        print(
            f"{r.finalize_after_ms:>11} ms {r.sessions:>3} {ms(r.ttct_p50):>6} ms {ms(r.ttct_p95):>6} "
            f"{ms(r.first_interim_p50):>13} ms {ms(r.first_interim_p95):>6} "
            f"{r.stream_wer:>11.2%} {r.batch_wer:>10.2%}"
        )
    if stages:
        print(
            f"\n{'streams':>7} {'sessions':>8} {'TTCT p50':>9} {'p95':>6} {'max':>6} {'CPU/stream':>10} "
            f"{'WER':>7} {'failed':>6} {'final decodes/session':>21} {'model s final/interim':>21}"
        )
        for s in stages:
            model = f"{s.model_seconds['final']:.0f} / {s.model_seconds['interim']:.0f}"
            print(
                f"{s.streams:>7} {s.sessions:>8} {ms(s.ttct_p50):>6} ms {ms(s.ttct_p95):>6} "
                f"{ms(s.ttct_max):>6} {s.cpu_per_stream:>10.1%} {s.wer:>7.2%} {s.failures:>6} "
                f"{s.final_decodes_per_session:>21.2f} {model:>21}"
            )
    print()
    for name, c in checks.items():
        print(f"{'met   ' if c['met'] else 'MISSED'} {name}: {c['value']} (target {c['target']})")


def plot(sessions: list[Session], stages: list[Stage], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    data = [[s.ttct * 1000 for s in sessions if s.delay == d] for d in DELAYS]
    left.boxplot(data, whis=(5, 95), showfliers=True)
    left.set_xticks(range(1, len(DELAYS) + 1), [f"+{d * 1000:.0f} ms" for d in DELAYS])
    left.set_xlabel("finalize sent after the end of speech")
    left.set_ylabel("TTCT (ms)")
    left.set_title("Time to complete transcript, 1 stream")
    left.grid(axis="y", alpha=0.3)
    if stages:
        n = [s.streams for s in stages]
        right.plot(n, [s.ttct_p50 * 1000 for s in stages], "o-", label="TTCT p50")
        right.plot(n, [s.ttct_p95 * 1000 for s in stages], "s-", label="TTCT p95")
        right.axhline(500, color="grey", linestyle="--", linewidth=1, label="500 ms")
        right.set_xscale("log", base=2)
        right.set_xticks(n, [str(x) for x in n])
        right.set_xlabel("concurrent real-time streams")
        right.set_ylabel("TTCT (ms), finalize +300 ms")
        cpu = right.twinx()
        cpu.bar(
            n,
            [s.cpu_per_stream * 100 for s in stages],
            width=[x * 0.25 for x in n],
            alpha=0.2,
            color="tab:green",
            label="server CPU per stream",
        )
        cpu.set_ylabel("server CPU per stream (% of a core)")
        lines, labels = right.get_legend_handles_labels()
        bars, bar_labels = cpu.get_legend_handles_labels()
        right.legend(lines + bars, labels + bar_labels, loc="upper left", fontsize=8)
        right.set_title("Capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace, server: LiveServer) -> dict[str, object]:
    await wait_until_serving(server.url)
    pool = [c for c in load_manifest(args.eval_dir) if c.subset == args.subset and c.duration <= 20]
    clips = pool[: args.clips]
    audio = {c.id: read_file(str(c.path)) for c in pool}
    await one_session(server.url, clips[0], audio[clips[0].id], 0.3)  # warm-up, not measured
    load = {"before": os.getloadavg()}
    print(f"latency: {len(clips)} clips x finalize after {DELAYS} s, real time", file=sys.stderr)
    work = await model_work(server.url)
    sessions = await latency(server.url, clips, audio)
    work = await model_work(server.url) - work
    print(
        f"single stream: {work['final_calls'] / len(sessions):.2f} final decodes per session, "
        f"{work['interim_calls'] / len(sessions):.2f} interim decodes per session",
        file=sys.stderr,
    )
    batch = await batch_texts(server.url, clips)
    rows = summarize(sessions, batch)
    load["after_latency"] = os.getloadavg()
    stages = []
    for n in args.sweep:
        print(f"capacity: {n} concurrent stream(s), {args.sweep_seconds:g} s of audio each", file=sys.stderr)
        stages.append(await capacity(server.url, server.process.pid, n, pool, audio, args.sweep_seconds))
        print(f"  {asdict(stages[-1]) | {'ttct': '...'}}", file=sys.stderr)
    load["after"] = os.getloadavg()
    checks = verdicts(rows, stages)
    print_report(rows, stages, checks)
    print(f"\nload average (1/5/15 min): before {load['before']}, after {load['after']}")
    plot(sessions, stages, args.output.with_suffix(".png"))
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average": load},
        "settings": {
            "model": "ink-whisper (whisper-base int8)",
            "server_workers": 2,
            "cpu_threads": 1,
            "subset": args.subset,
            "chunk_ms": 100,
            "sweep_finalize_after_s": SWEEP_DELAY,
            "sweep_seconds_per_stream": args.sweep_seconds,
        },
        "latency": [asdict(r) for r in rows],
        "latency_model_work": {k: round(v, 2) for k, v in work.items()},
        "capacity": [asdict(s) for s in stages],
        "targets": checks,
        "sessions": [asdict(s) for s in sessions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=8, help="clips for the latency and WER runs (default 8)")
    parser.add_argument("--subset", default="librispeech_test_clean")
    parser.add_argument("--sweep", default="1,2,4,8,16", help="concurrent streams to try; '' to skip")
    parser.add_argument("--sweep-seconds", type=float, default=30.0, help="audio per stream per sweep step")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--output", type=Path, default=RESULTS / "streaming.json")
    args = parser.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",") if n.strip()]
    if importlib.util.find_spec("matplotlib") is None:  # it plots last: fail before minutes of measuring
        parser.exit(2, "streaming.py plots with matplotlib: pip install -e '.[bench]' (make bench does)\n")
    server = start_server()  # the default settings, the models in ./models (or STENOGRAPH_MODEL_DIR)
    try:
        report = asyncio.run(run(args, server))
    finally:
        stop_server(server)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output} and {args.output.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
