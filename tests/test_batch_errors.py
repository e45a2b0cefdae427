"""Every way a batch request can go wrong, by real HTTP against the live server: status, error shape, no 500s.

Each error must come back in the API's JSON shape `{error_code, title, message, request_id}` with the same id
in `X-Request-Id`, so a client can always report it; a 500 or a traceback anywhere here is a bug.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from stenograph.wer import Clip, corpus_wer, normalize
from tests.conftest import (
    API_KEY,
    MODEL_DIR,
    LiveServer,
    free_port,
    pick,
    start_server,
    stop_server,
    write_wav,
)

ROUTES = ("/stt", "/audio/transcriptions", "/v1/audio/transcriptions")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ERROR_KEYS = {"error_code", "title", "message", "request_id"}
SMALL_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def log_start(server: LiveServer) -> int:
    """Where this module's requests begin in the server log, for the closing traceback check."""
    return len(server.log)


@pytest.fixture(scope="module")
def speech(clips: list[Clip]) -> Clip:
    """A short clean sentence without proper names, so even tiny.en gets it nearly right."""
    return next(c for c in clips if c.id == "ls-test-clean-1089-134686-0002")


@pytest.fixture(scope="module")
def silence(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One second of digital silence: valid audio that never reaches the model, for envelope checks."""
    return write_wav(
        tmp_path_factory.mktemp("silence") / "silence.wav", np.zeros(16000, np.float32)
    ).read_bytes()


def post(
    client: httpx.Client,
    route: str = "/stt",
    *,
    file: tuple[str, bytes] | None = None,
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    **kwargs: object,
) -> httpx.Response:
    """POST with a good key by default; no response may ever be a 5xx."""
    files = {"file": (file[0], file[1], "application/octet-stream")} if file else None
    response = client.post(
        route,
        files=files,
        data={"model": "ink-whisper", **(data or {})} if files is not None or data else None,
        headers=AUTH if headers is None else headers,
        params=params,
        **kwargs,  # type: ignore[arg-type]
    )
    assert response.status_code < 500, response.text
    return response


def assert_error(response: httpx.Response, status: int, error_code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error_code"] == error_code, body
    for key in ERROR_KEYS:
        assert isinstance(body[key], str) and body[key].strip(), (key, body)
    assert "Traceback" not in body["message"]
    assert response.headers["x-request-id"] == body["request_id"]
    return body


def assert_transcript(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transcript"
    assert response.headers["x-request-id"] == body["request_id"]
    return body


def wav_header(rate: int, channels: int, bits: int, payload: bytes) -> bytes:
    """A RIFF/WAVE file with an arbitrary (possibly nonsensical) fmt chunk."""
    block = channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
    riff = b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


# -- unreadable audio ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_only(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real MP4 with a video track and no audio track."""
    out = tmp_path_factory.mktemp("video") / "video_only.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=c=black:s=64x64:r=5:d=1",
            "-c:v",
            "mpeg4",
            str(out),
        ],
        check=True,
    )
    return out.read_bytes()


def bad_audio_cases(speech: Clip, video_only: bytes) -> dict[str, tuple[str, bytes]]:
    flac = speech.path.read_bytes()
    return {
        "random bytes": ("noise.wav", os.urandom(20000)),
        "text file": ("notes.txt", b"This is not audio, just a text file.\n" * 50),
        "empty file": ("empty.flac", b""),
        "truncated header": ("clip.flac", flac[:300]),
        "video without audio": ("video.mp4", video_only),
        "wav with no samples": ("empty.wav", wav_header(16000, 1, 16, b"")),
        "wav with 0 Hz": ("zero.wav", wav_header(0, 1, 16, b"\0\0" * 8000)),
        "wav with 1 Hz": ("slow.wav", wav_header(1, 1, 16, b"\0\1" * 8000)),
        "wav with 0 channels": ("nochan.wav", wav_header(16000, 0, 16, b"\0\0" * 8000)),
        "wav with 0 bits": ("nobits.wav", wav_header(16000, 1, 0, b"\0\0" * 8000)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "random bytes",
        "text file",
        "empty file",
        "truncated header",
        "video without audio",
        "wav with no samples",
        "wav with 0 Hz",
        "wav with 1 Hz",
        "wav with 0 channels",
        "wav with 0 bits",
    ],
)
def test_unreadable_audio_is_invalid_audio(client, speech, video_only, case):
    name, payload = bad_audio_cases(speech, video_only)[case]
    assert_error(post(client, file=(name, payload)), 400, "invalid_audio")


def test_truncated_tail_keeps_the_audio_before_it(client, clips):
    """A file cut off mid-stream (an interrupted copy) transcribes what is there, as ffmpeg would."""
    clip = max(pick(clips, "librispeech_test_clean", 25), key=lambda c: c.duration)
    flac = clip.path.read_bytes()
    body = assert_transcript(post(client, file=("cut.flac", flac[: len(flac) // 2])))
    assert 0.3 * clip.duration < body["duration"] < 0.7 * clip.duration
    ref, hyp = normalize(clip.text), normalize(str(body["text"]))
    assert hyp[:3] == ref[:3] and len(hyp) < len(ref), body["text"]


# -- models and languages ------------------------------------------------------------------------------------


def test_unknown_model(client, silence):
    body = assert_error(
        post(client, file=("a.wav", silence), data={"model": "whisper-huge-v9"}), 400, "model_not_found"
    )
    assert "whisper-huge-v9" in body["message"] and "ink-whisper" in body["message"]


@pytest.mark.parametrize("fields", [{}, {"model": ""}, {"model": "   "}], ids=["absent", "empty", "blank"])
def test_missing_model(client, silence, fields):
    files = {"file": ("a.wav", silence, "audio/wav")}
    body = assert_error(client.post("/stt", files=files, data=fields, headers=AUTH), 400, "invalid_request")
    assert "model" in body["message"]


@pytest.mark.parametrize(
    ("model", "language"),
    [("ink-whisper", "xx"), ("ink-whisper", "english"), ("whisper-tiny.en", "de"), ("ink-whisper", "123")],
)
def test_unsupported_language(client, silence, model, language):
    response = post(client, file=("a.wav", silence), data={"model": model, "language": language})
    body = assert_error(response, 400, "unsupported_language")
    assert repr(language) in body["message"]
    if model == "whisper-tiny.en":
        assert "supported: en" in body["message"]


def test_english_only_model_accepts_english(client, speech):
    body = assert_transcript(
        post(
            client,
            file=("a.flac", speech.path.read_bytes()),
            data={"model": "whisper-tiny.en", "language": "en"},
        )
    )
    assert corpus_wer([(speech.text, str(body["text"]))]) < 0.25, body["text"]


# -- size limit ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server() -> Iterator[LiveServer]:
    srv = start_server(
        extra_env={"STENOGRAPH_MAX_UPLOAD_BYTES": str(SMALL_LIMIT), "STENOGRAPH_MAX_AUDIO_SECONDS": "2"}
    )
    yield srv
    stop_server(srv)


def test_upload_over_the_limit_with_content_length(small_server, speech):
    assert speech.path.stat().st_size > SMALL_LIMIT
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        body = assert_error(post(c, file=("a.flac", speech.path.read_bytes())), 413, "request_too_large")
    assert str(SMALL_LIMIT) in body["message"]


def test_audio_longer_than_the_limit(small_server):
    """A small upload can still decode to hours (low-bitrate codecs): the decoded length is capped too."""
    three_seconds = bytes(3 * 8000)  # 8 kHz mu-law: one byte a sample
    assert len(three_seconds) < SMALL_LIMIT
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        response = c.post(
            "/stt",
            headers=AUTH,
            params={"encoding": "pcm_mulaw", "sample_rate": "8000"},
            files={"file": ("long.raw", three_seconds)},
            data={"model": "ink-whisper"},
        )
        body = assert_error(response, 413, "audio_too_long")
    assert "2 s" in body["message"]


def test_chunked_upload_over_the_limit_without_content_length(small_server):
    """No Content-Length to check up front: the limit must be enforced while the body streams in."""
    boundary = "stenograph-test-boundary"
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nink-whisper\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.raw"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(64):  # 4 MiB, far past the limit
            sent += 16384
            yield bytes(16384)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        request = c.build_request(
            "POST",
            "/stt",
            content=body(),
            headers=headers,
            params={"encoding": "pcm_s16le", "sample_rate": "16000"},
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = c.send(request)
    assert_error(response, 413, "request_too_large")


def test_upload_under_the_limit_still_works(small_server, silence):
    assert len(silence) < SMALL_LIMIT
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        body = assert_transcript(post(c, file=("a.wav", silence)))
    assert body["text"] == "" and body["duration"] == pytest.approx(1.0)


# -- credentials ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Authorization": "Bearer sk_wrong"}, None),
        ({"X-API-Key": "sk_wrong"}, None),
        ({}, {"api_key": "sk_wrong"}),
        ({"Authorization": f"Basic {API_KEY}"}, None),
    ],
    ids=["bearer", "x-api-key", "query", "basic-scheme"],
)
def test_wrong_key_is_401(client, silence, headers, params):
    assert_error(post(client, file=("a.wav", silence), headers=headers, params=params), 401, "unauthorized")


@pytest.mark.parametrize("route", ROUTES)
def test_missing_credentials_is_401_on_every_route(client, silence, route):
    body = assert_error(post(client, route, file=("a.wav", silence), headers={}), 401, "unauthorized")
    assert "key" in body["message"].lower()


def test_auth_is_checked_before_the_body_is_judged(client):
    """An unauthenticated caller learns nothing about what else is wrong with the request."""
    assert_error(
        post(client, content=b"{}", headers={"Content-Type": "application/json"}), 401, "unauthorized"
    )


@pytest.mark.parametrize(
    ("headers", "params"),
    [(AUTH, None), ({"X-API-Key": API_KEY}, None), ({}, {"api_key": API_KEY})],
    ids=["bearer", "x-api-key", "query"],
)
def test_every_key_carrier_succeeds(client, silence, headers, params):
    body = assert_transcript(post(client, file=("a.wav", silence), headers=headers, params=params))
    assert body["text"] == ""


# -- malformed requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "ink-whisper"}', "application/json"),
        (b"model=ink-whisper", "application/x-www-form-urlencoded"),
        (b"RIFF....WAVE", "audio/wav"),
        (b"RIFF....WAVE", None),
    ],
    ids=["json", "urlencoded", "audio-body", "no-content-type"],
)
def test_non_multipart_body(client, content, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    body = assert_error(post(client, content=content, headers=headers), 400, "invalid_request")
    assert "multipart/form-data" in body["message"]


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=abc"],
    ids=["no-boundary", "garbage"],
)
def test_malformed_multipart(client, content_type):
    response = post(
        client, content=b"--xyz\r\nnot really multipart", headers={**AUTH, "Content-Type": content_type}
    )
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "fields",
    [{"model": "ink-whisper"}, {"model": "ink-whisper", "file": "not-an-upload"}],
    ids=["absent", "text"],
)
def test_file_field_missing_or_not_a_file(client, fields):
    response = client.post("/stt", data=fields, files={"other": ("a.wav", b"RIFF")}, headers=AUTH)
    assert "`file`" in assert_error(response, 400, "invalid_request")["message"]


def test_raw_pcm_without_sample_rate(client):
    response = post(client, file=("a.raw", bytes(3200)), params={"encoding": "pcm_s16le"})
    assert "sample_rate" in assert_error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize("rate", ["4000", "96000", "abc", "16000.5"])
def test_raw_pcm_with_bad_sample_rate(client, rate):
    response = post(
        client, file=("a.raw", bytes(3200)), params={"encoding": "pcm_s16le", "sample_rate": rate}
    )
    assert "sample_rate" in assert_error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize("encoding", ["mp3", "pcm_s24le", "PCM_S16LE"])
def test_bad_encoding(client, encoding):
    response = post(
        client, file=("a.raw", bytes(3200)), params={"encoding": encoding, "sample_rate": "16000"}
    )
    body = assert_error(response, 400, "invalid_request")
    assert "encoding" in body["message"] and "pcm_s16le" in body["message"]


@pytest.mark.parametrize("payload", [b"", b"\x01"], ids=["empty", "half-sample"])
def test_raw_pcm_without_a_whole_sample(client, payload):
    response = post(client, file=("a.raw", payload), params={"encoding": "pcm_s16le", "sample_rate": "16000"})
    assert_error(response, 400, "invalid_audio")


# -- what is accepted ----------------------------------------------------------------------------------------


def test_unknown_fields_and_openai_extras_are_ignored(client, speech):
    extras = {
        "language": "en",
        "prompt": "Hester Prynne",
        "temperature": "0.7",
        "response_format": "verbose_json",
        "timestamp_granularities[]": "segment",
        "chunking_strategy": "auto",
        "x_unknown_field": "whatever",
    }
    response = post(
        client,
        "/v1/audio/transcriptions",
        file=("a.flac", speech.path.read_bytes()),
        data=extras,
        params={"unknown_query": "1", "cartesia_version": "2024-01-01"},
    )
    body = assert_transcript(response)
    assert set(body) == {"type", "text", "language", "duration", "request_id"}, body
    assert body["language"] == "en" and body["duration"] == pytest.approx(speech.duration, abs=0.05)
    assert corpus_wer([(speech.text, str(body["text"]))]) < 0.15, body["text"]


@pytest.mark.parametrize(
    ("method", "path", "status", "error_code"),
    [
        ("GET", "/stt", 405, "method_not_allowed"),
        ("PUT", "/v1/audio/transcriptions", 405, "method_not_allowed"),
        ("POST", "/v1/stt", 404, "not_found"),
    ],
)
def test_wrong_route_or_method(client, method, path, status, error_code):
    response = client.request(method, path, headers=AUTH)
    assert path in assert_error(response, status, error_code)["message"]
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_status_route(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["x-request-id"]
    body = response.json()
    assert body == {"ok": True, "version": body["version"]}
    assert isinstance(body["version"], str) and len(body["version"]) == 10 and body["version"][4] == "-"


# -- serve refuses an open public bind -----------------------------------------------------------------------


def test_serve_refuses_public_bind_without_keys():
    env = {**os.environ, "STENOGRAPH_MODEL_DIR": str(MODEL_DIR), "STENOGRAPH_API_KEYS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "stenograph", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr and "--allow-open" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_serve_allow_open_starts_without_keys(silence):
    srv = start_server(extra_env={"STENOGRAPH_API_KEYS": ""}, args=["--host", "0.0.0.0", "--allow-open"])
    try:
        assert any("without authentication" in line for line in srv.log), "".join(srv.log)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert_transcript(post(c, file=("a.wav", silence), headers={}))
    finally:
        stop_server(srv)


def test_server_logged_no_tracebacks(server, log_start):
    """Runs last: every bad request above was answered without an unhandled exception on the server."""
    logged = "".join(server.log[log_start:])
    assert "Traceback" not in logged and "internal error" not in logged, logged
