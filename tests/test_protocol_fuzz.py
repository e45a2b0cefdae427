"""Protocol fuzzing against the live server: random multipart bodies, headers and query strings at the batch
routes, random JSON at `/access-token`, and random handshakes, audio, garbage and commands on both WebSockets.
The server must answer every one promptly, only with the API's events or error shapes (never a 500, a 1011 or
a hang), and a well-formed request running alongside must keep working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stenograph.audio import read_file
from stenograph.client import to_wire, ws_url
from stenograph.wer import Clip, wer
from tests.conftest import API_KEY, LiveServer

ERROR_FIELDS = {"error_code", "title", "message", "request_id"}
ANSWERS = {200, 400, 401, 403, 413, 429}
TIMEOUT = 60  # "never hangs": a request that is not answered in this time fails the test

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
# What a boundary may be made of (RFC 2046): the header stays valid HTTP, and the body is what is broken.
bchars = st.text(string.ascii_letters + string.digits + "'()+_,-./:=?", min_size=1, max_size=70)
field_names = (
    st.sampled_from(
        [
            "file",
            "model",
            "language",
            "timestamp_granularities[]",
            "timestamp_granularities",
            "prompt",
            "",
            'fi"le',
        ]
    )
    | text
)
field_values = (
    st.sampled_from(["ink-whisper", "ink-2", "whisper-tiny.en", "en", "es", "xx", "word", ""]) | text
)
query = st.dictionaries(
    st.sampled_from(["encoding", "sample_rate", "model", "language", "api_key", "access_token", "keyterm"])
    | text,
    st.sampled_from(["pcm_s16le", "pcm_mulaw", "16000", "8000", "0", "-1", "1e9", "nan", "16000.0"]) | text,
    max_size=4,
)
bad_credentials = st.sampled_from([{}, {"Authorization": "Bearer a.b.c"}, {"X-API-Key": "sk_nope"}])


def likely(draw: st.DrawFn, tenths: int) -> bool:
    """True with probability tenths/10: keeps most bodies close enough to valid to reach the decoder."""
    return draw(st.integers(0, 9)) < tenths


@st.composite
def multipart(draw: st.DrawFn, audio: bytes) -> tuple[bytes, str]:
    """A multipart body whose names, filenames, headers and contents may each be broken in any way; most
    start from a valid request (an audio prefix and a model) so the decoder and the model see them too."""
    boundary = uuid.uuid4().hex if likely(draw, 8) else draw(st.sampled_from(["", "x" * 80]) | bchars)
    parts: list[tuple[str, str | None, bytes]] = []
    if likely(draw, 6):
        cut = draw(st.integers(0, len(audio)))
        model = draw(st.sampled_from(["ink-whisper", "ink-2"]) if likely(draw, 8) else field_values)
        parts += [("file", "clip.flac", audio[:cut]), ("model", None, model.encode())]
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            cut = draw(st.integers(0, len(audio)))
            content = draw(st.sampled_from([audio[:cut], audio[cut : cut + 4096]]) | st.binary(max_size=4096))
            parts.append((draw(field_names), draw(st.sampled_from(["a.wav", ""]) | text), content))
        else:
            parts.append((draw(field_names), None, draw(field_values).encode()))
    chunks = []
    for name, filename, content in draw(st.permutations(parts)):
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        extra = "" if likely(draw, 7) else draw(st.sampled_from(["Content-Type: audio/wav\r\n", "Bogus\r\n"]))
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + content)
    ending = f"--{boundary}--\r\n" if likely(draw, 8) else draw(st.sampled_from(["", f"--{boundary}", "--"]))
    body = b"\r\n".join(chunks) + (b"\r\n" if chunks else b"") + ending.encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if not likely(draw, 8):
        content_type = draw(st.sampled_from(["multipart/form-data", "application/json", ""]))
    if not likely(draw, 9):
        body = draw(st.binary(max_size=2048))
    return body, content_type


@pytest.fixture(scope="module")
def clip(clips: list[Clip]) -> Clip:
    return min((c for c in clips if c.subset == "librispeech_test_clean"), key=lambda c: c.duration)


@pytest.fixture(scope="module")
def alongside(server: LiveServer, clip: Clip) -> Iterator[list[httpx.Response]]:
    """Well-formed requests sent one after another for as long as the fuzzing runs."""
    done = threading.Event()
    responses: list[httpx.Response] = []

    def loop() -> None:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            while not done.is_set():
                with clip.path.open("rb") as fh:
                    responses.append(
                        client.post(
                            "/stt",
                            headers={"X-API-Key": API_KEY},
                            files={"file": fh},
                            data={"model": "ink-whisper"},
                        )
                    )

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    yield responses
    done.set()
    worker.join(TIMEOUT)


def check(response: httpx.Response) -> None:
    event(f"status {response.status_code}")
    assert response.status_code in ANSWERS, (response.status_code, response.text)
    body = response.json()
    if response.status_code == 200:
        assert body.get("type") == "transcript" or "token" in body, body
    else:
        assert set(body) >= ERROR_FIELDS and isinstance(body["error_code"], str), body
        assert response.headers["x-request-id"] == body["request_id"]


def test_random_batch_requests_get_clean_answers(server: LiveServer, clip: Clip, alongside) -> None:
    log_start = len(server.log)
    audio = clip.path.read_bytes()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        data=st.data(),
        route=st.sampled_from(["/stt", "/audio/transcriptions", "/v1/audio/transcriptions"]),
    )
    def run(data: st.DataObject, route: str) -> None:
        body, content_type = data.draw(multipart(audio))
        params = data.draw(query) if likely(data.draw, 5) else {}
        auth = {"X-API-Key": API_KEY} if likely(data.draw, 8) else data.draw(bad_credentials)
        headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
        check(httpx.post(server.url + route, params=params, content=body, headers=headers, timeout=TIMEOUT))

    run()

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        body=st.fixed_dictionaries({}, optional={"grants": json_values, "expires_in": json_values})
        | json_values
        | text,
        raw=st.booleans(),
    )
    def mint(body: object, raw: bool) -> None:
        headers = {"X-API-Key": API_KEY}
        if raw:
            response = httpx.post(server.url + "/access-token", content=str(body).encode(), headers=headers)
        else:
            response = httpx.post(server.url + "/access-token", json=body, headers=headers)
        check(response)

    mint()

    assert server.process.poll() is None, "the server died"
    logged = "".join(server.log[log_start:])
    assert "Traceback" not in logged and "internal error" not in logged, logged
    assert alongside, "the well-formed requests never ran"
    for response in alongside:
        assert response.status_code == 200, response.text
        assert wer(clip.text, response.json()["text"]) < 0.15


# -- WebSockets ----------------------------------------------------------------------------------------------

WS_EVENTS = {
    "/stt/websocket": {"transcript", "flush_done", "done", "error"},
    "/stt/turns/websocket": {
        "connected",
        "turn.start",
        "turn.update",
        "turn.eager_end",
        "turn.resume",
        "turn.end",
        "error",
    },
}
WS_ERROR_FIELDS = {"type", "title", "message", "error_code", "status_code", "code", "request_id"}
END = {"/stt/websocket": "close", "/stt/turns/websocket": json.dumps({"type": "close"})}
thresholds = st.floats(-1, 2, allow_nan=False) | st.sampled_from(["0.5", "x", None])
text_frames = (
    st.sampled_from(
        ["finalize", "close", "done", '{"type":"close"}', '"finalize"', "{", "null", '{"type":"config"}']
    )
    | text
    | st.builds(
        lambda turn: json.dumps({"type": "config", "turn": turn}),
        st.dictionaries(
            st.sampled_from(["start_threshold", "end_threshold", "end_timeout_ms", "x"]), thresholds
        ),
    )
)


@st.composite
def ws_session(draw: st.DrawFn, audio: bytes) -> tuple[str, dict[str, object], list[bytes | str]]:
    """A handshake close to valid (then mutated) and a random run of audio, garbage and commands."""
    path = draw(st.sampled_from(list(WS_EVENTS)))
    params: dict[str, object] = {
        "model": "ink-2" if path.endswith("turns/websocket") else "ink-whisper",
        "encoding": "pcm_s16le",
        "sample_rate": "16000",
        "api_key": API_KEY,
    }
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*params, "language", "keyterm", "min_volume", "end_threshold"]) | text)
        params[key] = draw(
            field_values | st.lists(field_values, max_size=3) | query.map(lambda q: "&".join(q))
        )
    frames: list[bytes | str] = []
    for _ in range(draw(st.integers(0, 6))):
        if likely(draw, 6):  # speech, so the decoder and the turn logic run too
            start = 2 * draw(st.integers(0, max(0, len(audio) // 2 - 1600)))  # whole samples
            frames.append(audio[start : start + draw(st.integers(0, 32000))])
        elif likely(draw, 5):
            frames.append(draw(st.binary(max_size=1024)))
        else:
            frames.append(draw(text_frames))
    return path, params, frames


def check_ws_events(path: str, events: list[object], close_code: int | None) -> None:
    for e in events:
        assert isinstance(e, dict) and e.get("type") in WS_EVENTS[path], e
        event(f"ws event {e['type']}")
        if e["type"] == "error":
            assert set(e) >= WS_ERROR_FIELDS and e["status_code"] == e["code"] and e["status_code"] < 500, e
    event(f"ws close {close_code}")
    assert close_code in {1000, 1008}, (close_code, events)


async def run_ws(url: str, path: str, params: dict[str, object], frames: list[bytes | str]) -> None:
    try:
        ws = await websockets.connect(ws_url(url, path, params), open_timeout=TIMEOUT)
    except websockets.InvalidStatus as exc:
        event(f"ws handshake {exc.response.status_code}")
        assert exc.response.status_code in {400, 401, 403, 429}, exc.response
        body = json.loads(exc.response.body)
        assert set(body) >= ERROR_FIELDS, body
        return
    events: list[object] = []
    async with asyncio.timeout(TIMEOUT), ws:  # "never hangs"
        with contextlib.suppress(websockets.ConnectionClosed):  # an early `close` among the frames ends it
            for frame in [*frames, END[path]]:
                await ws.send(frame)
        with contextlib.suppress(websockets.ConnectionClosed):  # the close code is checked below
            async for message in ws:
                events.append(json.loads(message))
    check_ws_events(path, events, ws.close_code)


def test_random_websocket_sessions_get_clean_answers(server: LiveServer, clip: Clip, alongside) -> None:
    log_start = len(server.log)
    audio = to_wire(read_file(str(clip.path)), "pcm_s16le", 16000)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(session=ws_session(audio))
    def run(session: tuple[str, dict[str, object], list[bytes | str]]) -> None:
        asyncio.run(run_ws(server.url, *session))

    run()

    assert server.process.poll() is None, "the server died"
    logged = "".join(server.log[log_start:])
    assert "Traceback" not in logged and "internal error" not in logged, logged
    for response in alongside:
        assert response.status_code == 200, response.text
        assert wer(clip.text, response.json()["text"]) < 0.15
