"""Turn detection on `WS /stt/turns/websocket`: end-of-turn latency and false cut-offs, on real speech.

The server runs as a subprocess with default settings. Word timestamps for every clip come from our own
batch API (`POST /stt`, word granularity). Measured:

- Latency: complete LibriSpeech sentences, each with its natural ending and then 6 s of silence, streamed
  in real time in 100 ms chunks (`--chunk-ms`), as a microphone would deliver them (a chunk leaves when its
  last sample has been recorded). Latency is from the end of speech (`end_of_speech`) to the arrival of
  the turn's `turn.end`, and of its first `turn.eager_end` when there is one.
- False cut-offs: the same sentences with a 300-800 ms pause (`--pause-ms`) inserted at a word boundary in
  the middle (`--pauses` per sentence, at different places). A cut-off is a session with more turns than the
  same sentence without the pause. Turn decisions follow the audio, not the clock, so these sessions are sent
  as fast as the server takes them.
- Baseline: plain silence endpointing on the same Silero VAD (a turn ends after N ms below 0.5), on the same
  audio: its false cut-off rate, and its decision latency (audio time, before any transcription).
- Capacity (`--sweep`, instead of the above): N concurrent real-time sessions, each one user's side of a
  conversation (the sentences in turn, 2.5 s of silence after each while the agent replies, streams started
  at random offsets). Per N: `turn.end` and `turn.eager_end` latency after each sentence, the share of
  sentences whose turn ended before the next one began, WER, and the server's CPU time per stream.
- Comparison (`--compare VAR=A,B`, instead): the latency and pause sessions above, played to one server per
  value of the setting `VAR`, sentence by sentence in alternating order; per arm the summary, and the median
  per-sentence difference of each latency against the first arm.

`--ending trimmed` is the protocol of earlier results: each sentence cut 50 ms after Whisper's aligned end of
its last word, and latency measured from that word end. The alignment puts the end of the last word early (by
0.15 s at the median, up to 0.4 s), so that cut takes off the end of the last syllable, and Smart Turn hears
the clipped sentence as unfinished far more often than a whole one.

    python benchmarks/turns.py               # 20 clips (about 8 minutes)
    python benchmarks/turns.py --clips 5     # a quick look
    python benchmarks/turns.py --sweep 1,2,4,6,8 --out benchmarks/results/turns_sweep.json   # ~6 minutes
    python benchmarks/turns.py --compare STENOGRAPH_TURN_EARLY_SCORE=off,on --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stenograph.audio import SAMPLE_RATE, read_file
from stenograph.client import connect, pace, to_wire
from stenograph.vad import FRAME, SileroVad
from stenograph.wer import Clip, corpus_wer, load_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import API_KEY, COMPUTE_TYPE, Server, machine, process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
EVAL = Path(os.environ.get("STENOGRAPH_EVAL_DIR", ROOT.parent / "shared" / "eval"))
STREAM = {"model": "ink-2", "encoding": "pcm_s16le", "sample_rate": SAMPLE_RATE}
CHUNK = 0.1  # seconds of audio per message, as a microphone buffer delivers them (`--chunk-ms`)
LEAD_SILENCE = 0.3
TAIL_SILENCE = 6.0  # longer than the default end timeout's decay (0.8 x 5.6 s)
BASELINE_SILENCE_MS = (300, 500, 800)
REPLY_GAP = 2.5  # seconds of silence after each sentence in a capacity session: the agent's reply
TARGETS = {"end_p50": 0.400, "eager_end_p50": 0.250, "false_cutoff_rate": 0.10}


@dataclass
class LatencySession:
    clip: str
    turns: int
    end_latency: float | None  # seconds from the end of speech to the last turn.end
    eager_latency: float | None  # ... to the first turn.eager_end after the speech ended
    resumes: int  # turn.resume events: eager ends the speaker went on from
    transcript: str
    reference: str


@dataclass
class PauseSession:
    clip: str
    pause_at: float  # seconds into the clip (a word boundary)
    pause: float
    turns: int
    turns_without_pause: int
    cut_off: bool
    baseline_cut_off: dict[str, bool]


def word_times(server: Server, clip: Clip) -> list[tuple[float, float]]:
    response = server.client.post(
        "/stt",
        files={"file": (clip.path.name, clip.path.read_bytes())},
        data={"model": "ink-whisper", "language": "en", "timestamp_granularities[]": "word"},
    )
    response.raise_for_status()
    return [(w["start"], w["end"]) for w in response.json()["words"]]


async def run_session(
    base_url: str, audio: np.ndarray, realtime: bool, chunk: float = CHUNK
) -> tuple[list[tuple[float, dict]], float]:
    """Stream `audio` then `close`; returns (arrival time, event) pairs and the wall time of audio time 0."""
    ws = await connect(base_url, "/stt/turns/websocket", api_key=API_KEY, **STREAM)
    events: list[tuple[float, dict]] = []

    async def receive() -> None:
        async for raw in ws:
            events.append((time.monotonic(), json.loads(raw)))

    receiver = asyncio.ensure_future(receive())
    step = int(chunk * SAMPLE_RATE)
    pieces = [to_wire(audio[i : i + step], "pcm_s16le", SAMPLE_RATE) for i in range(0, audio.size, step)]
    # `pace` sends chunk i at start + i * chunk; a microphone sends it once recorded, a chunk later. So the
    # microphone's clock for audio time t reads start - chunk + t.
    origin = time.monotonic() - chunk
    async for piece in pace(pieces, chunk, realtime):
        await ws.send(piece)
    await ws.send(json.dumps({"type": "close"}))
    await receiver
    return events, origin


@dataclass
class SweepStage:
    streams: int
    sentences: int
    ended: int  # sentences whose turn ended within REPLY_GAP (before the user's next sentence)
    end_p50: float | None  # seconds from each sentence's end of speech to its turn.end
    end_p95: float | None
    eager_end_p50: float | None
    eager_end_p95: float | None
    cpu_per_stream: float  # server CPU seconds per second of wall time, per stream
    wer: float


def conversation(sentences: list[tuple[np.ndarray, float]], lead: float) -> tuple[np.ndarray, list[float]]:
    """One user's side of a conversation: `lead` s of silence, then each sentence followed by REPLY_GAP s of
    silence. Returns the audio and, per sentence, where its speech ends (seconds into the stream)."""
    parts, ends, t = [silence(lead)], [], lead
    for audio, speech_end in sentences:
        parts += [audio, silence(REPLY_GAP)]
        ends.append(t + speech_end)
        t += audio.size / SAMPLE_RATE + REPLY_GAP
    return np.concatenate(parts), ends


async def sweep_stage(
    server: Server,
    n: int,
    sentences: list[tuple[np.ndarray, float, str]],
    seconds: float,
    rng: random.Random,
    chunk: float,
) -> SweepStage:
    """`n` concurrent real-time conversations of about `seconds` each, every stream starting at a
    different sentence. A sentence counts as ended when a `turn.end` comes within REPLY_GAP of its end."""
    streams = []
    for i in range(n):
        picked, total, k = [], 0.0, i * len(sentences) // n
        while total < seconds:
            picked.append(sentences[k % len(sentences)])
            total += picked[-1][0].size / SAMPLE_RATE + REPLY_GAP
            k += 1
        audio, ends = conversation([(a, e) for a, e, _ in picked], rng.uniform(0.0, REPLY_GAP))
        streams.append((audio, ends, " ".join(text for _, _, text in picked)))
    cpu0, wall0 = process_cpu_seconds(server.process.pid), time.monotonic()
    runs = await asyncio.gather(
        *(run_session(base_url(server), audio, realtime=True, chunk=chunk) for audio, _, _ in streams)
    )
    cpu = (process_cpu_seconds(server.process.pid) - cpu0) / (time.monotonic() - wall0) / n
    end_lat: list[float] = []
    eager_lat: list[float] = []
    for (events, origin), (_, ends, _) in zip(runs, streams, strict=True):
        for speech_end in ends:
            lo = origin + speech_end
            for kind, out in (("turn.end", end_lat), ("turn.eager_end", eager_lat)):
                waits = [at - lo for at, e in events if e["type"] == kind and 0 <= at - lo < REPLY_GAP]
                out.extend(waits[:1])
    pairs = [
        (reference, "".join(turn_ends(events)))
        for (events, _), (_, _, reference) in zip(runs, streams, strict=True)
    ]
    return SweepStage(
        streams=n,
        sentences=sum(len(ends) for _, ends, _ in streams),
        ended=len(end_lat),
        end_p50=pct(end_lat, 50),
        end_p95=pct(end_lat, 95),
        eager_end_p50=pct(eager_lat, 50),
        eager_end_p95=pct(eager_lat, 95),
        cpu_per_stream=round(cpu, 3),
        wer=corpus_wer(pairs),
    )


def base_url(server: Server) -> str:
    return str(server.client.base_url).rstrip("/")


def turn_ends(events: list[tuple[float, dict]]) -> list[str]:
    return [e["transcript"] for _, e in events if e["type"] == "turn.end"]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def baseline_turns(vad: SileroVad, audio: np.ndarray, silence_ms: int) -> int:
    """Turns by plain silence endpointing: a turn ends after `silence_ms` of frames below 0.5."""
    need = round(silence_ms / (FRAME / SAMPLE_RATE * 1000))
    turns, in_turn, quiet = 0, False, 0
    for p in vad.speech_probabilities(audio):
        if p >= 0.5:
            quiet = 0
            if not in_turn:
                in_turn, turns = True, turns + 1
        elif in_turn:
            quiet += 1
            if quiet >= need:
                in_turn = False
    return turns


def baseline_latency(vad: SileroVad, audio: np.ndarray, speech_end: float, silence_ms: int) -> float | None:
    """Audio time from the end of speech to the baseline's decision."""
    need = round(silence_ms / (FRAME / SAMPLE_RATE * 1000))
    quiet = 0
    for i, p in enumerate(vad.speech_probabilities(audio)):
        t = (i + 1) * FRAME / SAMPLE_RATE
        quiet = quiet + 1 if p < 0.5 else 0
        if t > speech_end and quiet >= need:
            return t - speech_end
    return None


def end_of_speech(vad: SileroVad, audio: np.ndarray) -> float:
    """Where the speech in a clip ends, in seconds: the earlier of two estimates, so that no latency is
    flattered. Energy: the end of the last 10 ms frame louder than the clip's noise floor by a quarter of its
    range in dB (late when a breath or noise follows the speech). Silero: the end of the last frame at or
    above 0.5 (late by the model's hangover, about 80 ms on clean speech)."""
    hop = SAMPLE_RATE // 100
    frames = audio[: audio.size // hop * hop].reshape(-1, hop)
    level = 20 * np.log10(np.sqrt((frames**2).mean(axis=1)) + 1e-9)
    floor, peak = np.percentile(level, 10), np.percentile(level, 95)
    loud = np.flatnonzero(level > floor + 0.25 * (peak - floor))
    speech = np.flatnonzero(vad.speech_probabilities(audio) >= 0.5)
    return min((loud[-1] + 1) * hop, (speech[-1] + 1) * FRAME) / SAMPLE_RATE


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def pause_session(
    server: Server,
    vad: SileroVad,
    clip_id: str,
    sentence: np.ndarray,
    words: list[tuple[float, float]],
    k: int,
    gap: float,
    turns_without_pause: int,
    baseline_without_pause: dict[int, int],
) -> PauseSession:
    """The sentence with a pause of `gap` seconds after its word `k`."""
    at = (words[k][1] + words[k + 1][0]) / 2  # the middle of the gap between two words
    cut = int(at * SAMPLE_RATE)
    paused = np.concatenate(
        [silence(LEAD_SILENCE), sentence[:cut], silence(gap), sentence[cut:], silence(TAIL_SILENCE)]
    )
    events, _ = asyncio.run(run_session(base_url(server), paused, realtime=False))
    turns = len(turn_ends(events))
    return PauseSession(
        clip_id,
        round(at, 3),
        round(gap, 3),
        turns,
        turns_without_pause,
        turns > turns_without_pause,
        {str(ms): baseline_turns(vad, paused, ms) > baseline_without_pause[ms] for ms in BASELINE_SILENCE_MS},
    )


def header(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict[str, object]:
    """What a result file records about how it was made."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_before": load_before, "load_after": os.getloadavg()},
        "settings": f"whisper-base {COMPUTE_TYPE[args.device]} on {args.device} (ink-2), turn.update decodes "
        f"on {os.environ.get('STENOGRAPH_TURN_UPDATE_MODEL', 'whisper-tiny.en')}, 2 workers x 1 thread, "
        "turn 0.8/0.4/0.2/5600",
        # Settings changed through the environment (paths left out).
        "overrides": {
            k: v for k, v in os.environ.items() if k.startswith("STENOGRAPH_") and not k.endswith("_DIR")
        },
        "chunk_ms": args.chunk_ms,
        "pause_ms": list(args.pause_ms),
    }


def sweep(
    args: argparse.Namespace, clips: list[Clip], vad: SileroVad, server: Server, rng: random.Random
) -> None:
    load_before = os.getloadavg()
    sentences = []
    for clip in clips:
        audio = read_file(str(clip.path))
        sentences.append((audio, end_of_speech(vad, audio), clip.text))
    stages = []
    for n in (int(x) for x in args.sweep.split(",") if x.strip()):
        stage = sweep_stage(server, n, sentences, args.sweep_seconds, rng, args.chunk_ms / 1000)
        stages.append(asyncio.run(stage))
        print(json.dumps(asdict(stages[-1])), flush=True)
    report = {**header(args, load_before), "reply_gap_s": REPLY_GAP, "stages": [asdict(s) for s in stages]}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def sentence_audio(
    args: argparse.Namespace, vad: SileroVad, clip: Clip, words: list
) -> tuple[np.ndarray, float]:
    """The sentence as streamed (`--ending`) and where its speech ends, in seconds."""
    audio = read_file(str(clip.path))
    if args.ending == "natural":
        return audio, end_of_speech(vad, audio)
    speech_end = words[-1][1]
    return audio[: int((speech_end + 0.05) * SAMPLE_RATE)], speech_end


def streamed(sentence: np.ndarray) -> np.ndarray:
    """What a latency session sends: LEAD_SILENCE, the sentence, TAIL_SILENCE."""
    return np.concatenate([silence(LEAD_SILENCE), sentence, silence(TAIL_SILENCE)])


def bench_server(args: argparse.Namespace, env: dict[str, str] | None = None) -> Server:
    """The server every mode measures: the default model workers and threads, `--device`, `env` on top."""
    return Server(ROOT / "models", workers=2, cpu_threads=1, beam_size=5, device=args.device, env=env)


def pause_places(
    rng: random.Random, words: list, pauses: int, pause_ms: tuple[int, int]
) -> list[tuple[int, float]]:
    """`pauses` inserted pauses, as (word boundary, seconds): each at a different boundary in the middle of
    the sentence (not the first or last two words), each as long as drawn from the `pause_ms` range."""
    places = rng.sample(range(2, len(words) - 2), min(pauses, len(words) - 4))
    return [(k, rng.uniform(*pause_ms) / 1000) for k in places]


def latency_session(
    server: Server, clip: Clip, full: np.ndarray, speech_end: float, chunk: float
) -> LatencySession:
    """`full` (see `streamed`) in real time: when its turn ends after the end of speech."""
    events, origin = asyncio.run(run_session(base_url(server), full, realtime=True, chunk=chunk))
    end_wall = origin + LEAD_SILENCE + speech_end
    ends = [at - end_wall for at, e in events if e["type"] == "turn.end"]
    eagers = [at - end_wall for at, e in events if e["type"] == "turn.eager_end" and at >= end_wall]
    return LatencySession(
        clip.id,
        len(ends),
        ends[-1] if ends else None,
        eagers[0] if eagers else None,
        sum(e["type"] == "turn.resume" for _, e in events),
        "".join(turn_ends(events)),
        clip.text,
    )


def summarize(latency: list[LatencySession], pauses: list[PauseSession]) -> dict[str, object]:
    end_lat = [s.end_latency for s in latency if s.end_latency is not None]
    eager_lat = [s.eager_latency for s in latency if s.eager_latency is not None]
    return {
        "end_p50": pct(end_lat, 50),
        "end_p95": pct(end_lat, 95),
        "eager_end_p50": pct(eager_lat, 50),
        "eager_end_p95": pct(eager_lat, 95),
        "eager_end_sessions": len(eager_lat),
        "sessions": len(latency),
        "single_turn_sessions": sum(s.turns == 1 for s in latency),
        "resumes": sum(s.resumes for s in latency),
        "pause_sessions": len(pauses),
        "false_cutoff_rate": statistics.fmean(p.cut_off for p in pauses) if pauses else None,
        "wer": corpus_wer([(s.reference, s.transcript) for s in latency]),
    }


def measure(args: argparse.Namespace, clips: list[Clip], vad: SileroVad, rng: random.Random) -> None:
    server = bench_server(args)
    latency: list[LatencySession] = []
    pauses: list[PauseSession] = []
    baseline_lat: dict[str, list[float]] = {str(ms): [] for ms in BASELINE_SILENCE_MS}
    load_before = os.getloadavg()
    try:
        for clip in clips:
            words = word_times(server, clip)
            if len(words) < 6:
                continue
            sentence, speech_end = sentence_audio(args, vad, clip, words)
            full = streamed(sentence)
            latency.append(latency_session(server, clip, full, speech_end, args.chunk_ms / 1000))
            for ms in BASELINE_SILENCE_MS:
                lat = baseline_latency(vad, full, LEAD_SILENCE + speech_end, ms)
                if lat is not None:
                    baseline_lat[str(ms)].append(lat)
            baseline = {ms: baseline_turns(vad, full, ms) for ms in BASELINE_SILENCE_MS}
            turns = latency[-1].turns
            for k, gap in pause_places(rng, words, args.pauses, args.pause_ms):
                pauses.append(pause_session(server, vad, clip.id, sentence, words, k, gap, turns, baseline))
            print(
                f"{clip.id}: end {latency[-1].end_latency}, eager {latency[-1].eager_latency}, "
                f"turns {turns}; pauses -> {[p.turns for p in pauses[-args.pauses :]]} turns",
                flush=True,
            )
    finally:
        server.close()
    summary = {
        **summarize(latency, pauses),
        "baseline": {
            f"silence_{ms}ms": {
                "false_cutoff_rate": (
                    statistics.fmean(p.baseline_cut_off[str(ms)] for p in pauses) if pauses else None
                ),
                "decision_latency_p50": pct(baseline_lat[str(ms)], 50),
            }
            for ms in BASELINE_SILENCE_MS
        },
    }
    report = {
        **header(args, load_before),
        "ending": args.ending,
        "targets": TARGETS,
        "summary": summary,
        "latency_sessions": [asdict(s) for s in latency],
        "pause_sessions": [asdict(p) for p in pauses],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def compare(args: argparse.Namespace, clips: list[Clip], vad: SileroVad, rng: random.Random) -> None:
    """`--compare VAR=A,B`: one server per value, each sentence (and each paused copy, at the same place
    with the same pause) played to every server in turn, the order alternating from sentence to sentence,
    so that a difference between the arms is not the machine's load drifting between two runs."""
    var, _, values = args.compare.partition("=")
    arms = {f"{var}={v}": {var: v} for v in values.split(",")}
    servers = {name: bench_server(args, env) for name, env in arms.items()}
    latency: dict[str, list[LatencySession]] = {name: [] for name in arms}
    pauses: dict[str, list[PauseSession]] = {name: [] for name in arms}
    load_before = os.getloadavg()
    try:
        for i, clip in enumerate(clips):
            words = word_times(next(iter(servers.values())), clip)
            if len(words) < 6:
                continue
            sentence, speech_end = sentence_audio(args, vad, clip, words)
            full = streamed(sentence)
            baseline = {ms: baseline_turns(vad, full, ms) for ms in BASELINE_SILENCE_MS}
            places = pause_places(rng, words, args.pauses, args.pause_ms)
            for name in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                server = servers[name]
                latency[name].append(latency_session(server, clip, full, speech_end, args.chunk_ms / 1000))
                turns = latency[name][-1].turns
                for k, gap in places:
                    pause = pause_session(server, vad, clip.id, sentence, words, k, gap, turns, baseline)
                    pauses[name].append(pause)
            print(
                clip.id,
                "  ".join(f"{name}: end {latency[name][-1].end_latency}" for name in arms),
                flush=True,
            )
    finally:
        for server in servers.values():
            server.close()
    summaries = {name: summarize(latency[name], pauses[name]) for name in arms}
    first, *others = arms
    paired = {}
    for name in others:
        for key in ("end_latency", "eager_latency"):
            deltas = [
                getattr(b, key) - getattr(a, key)
                for a, b in zip(latency[first], latency[name], strict=True)
                if getattr(a, key) is not None and getattr(b, key) is not None
            ]
            paired[f"{name} - {first}, {key}, median"] = statistics.median(deltas) if deltas else None
    report = {
        **header(args, load_before),
        "ending": args.ending,
        "compare": arms,
        "summaries": summaries,
        "paired": paired,
        "latency_sessions": {name: [asdict(s) for s in latency[name]] for name in arms},
        "pause_sessions": {name: [asdict(p) for p in pauses[name]] for name in arms},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summaries": summaries, "paired": paired}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pauses", type=int, default=3, help="pause sessions per sentence")
    parser.add_argument("--ending", choices=("natural", "trimmed"), default="natural")
    parser.add_argument(
        "--pause-ms",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(300, 800),
        help="range of the inserted pauses, e.g. 1000,2000 for thinking pauses (default 300,800)",
    )
    parser.add_argument("--chunk-ms", type=int, default=int(CHUNK * 1000), help="audio per message")
    parser.add_argument("--device", choices=sorted(COMPUTE_TYPE), default="cpu")
    parser.add_argument("--sweep", default="", help="concurrent sessions, e.g. 1,2,4,8 (capacity only)")
    parser.add_argument("--sweep-seconds", type=float, default=60.0, help="audio per session per sweep step")
    parser.add_argument(
        "--compare", default="", help="interleaved A/B of a setting, e.g. STENOGRAPH_TURN_EARLY_SCORE=off,on"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "turns.json"))
    args = parser.parse_args()
    clips = [
        c
        for c in load_manifest(EVAL)
        if c.subset in ("librispeech_test_clean", "librispeech_test_other") and 3.0 <= c.duration <= 12.0
    ][: args.clips]
    rng = random.Random(args.seed)
    vad = SileroVad(ROOT / "models" / "silero_vad.onnx")
    if args.compare:
        compare(args, clips, vad, rng)
    elif args.sweep:
        server = bench_server(args)
        try:
            sweep(args, clips, vad, server, rng)
        finally:
            server.close()
    else:
        measure(args, clips, vad, rng)


if __name__ == "__main__":
    main()
