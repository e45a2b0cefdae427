"""Short encoder window vs Whisper's fixed 30 s window, per model: latency and WER on the same clips.

This is the measurement behind `Recognizer.decode_utterance`: the encoder's cost grows with its input, and
for a few seconds of speech the 30 s window is mostly padding. Also measures whether batching several
streams' encoder passes into one call pays on this machine (it decides whether the scheduler batches).

    python benchmarks/decode_window.py [--clips 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from faster_whisper.transcribe import get_ctranslate2_storage

from stenograph.asr import Engine
from stenograph.audio import read_file
from stenograph.config import Settings
from stenograph.wer import corpus_wer, load_manifest

ROOT = Path(__file__).resolve().parent.parent
EVAL = Path(os.environ.get("STENOGRAPH_EVAL_DIR", ROOT.parent / "shared" / "eval"))


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def window_rows(model: str, threads: int, n_clips: int) -> list[dict[str, object]]:
    engine = Engine(Settings(model_dir=ROOT / "models", cpu_threads=threads, workers=1, ink2_model=model))
    rec = engine.recognizer("ink-2")
    clips = [
        c
        for c in load_manifest(EVAL)
        if c.subset in ("librispeech_test_clean", "librispeech_test_other") and c.duration < 15
    ][:n_clips]
    audio = [read_file(str(c.path)) for c in clips]
    rec.decode_utterance(audio[0], "en", 1)  # warm-up
    rows = []
    for mode in ("short window", "30 s window"):
        times, pairs = [], []
        for clip, samples in zip(clips, audio, strict=True):
            t0 = time.perf_counter()
            if mode == "short window":
                text = rec.decode_utterance(samples, "en", 1).text
            else:
                text = rec.transcribe(samples, "en", 1, word_timestamps=True).text
            times.append(time.perf_counter() - t0)
            pairs.append((clip.text, text))
        rows.append(
            {
                "model": model,
                "mode": mode,
                "clips": len(clips),
                "wer": round(corpus_wer(pairs), 4),
                "p50_s": round(statistics.median(times), 3),
                "p95_s": round(pctl(times, 0.95), 3),
            }
        )
        print(
            f"{model:16} {mode:13} WER {rows[-1]['wer']:.3f}  p50 {rows[-1]['p50_s']:.3f} s  "
            f"p95 {rows[-1]['p95_s']:.3f} s",
            flush=True,
        )
    engine.close()
    return rows


def batching_rows(threads: int) -> list[dict[str, object]]:
    engine = Engine(Settings(model_dir=ROOT / "models", cpu_threads=threads, workers=1))
    model = engine.recognizer("ink-whisper").model.model
    feats = np.random.default_rng(0).standard_normal((4, 80, 3000)).astype(np.float32) * 0.1
    rows = []
    for frames in (500, 1000, 3000):
        for batch in (2, 4):
            seq, bat = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                for i in range(batch):
                    model.encode(get_ctranslate2_storage(feats[i : i + 1, :, :frames]))
                seq.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.encode(get_ctranslate2_storage(np.ascontiguousarray(feats[:batch, :, :frames])))
                bat.append(time.perf_counter() - t0)
            speedup = statistics.median(seq) / statistics.median(bat)
            rows.append({"frames": frames, "batch": batch, "speedup": round(speedup, 2)})
            print(f"encoder batch of {batch} x {frames} frames: {speedup:.2f}x vs one by one", flush=True)
    engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = [r for m in ("whisper-base", "whisper-tiny.en") for r in window_rows(m, args.threads, args.clips)]
    result = {
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "threads": args.threads,
        "windows": rows,
        "encoder_batching": batching_rows(args.threads),
    }
    out = ROOT / "benchmarks" / "results" / "decode_window.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
