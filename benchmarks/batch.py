"""Batch accuracy and speed: Stenograph's HTTP API next to plain faster-whisper, same clips, one run.

Both sides decode every eval clip with whisper-base int8, the same beam size, thread count and language. The
server is started here as a subprocess and reached over loopback HTTP, so its numbers include everything a
client pays for: upload, multipart parsing, container decoding, VAD chunking, scheduling and the JSON answer.
Each clip is run through both back to back, alternating which goes first, so load from other processes hits
both sides alike. The overhead is the server's total time over plain faster-whisper's, minus one.

    python benchmarks/batch.py                                   # the whole eval
    python benchmarks/batch.py --subsets librispeech_test_clean  # one subset
    python benchmarks/batch.py --max-clips 3                     # a quick look at every subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from faster_whisper import WhisperModel

from stenograph.wer import Clip, corpus_wer, load_manifest

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk_benchmark"
# Scored on its own: its references drop disfluencies that Whisper may or may not write (eval README).
SEPARATE_SUBSETS = ("mfa_spontaneous",)


@dataclass
class ClipResult:
    id: str
    subset: str
    language: str
    duration: float
    reference: str
    server_text: str
    plain_text: str
    server_seconds: float
    plain_seconds: float


@dataclass
class Summary:
    name: str
    clips: int
    audio_seconds: float
    server_wer: float
    plain_wer: float
    server_speed: float  # x real time
    plain_speed: float
    overhead: float  # server time / plain time - 1


def summarize(name: str, results: list[ClipResult]) -> Summary:
    audio = sum(r.duration for r in results)
    server = sum(r.server_seconds for r in results)
    plain = sum(r.plain_seconds for r in results)
    return Summary(
        name=name,
        clips=len(results),
        audio_seconds=round(audio, 1),
        server_wer=round(corpus_wer([(r.reference, r.server_text) for r in results]), 4),
        plain_wer=round(corpus_wer([(r.reference, r.plain_text) for r in results]), 4),
        server_speed=round(audio / server, 2),
        plain_speed=round(audio / plain, 2),
        overhead=round(server / plain - 1, 4),
    )


class Server:
    """`stenograph serve` on a free loopback port, ready once uvicorn reports startup complete."""

    def __init__(self, model_dir: Path, workers: int, cpu_threads: int, beam_size: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "STENOGRAPH_API_KEYS": API_KEY,
            "STENOGRAPH_BEAM_SIZE": str(beam_size),
            "STENOGRAPH_DEVICE": "cpu",
            "STENOGRAPH_COMPUTE_TYPE": "int8",
            "PYTHONUNBUFFERED": "1",
        }
        args = [
            "--port",
            str(port),
            "--model-dir",
            str(model_dir),
            "--workers",
            str(workers),
            "--cpu-threads",
            str(cpu_threads),
            "--log-level",
            "info",
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stenograph", "serve", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            if "Application startup complete" in line:
                break
        else:
            raise RuntimeError("server exited during startup:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.process.stdout or []), daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def run_server(client: httpx.Client, clip: Clip) -> tuple[str, float]:
    data = clip.path.read_bytes()
    started = time.perf_counter()
    response = client.post(
        "/stt",
        files={"file": (clip.path.name, data)},
        data={"model": "ink-whisper", "language": clip.language},
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json()["text"], elapsed


def run_plain(model: WhisperModel, clip: Clip, beam_size: int) -> tuple[str, float]:
    started = time.perf_counter()
    segments, _ = model.transcribe(str(clip.path), language=clip.language, beam_size=beam_size)
    text = "".join(s.text for s in segments).strip()
    return text, time.perf_counter() - started


def select(clips: list[Clip], subsets: list[str] | None, max_clips: int) -> list[Clip]:
    order = list(dict.fromkeys(c.subset for c in clips))
    chosen = []
    for subset in subsets or order:
        if subset not in order:
            sys.exit(f"unknown subset {subset!r}; choose from: {', '.join(order)}")
        in_subset = [c for c in clips if c.subset == subset]
        chosen += in_subset[:max_clips] if max_clips else in_subset
    return chosen


def print_table(rows: list[Summary]) -> None:
    header = (
        f"{'subset':28} {'clips':>5} {'audio s':>8} {'WER':>7} {'WER fw':>7} "
        f"{'speed':>7} {'fw':>7} {'overhead':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:28} {r.clips:5d} {r.audio_seconds:8.1f} {r.server_wer:7.2%} {r.plain_wer:7.2%} "
            f"{r.server_speed:6.1f}x {r.plain_speed:6.1f}x {r.overhead:+9.1%}"
        )


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subsets", help="comma-separated eval subsets (default: all)")
    parser.add_argument("--max-clips", type=int, default=0, help="clips per subset, 0 for all (default)")
    parser.add_argument("--eval-dir", type=Path, default=ROOT.parent / "shared" / "eval")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--cpu-threads", type=int, default=1, help="threads per model call, both sides")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server's concurrent model calls (1 = the same compute as plain faster-whisper)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "batch.json")
    args = parser.parse_args()

    clips = select(
        load_manifest(args.eval_dir), args.subsets.split(",") if args.subsets else None, args.max_clips
    )
    model_dir = args.model_dir.resolve()
    plain = WhisperModel(
        str(model_dir / "whisper-base"),
        device="cpu",
        compute_type="int8",
        cpu_threads=args.cpu_threads,
        local_files_only=True,
    )
    server = Server(model_dir, args.workers, args.cpu_threads, args.beam_size)
    load_before = os.getloadavg()
    results: list[ClipResult] = []
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600
        ) as client:
            run_server(client, clips[0])  # warm-up: first-call allocations are not what is measured
            run_plain(plain, clips[0], args.beam_size)
            for i, clip in enumerate(clips):
                if i % 2 == 0:
                    server_text, server_s = run_server(client, clip)
                    plain_text, plain_s = run_plain(plain, clip, args.beam_size)
                else:
                    plain_text, plain_s = run_plain(plain, clip, args.beam_size)
                    server_text, server_s = run_server(client, clip)
                results.append(
                    ClipResult(
                        clip.id,
                        clip.subset,
                        clip.language,
                        clip.duration,
                        clip.text,
                        server_text,
                        plain_text,
                        round(server_s, 4),
                        round(plain_s, 4),
                    )
                )
                print(
                    f"[{i + 1}/{len(clips)}] {clip.id}: {clip.duration:.1f} s audio, "
                    f"server {server_s:.2f} s, faster-whisper {plain_s:.2f} s",
                    file=sys.stderr,
                )
    finally:
        server.close()
    load_after = os.getloadavg()

    subsets = list(dict.fromkeys(r.subset for r in results))
    rows = [summarize(s, [r for r in results if r.subset == s]) for s in subsets]
    scored = [r for r in results if r.subset not in SEPARATE_SUBSETS]
    if scored and len(subsets) > 1:
        rows.append(summarize("all but " + ", ".join(SEPARATE_SUBSETS), scored))
    print_table(rows)
    print(
        f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"beam {args.beam_size}, {args.cpu_threads} thread(s) per model call, {args.workers} server worker(s)"
    )

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_before": load_before, "load_after": load_after},
        "settings": {
            "model": "whisper-base",
            "compute_type": "int8",
            "beam_size": args.beam_size,
            "cpu_threads": args.cpu_threads,
            "server_workers": args.workers,
        },
        "summary": [asdict(r) for r in rows],
        "clips": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
