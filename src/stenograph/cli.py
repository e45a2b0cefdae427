"""`stenograph serve | transcribe | models | stream`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from stenograph import __version__
from stenograph.config import Settings
from stenograph.models import CATALOGUE, ModelError, verify


def _settings(args: argparse.Namespace) -> Settings:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    return settings.with_overrides(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        model_dir=Path(args.model_dir) if getattr(args, "model_dir", None) else None,
        device=getattr(args, "device", None),
        compute_type=getattr(args, "compute_type", None),
        workers=getattr(args, "workers", None),
        cpu_threads=getattr(args, "cpu_threads", None),
        ink2_model=getattr(args, "ink2_model", None),
        allow_open=True if getattr(args, "allow_open", False) else None,
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from stenograph import logs
    from stenograph.app import create_app
    from stenograph.shutdown import serve

    settings = _settings(args)
    if not settings.api_keys:
        if not settings.is_loopback and not settings.allow_open:
            sys.exit(
                f"error: refusing to listen on {settings.host} without API keys. Set STENOGRAPH_API_KEYS, "
                "or pass --allow-open to serve everyone on the network."
            )
        print(
            f"stenograph: no API keys configured, serving without authentication on {settings.host}",
            file=sys.stderr,
        )
    try:
        logs.configure(settings.log_format, args.log_level)  # first, so app start-up logs are in the format
        serve(create_app(settings), settings, args.log_level)
    except ValueError as exc:  # a setting the app refuses (e.g. a malformed key or log format)
        sys.exit(f"error: {exc}")


def cmd_models(args: argparse.Namespace) -> None:
    settings = _settings(args)
    failed = False
    for name, entry in CATALOGUE.items():
        try:
            path = verify(entry, settings.model_dir)
            status = "ok"
        except ModelError as exc:
            path, status, failed = entry.path(settings.model_dir), f"BAD: {exc}", True
        print(f"{name:18} {entry.kind:8} {status:4}  {path}  ({entry.description})")
    for name, path in settings.extra_models.items():
        ok = (Path(path) / "model.bin").is_file()
        failed |= not ok
        status = "ok" if ok else "BAD: no model.bin"
        print(f"{name:18} {'whisper':8} {status:4}  {path}  (extra, not hash-pinned)")
    print(f"\nink-whisper, ink-whisper-2025-06-04 -> whisper-base; ink-2 -> {settings.ink2_model}")
    if failed:
        sys.exit(1)


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitle_cues(words: list, max_words: int = 10, max_gap: float = 0.8) -> list[tuple[float, float, str]]:
    """Group words into caption cues: break on long pauses, sentence ends, or after `max_words`."""
    cues: list[tuple[float, float, str]] = []
    current: list = []
    for w in words:
        if current and (
            len(current) >= max_words or w.start - current[-1].end > max_gap or current[-1].word[-1] in ".?!"
        ):
            cues.append((current[0].start, current[-1].end, " ".join(x.word for x in current)))
            current = []
        current.append(w)
    if current:
        cues.append((current[0].start, current[-1].end, " ".join(x.word for x in current)))
    return cues


def format_result(result, fmt: str, language: str, request_id: str = "local") -> str:
    from stenograph import protocol

    if fmt == "text":
        return result.text
    if fmt == "json":
        return json.dumps(
            protocol.batch_response(result.text, language, result.duration, request_id, result.words),
            ensure_ascii=False,
            indent=2,
        )
    cues = subtitle_cues(result.words)
    if fmt == "srt":
        return "\n".join(
            f"{i}\n{_timestamp(s, ',')} --> {_timestamp(e, ',')}\n{text}\n"
            for i, (s, e, text) in enumerate(cues, 1)
        )
    return "WEBVTT\n\n" + "\n".join(
        f"{_timestamp(s, '.')} --> {_timestamp(e, '.')}\n{text}\n" for s, e, text in cues
    )


def cmd_transcribe(args: argparse.Namespace) -> None:
    from stenograph import protocol
    from stenograph.asr import Engine
    from stenograph.audio import AudioError, iter_file
    from stenograph.batch import transcribe_blocks
    from stenograph.errors import ApiError

    settings = _settings(args)
    engine = Engine(settings)
    try:
        recognizer = engine.recognizer(args.model)
        language = protocol.parse_language(args.language, engine.languages(args.model))
    except (ApiError, ModelError) as exc:
        sys.exit(f"error: {exc}")
    status = 0
    try:
        for path in args.files:
            total = _probe_duration(path)
            started = time.monotonic()

            def progress(
                done: float, path: str = path, total: float | None = total, started: float = started
            ) -> None:
                if not sys.stderr.isatty() or total is None or total < 30:
                    return
                frac = min(1.0, done / total)
                bar = "#" * int(frac * 30)
                speed = done / max(1e-6, time.monotonic() - started)
                print(f"\r{Path(path).name}: [{bar:<30}] {frac:5.1%} {speed:5.1f}x", end="", file=sys.stderr)

            try:
                result = asyncio.run(
                    transcribe_blocks(engine, recognizer, iter_file(path), language, True, progress)
                )
            except (AudioError, FileNotFoundError) as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                status = 1
                continue
            if sys.stderr.isatty() and total and total >= 30:
                print(file=sys.stderr)
            output = format_result(result, args.format, language)
            if args.output_dir:
                out = Path(args.output_dir) / (Path(path).stem + "." + args.format.replace("text", "txt"))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(output + "\n", encoding="utf-8")
            else:
                if len(args.files) > 1 and args.format == "text":
                    print(f"# {path}")
                print(output)
    finally:
        engine.close()
    sys.exit(status)


def _probe_duration(path: str) -> float | None:
    import av

    try:
        with av.open(path) as c:
            return float(c.duration) / 1_000_000 if c.duration else None
    except Exception:
        return None


def cmd_stream(args: argparse.Namespace) -> None:
    """Play a file into `/stt/websocket` as a live source would, showing what a live caption UI would show."""
    import websockets

    from stenograph import client
    from stenograph.audio import AudioError, read_file

    try:
        samples = read_file(args.file)
    except (AudioError, OSError) as exc:
        sys.exit(f"error: {args.file}: {exc}")
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size().columns - 1

    def show(event: client.Event) -> None:
        data = event.data
        if event.type == "error":
            prefix = "\r\x1b[K" if tty else ""
            print(f"{prefix}error: {data.get('title')}: {data.get('message')}", file=sys.stderr)
        elif event.type == "transcript" and data["is_final"]:
            # Each final is a delta that opens with the inter-word space; a line per final reads better.
            print(("\r\x1b[K" if tty else "") + data["text"].strip(), flush=True)
        elif event.type == "transcript" and tty:  # an interim replaces the previous one, in place
            print("\r\x1b[K" + data["text"].strip()[-width:], end="", flush=True)

    async def run() -> client.StreamResult:
        ws = await client.connect(
            args.url,
            api_key=args.api_key,
            model=args.model,
            language=args.language,
            encoding=args.encoding,
            sample_rate=args.sample_rate,
        )
        return await client.stream_audio(
            ws, samples, args.encoding, args.sample_rate, args.realtime, on_event=show
        )

    try:
        result = asyncio.run(run())
    except websockets.InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        sys.exit(f"error: the server refused the connection: HTTP {exc.response.status_code} {body}".rstrip())
    except (OSError, websockets.WebSocketException) as exc:
        sys.exit(f"error: {args.url}: {exc}")
    for i, seconds in enumerate(result.ttct, 1):
        print(f"TTCT {seconds * 1000:.0f} ms (finalize {i}: sent -> flush_done)", file=sys.stderr)
    if result.close_code != 1000:
        sys.exit(f"error: the server closed the connection with code {result.close_code}")
    if any(e.type == "error" for e in result.events):
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stenograph", description="Self-hosted speech-to-text, Cartesia-compatible."
    )
    parser.add_argument("--version", action="version", version=f"stenograph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model-dir", help="assembled model directory (env STENOGRAPH_MODEL_DIR, default ./models)"
        )
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device (default auto)")
        p.add_argument(
            "--compute-type", help="CTranslate2 compute type (default int8 on CPU, float16 on CUDA)"
        )
        p.add_argument("--workers", type=int, help="concurrent model calls (default 2)")
        p.add_argument("--cpu-threads", type=int, help="threads per model call (default 1)")
        p.add_argument(
            "--ink2-model", help="model behind ink-2: whisper-base, whisper-tiny.en or an extra model"
        )

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--allow-open", action="store_true", help="allow a non-loopback bind without API keys")
    serve.add_argument("--log-level", default="info")
    model_flags(serve)
    serve.set_defaults(func=cmd_serve)

    tr = sub.add_parser("transcribe", help="transcribe files locally (no server needed)")
    tr.add_argument("files", nargs="+")
    tr.add_argument("--model", default="ink-whisper")
    tr.add_argument("--language", default="en")
    tr.add_argument("--format", choices=["text", "json", "srt", "vtt"], default="text")
    tr.add_argument("--output-dir", help="write one file per input here instead of printing")
    model_flags(tr)
    tr.set_defaults(func=cmd_transcribe)

    models = sub.add_parser("models", help="list the models and verify their hashes")
    model_flags(models)
    models.set_defaults(func=cmd_models)

    st = sub.add_parser("stream", help="stream a file to a running server like a live source, show live text")
    st.add_argument("file")
    st.add_argument("--realtime", action="store_true", help="pace the audio in real time (default: fast)")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (http/https or ws/wss)")
    st.add_argument(
        "--api-key",
        default=os.environ.get("STENOGRAPH_API_KEY"),
        help="API key or access token (env STENOGRAPH_API_KEY)",
    )
    st.add_argument("--model", default="ink-whisper")
    st.add_argument("--language", default="en")
    st.add_argument("--encoding", default="pcm_s16le", help="wire encoding to send (default pcm_s16le)")
    st.add_argument("--sample-rate", type=int, default=16000, help="wire sample rate to send (default 16000)")
    st.set_defaults(func=cmd_stream)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)
