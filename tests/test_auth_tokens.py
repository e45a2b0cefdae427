"""Authentication on the batch routes: every credential carrier, access tokens minted by the official SDK, and
every way a token can be bad (missing, forged, expired, tampered, lacking the `stt` grant)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import cartesia
import httpx
import numpy as np
import pytest
import websockets
from cartesia import Cartesia

from stenograph import tokens
from stenograph.audio import iter_file
from stenograph.client import stream_audio, ws_url
from stenograph.wer import Clip, wer
from tests.conftest import API_KEY, SECOND_KEY, LiveServer, start_server, stop_server

SECRET = "test-secret-" + "s" * 40
ERROR_FIELDS = {"error_code", "title", "message", "request_id"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Keys configured and a known token secret, so the test can forge tokens the server would have minted."""
    srv = start_server(
        {"STENOGRAPH_TOKEN_SECRET": SECRET, "STENOGRAPH_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def clip(clips: list[Clip]) -> Clip:
    return min((c for c in clips if c.subset == "librispeech_test_clean"), key=lambda c: c.duration)


def payload(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def post_clip(url: str, clip: Clip, headers: dict[str, str] | None = None, params: dict | None = None):
    with clip.path.open("rb") as fh:
        return httpx.post(
            url + "/stt",
            headers=headers or {},
            params=params or {},
            files={"file": (clip.path.name, fh)},
            data={"model": "ink-whisper", "language": "en"},
            timeout=60,
        )


def assert_error(response: httpx.Response, status: int, code: str, says: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= ERROR_FIELDS, body
    assert body["error_code"] == code
    assert says in body["message"], body
    assert response.headers["x-request-id"] == body["request_id"]


def mint(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(
        url + "/access-token", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=10
    )


def test_token_minted_with_the_sdk_transcribes_through_the_sdk(secured: LiveServer, clip: Clip) -> None:
    admin = Cartesia(api_key=API_KEY, base_url=secured.url)
    token = admin.access_token.create(grants={"stt": True}, expires_in=120).token
    claims = payload(token)
    assert claims["grants"] == {"stt": True}
    assert claims["exp"] - claims["iat"] == 120
    assert claims["jti"] and claims["iss"]
    assert claims["exp"] > time.time()

    browser = Cartesia(token=token, base_url=secured.url)
    with clip.path.open("rb") as fh:
        response = browser.stt.transcribe(file=fh, model="ink-whisper", language="en")
    assert wer(clip.text, response.text) < 0.15, response.text


@pytest.mark.parametrize(
    "carrier",
    ["bearer-key", "x-api-key", "query-api-key", "second-key", "bearer-token", "query-access-token"],
)
def test_every_credential_carrier_is_accepted(secured: LiveServer, clip: Clip, carrier: str) -> None:
    token = mint(secured.url, SECOND_KEY, {"grants": {"stt": True}}).json()["token"]
    headers, params = {
        "bearer-key": ({"Authorization": f"Bearer {API_KEY}"}, {}),
        "x-api-key": ({"X-API-Key": API_KEY}, {}),
        "query-api-key": ({}, {"api_key": API_KEY}),
        "second-key": ({"authorization": f"bearer {SECOND_KEY}"}, {}),
        "bearer-token": ({"Authorization": f"Bearer {token}"}, {}),
        "query-access-token": ({}, {"access_token": token}),
    }[carrier]
    response = post_clip(secured.url, clip, headers, params)
    assert response.status_code == 200, response.text
    assert wer(clip.text, response.json()["text"]) < 0.15


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(claims: dict, secret: str = SECRET, alg: str = "HS256") -> str:
    """A token signed as the server signs, with whatever claims the test needs (`alg: none`: unsigned)."""
    signing_input = ".".join(b64(json.dumps(part).encode()) for part in ({"alg": alg, "typ": "JWT"}, claims))
    digest = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{'' if alg == 'none' else b64(digest)}"


def bad_tokens() -> dict[str, tuple[str, int, str, str]]:
    now = int(time.time())
    valid = {
        "grants": {"stt": True},
        "jti": "x",
        "iat": now,
        "iss": "stenograph",
        "exp": now + 600,
        "sub": "key-0",
    }
    grantless = tokens.mint(SECRET.encode(), frozenset({"tts"}), 60, "key-0")
    header, _, signature = grantless.split(".")
    widened = b64(json.dumps(dict(payload(grantless), grants={"stt": True, "tts": True})).encode())
    return {
        "expired": (forged({**valid, "iat": now - 120, "exp": now - 60}), 401, "unauthorized", "expired"),
        "tampered": (f"{header}.{widened}.{signature}", 401, "unauthorized", "signature"),
        "other-secret": (
            forged(valid, secret="another-secret-" + "x" * 40),
            401,
            "unauthorized",
            "signature",
        ),
        "alg-none": (forged(valid, alg="none"), 401, "unauthorized", "algorithm"),
        "no-expiry": (forged({k: v for k, v in valid.items() if k != "exp"}), 401, "unauthorized", "expiry"),
        "garbage": ("not.a.token", 401, "unauthorized", "malformed"),
        "no-stt-grant": (grantless, 403, "forbidden", "stt"),
    }


@pytest.mark.parametrize("kind", list(bad_tokens()))
@pytest.mark.parametrize("carrier", ["bearer", "query"])
def test_bad_tokens_are_refused(secured: LiveServer, clip: Clip, kind: str, carrier: str) -> None:
    token, status, code, says = bad_tokens()[kind]
    if carrier == "bearer":
        response = post_clip(secured.url, clip, headers={"Authorization": f"Bearer {token}"})
    else:
        response = post_clip(secured.url, clip, params={"access_token": token})
    assert_error(response, status, code, says)


def test_missing_and_wrong_keys_are_refused(secured: LiveServer, clip: Clip) -> None:
    assert_error(post_clip(secured.url, clip), 401, "unauthorized", "missing")
    assert_error(post_clip(secured.url, clip, {"X-API-Key": "sk_wrong"}), 401, "unauthorized", "invalid")
    # The OpenAI-compatible route applies the same rules.
    with clip.path.open("rb") as fh:
        response = httpx.post(
            secured.url + "/audio/transcriptions", files={"file": fh}, data={"model": "ink-whisper"}
        )
    assert_error(response, 401, "unauthorized", "missing")


def test_sdk_raises_its_typed_errors_for_refused_tokens(secured: LiveServer, clip: Clip) -> None:
    token, *_ = bad_tokens()["expired"]
    grantless, *_ = bad_tokens()["no-stt-grant"]
    for bad, error in ((token, cartesia.AuthenticationError), (grantless, cartesia.PermissionDeniedError)):
        client = Cartesia(token=bad, base_url=secured.url, max_retries=0)
        with clip.path.open("rb") as fh, pytest.raises(error) as raised:
            client.stt.transcribe(file=fh, model="ink-whisper")
        assert raised.value.body["error_code"] in {"unauthorized", "forbidden"}


def test_access_token_endpoint_rules(secured: LiveServer) -> None:
    default = mint(secured.url, API_KEY, {"grants": {"stt": True}})
    assert default.status_code == 200, default.text
    claims = payload(default.json()["token"])
    assert claims["exp"] - claims["iat"] == 60  # the documented default lifetime
    assert claims["sub"] == "key-0"

    token = default.json()["token"]
    assert_error(mint(secured.url, token, {"grants": {"stt": True}}), 403, "forbidden", "cannot mint")
    assert_error(mint(secured.url, "sk_wrong", {}), 401, "unauthorized", "invalid")
    for bad in ({"expires_in": 3601}, {"expires_in": 0}, {"expires_in": "60"}, {"expires_in": True}):
        assert_error(mint(secured.url, API_KEY, bad), 400, "invalid_request", "expires_in")
    assert_error(mint(secured.url, API_KEY, {"grants": {"stt": "yes"}}), 400, "invalid_request", "grants")
    not_json = httpx.post(
        secured.url + "/access-token", headers={"X-API-Key": API_KEY}, content=b"{grants", timeout=10
    )
    assert_error(not_json, 400, "invalid_request", "JSON")

    limit = mint(
        secured.url, API_KEY, {"grants": {"stt": True, "tts": True, "agent": False}, "expires_in": 3600}
    )
    claims = payload(limit.json()["token"])
    assert claims["grants"] == {"stt": True, "tts": True}
    assert claims["exp"] - claims["iat"] == 3600

    # No grants asked for, none given: such a token may not transcribe.
    empty = mint(secured.url, API_KEY, {}).json()["token"]
    assert payload(empty)["grants"] == {}


def test_credentials_never_reach_the_log(secured: LiveServer, clip: Clip) -> None:
    token = mint(secured.url, API_KEY, {"grants": {"stt": True}}).json()["token"]
    assert post_clip(secured.url, clip, params={"access_token": token, "api_key": API_KEY}).status_code == 200
    assert post_clip(secured.url, clip, params={"api_key": "sk_wrong_guess"}).status_code == 401
    log = "".join(secured.log)
    assert "POST /stt" in log and "minted a token for key-0" in log
    for secret in (API_KEY, SECOND_KEY, token, token.split(".")[2], SECRET, "sk_wrong_guess"):
        assert secret not in log


def test_open_server_mints_and_still_verifies_tokens(tmp_path: Path, clip: Clip) -> None:
    """With no keys anyone may mint (so the browser page works on loopback), presented tokens are still
    checked, and the generated secret is kept (mode 0600) so a token survives a restart."""
    env = {"STENOGRAPH_API_KEYS": "", "STENOGRAPH_STATE_DIR": str(tmp_path)}
    srv = start_server(env)
    try:
        response = httpx.post(srv.url + "/access-token", json={"grants": {"stt": True}, "expires_in": 600})
        assert response.status_code == 200, response.text
        token = response.json()["token"]
        assert payload(token)["sub"] == "open"
        assert post_clip(srv.url, clip, {"Authorization": "Bearer sk_anything"}).status_code == 200
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        assert_error(
            post_clip(srv.url, clip, params={"access_token": tampered}), 401, "unauthorized", "signature"
        )
    finally:
        stop_server(srv)
    secret_file = tmp_path / tokens.SECRET_FILE
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600

    srv = start_server(env)
    try:
        response = post_clip(srv.url, clip, params={"access_token": token})
        assert response.status_code == 200, response.text
        assert wer(clip.text, response.json()["text"]) < 0.15
    finally:
        stop_server(srv)


# -- the WebSocket handshake applies the same rules, before any audio is read -----------------------------

STREAM = {"model": "ink-whisper", "encoding": "pcm_s16le", "sample_rate": "16000", "language": "en"}


def samples(clip: Clip) -> np.ndarray:
    return np.concatenate(list(iter_file(str(clip.path))))


async def test_websocket_accepts_a_token_in_the_query(secured: LiveServer, clip: Clip) -> None:
    token = mint(secured.url, API_KEY, {"grants": {"stt": True}}).json()["token"]
    url = ws_url(secured.url, "/stt/websocket", {**STREAM, "access_token": token})
    async with websockets.connect(url) as ws:
        result = await stream_audio(ws, samples(clip), realtime=False)
    assert result.close_code == 1000
    assert wer(clip.text, result.transcript) < 0.15, result.transcript


async def test_turns_websocket_accepts_a_token_in_the_query(secured: LiveServer) -> None:
    token = mint(secured.url, API_KEY, {"grants": {"stt": True}}).json()["token"]
    url = ws_url(secured.url, "/stt/turns/websocket", {**STREAM, "model": "ink-2", "access_token": token})
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"


@pytest.mark.parametrize("path", ["/stt/websocket", "/stt/turns/websocket"])
@pytest.mark.parametrize("kind", ["expired", "tampered", "alg-none", "no-stt-grant", "missing", "wrong-key"])
async def test_websocket_handshake_refuses_bad_credentials(secured: LiveServer, kind: str, path: str) -> None:
    if kind == "missing":
        params, status, code = {}, 401, "unauthorized"
    elif kind == "wrong-key":
        params, status, code = {"api_key": "sk_wrong"}, 401, "unauthorized"
    else:
        token, status, code, _ = bad_tokens()[kind]
        params = {"access_token": token}
    url = ws_url(secured.url, path, {**STREAM, "model": "ink-2", **params})
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url):
            pass
    response = refused.value.response
    assert response.status_code == status
    body = json.loads(response.body)
    assert set(body) >= ERROR_FIELDS and body["error_code"] == code
