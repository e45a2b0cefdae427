"""Protocol fuzzing against the live server: random multipart bodies, headers and query strings at the batch
routes and random JSON at `/access-token`. The server must answer every one promptly, only with a transcript
or the API's error shape (never a 500), and a well-formed request running alongside must keep working."""

from __future__ import annotations

import string
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

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

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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
