"""Batch accuracy and speed: Stenograph's HTTP API next to plain faster-whisper, same clips, one run.

Both sides decode every eval clip with whisper-base int8, the same beam size, thread count and language. The
server is started here as a subprocess and reached over loopback HTTP, so its numbers include everything a
client pays for: upload, multipart parsing, container decoding, VAD chunking, scheduling and the JSON answer.
Each clip goes through both back to back, alternating which goes first, so load from other processes hits
both sides alike.

Two overheads are reported, both "server / faster-whisper - 1" over the same clips: wall-clock time (what a
client waits) and CPU time (the work done: the server process's user+system time from /proc, the plain
model's process time). On a shared machine the CPU-time figure is the steadier of the two.

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
import signal
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
# What each device runs by default: int8 is fastest on a CPU, float16 on a GPU.
COMPUTE_TYPE = {"cpu": "int8", "cuda": "float16"}


@dataclass(frozen=True)
class Run:
    text: str
    wall: float  # seconds
    cpu: float  # seconds of CPU time, all threads


@dataclass
class ClipResult:
    id: str
    subset: str
    language: str
    duration: float
    reference: str
    server_text: str
    plain_text: str
    server_wall: float
    plain_wall: float
    server_cpu: float
    plain_cpu: float


@dataclass
class Summary:
    name: str
    clips: int
    audio_seconds: float
    server_wer: float
    plain_wer: float
    server_speed: float  # x real time, wall clock
    plain_speed: float
    wall_overhead: float  # server wall time / plain wall time - 1
    cpu_overhead: float  # server CPU time / plain CPU time - 1


def summarize(name: str, results: list[ClipResult]) -> Summary:
    audio = sum(r.duration for r in results)
    server_wall, plain_wall = sum(r.server_wall for r in results), sum(r.plain_wall for r in results)
    server_cpu, plain_cpu = sum(r.server_cpu for r in results), sum(r.plain_cpu for r in results)
    return Summary(
        name=name,
        clips=len(results),
        audio_seconds=round(audio, 1),
        server_wer=round(corpus_wer([(r.reference, r.server_text) for r in results]), 4),
        plain_wer=round(corpus_wer([(r.reference, r.plain_text) for r in results]), 4),
        server_speed=round(audio / server_wall, 2),
        plain_speed=round(audio / plain_wall, 2),
        wall_overhead=round(server_wall / plain_wall - 1, 4),
        cpu_overhead=round(server_cpu / plain_cpu - 1, 4),
    )


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`stenograph serve` on a free loopback port, ready once uvicorn reports startup complete."""

    def __init__(
        self,
        model_dir: Path,
        workers: int,
        cpu_threads: int,
        beam_size: int,
        device: str = "cpu",
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [
            "--model-dir",
            str(model_dir),
            "--workers",
            str(workers),
            "--cpu-threads",
            str(cpu_threads),
        ]
        self.env = {
            **os.environ,
            "STENOGRAPH_API_KEYS": API_KEY,
            "STENOGRAPH_BEAM_SIZE": str(beam_size),
            "STENOGRAPH_DEVICE": device,
            "STENOGRAPH_COMPUTE_TYPE": COMPUTE_TYPE[device],
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stenograph", "serve", "--port", str(port), *self.args],
            env=self.env,
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
        headers = {"Authorization": f"Bearer {API_KEY}"}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=600)

    def transcribe(self, clip: Clip) -> Run:
        """One request; if something outside this script stopped the server, start it again and retry once."""
        try:
            return self._transcribe(clip)
        except (httpx.TransportError, FileNotFoundError):
            if self.process.poll() is None:
                raise
            tail = "".join(self.log[-5:])
            print(
                f"server exited with status {self.process.returncode}, restarting:\n{tail}", file=sys.stderr
            )
            self.restarts += 1
            self.client.close()
            self._start()
            return self._transcribe(clip)

    def _transcribe(self, clip: Clip) -> Run:
        data = clip.path.read_bytes()
        cpu, started = process_cpu_seconds(self.process.pid), time.perf_counter()
        response = self.client.post(
            "/stt",
            files={"file": (clip.path.name, data)},
            data={"model": "ink-whisper", "language": clip.language},
        )
        wall, cpu = time.perf_counter() - started, process_cpu_seconds(self.process.pid) - cpu
        response.raise_for_status()
        return Run(response.json()["text"], wall, cpu)

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def transcribe_plain(model: WhisperModel, clip: Clip, beam_size: int) -> Run:
    cpu, started = time.process_time(), time.perf_counter()
    segments, _ = model.transcribe(str(clip.path), language=clip.language, beam_size=beam_size)
    text = "".join(s.text for s in segments).strip()
    return Run(text, time.perf_counter() - started, time.process_time() - cpu)


def select(clips: list[Clip], subsets: list[str] | None, max_clips: int) -> list[Clip]:
    order = list(dict.fromkeys(c.subset for c in clips))
    chosen = []
    for subset in subsets or order:
        if subset not in order:
            sys.exit(f"unknown subset {subset!r}; choose from: {', '.join(order)}")
        in_subset = [c for c in clips if c.subset == subset]
        chosen += in_subset[:max_clips] if max_clips else in_subset
    return chosen


def table(rows: list[Summary]) -> str:
    header = (
        f"| {'subset':26} | clips | audio s | WER    | WER fw | speed  | fw     | wall ovh | CPU ovh |\n"
        f"|{'-' * 28}|------:|--------:|-------:|-------:|-------:|-------:|---------:|--------:|"
    )
    lines = [
        f"| {r.name:26} | {r.clips:5d} | {r.audio_seconds:7.1f} | {r.server_wer:6.2%} | {r.plain_wer:6.2%} "
        f"| {r.server_speed:5.1f}x | {r.plain_speed:5.1f}x "
        f"| {r.wall_overhead:+8.1%} | {r.cpu_overhead:+7.1%} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
        info["gpu"] = gpus.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


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
    parser.add_argument("--device", choices=sorted(COMPUTE_TYPE), default="cpu", help="both sides")
    parser.add_argument(
        "--workers", type=int, default=1, help="server model calls at once (1: same as plain)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "batch.json")
    args = parser.parse_args()

    subsets = args.subsets.split(",") if args.subsets else None
    clips = select(load_manifest(args.eval_dir), subsets, args.max_clips)
    model_dir = args.model_dir.resolve()
    plain = WhisperModel(
        str(model_dir / "whisper-base"),
        device=args.device,
        compute_type=COMPUTE_TYPE[args.device],
        cpu_threads=args.cpu_threads,
        local_files_only=True,
    )
    server = Server(model_dir, args.workers, args.cpu_threads, args.beam_size, args.device)
    # A plain `kill` must still stop the server subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    results: list[ClipResult] = []
    try:
        server.transcribe(clips[0])  # warm-up: first-call allocations are not what is measured
        transcribe_plain(plain, clips[0], args.beam_size)
        for i, clip in enumerate(clips):
            if i % 2 == 0:
                ours = server.transcribe(clip)
                theirs = transcribe_plain(plain, clip, args.beam_size)
            else:
                theirs = transcribe_plain(plain, clip, args.beam_size)
                ours = server.transcribe(clip)
            results.append(
                ClipResult(
                    clip.id, clip.subset, clip.language, clip.duration, clip.text, ours.text, theirs.text,
                    round(ours.wall, 4), round(theirs.wall, 4), round(ours.cpu, 4), round(theirs.cpu, 4),
                )
            )  # fmt: skip
            print(
                f"[{i + 1}/{len(clips)}] {clip.id}: {clip.duration:.1f} s audio; wall {ours.wall:.2f} s vs "
                f"{theirs.wall:.2f} s, CPU {ours.cpu:.2f} s vs {theirs.cpu:.2f} s",
                file=sys.stderr,
            )
    finally:
        server.close()
    load_after = os.getloadavg()

    names = list(dict.fromkeys(r.subset for r in results))
    rows = [summarize(name, [r for r in results if r.subset == name]) for name in names]
    scored = [r for r in results if r.subset not in SEPARATE_SUBSETS]
    if len(names) > 1 and scored:
        rows.append(summarize("all but " + ", ".join(SEPARATE_SUBSETS), scored))
    print(table(rows))
    print(
        f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after; beam {args.beam_size}, "
        f"{args.cpu_threads} thread(s) per model call, {args.workers} server worker(s)"
    )
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_before": load_before, "load_after": load_after},
        "settings": {
            "model": "whisper-base",
            "device": args.device,
            "compute_type": COMPUTE_TYPE[args.device],
            "beam_size": args.beam_size,
            "cpu_threads": args.cpu_threads,
            "server_workers": args.workers,
        },
        "server_restarts": server.restarts,
        "summary": [asdict(r) for r in rows],
        "clips": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
