"""HTTP transport: the batch routes, status and the error responses they share."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from typing import IO

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive

from stenograph import logs, metrics, protocol, tokens
from stenograph.asr import Engine, require_model
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE, AudioError, PcmDecoder, iter_file
from stenograph.auth import Authenticator
from stenograph.batch import transcribe_blocks
from stenograph.errors import ApiError, bad_request
from stenograph.limits import SessionLimiter

log = logging.getLogger("stenograph.http")

RAW_BLOCK_BYTES = 1 << 20
MAX_TOKEN_REQUEST_BYTES = 64 * 1024


def new_request_id() -> str:
    return str(uuid.uuid4())


def error_response(error: ApiError, request_id: str) -> JSONResponse:
    metrics.error(error.error_code)
    headers = {"X-Request-Id": request_id, **(error.headers or {})}
    return JSONResponse(
        protocol.http_error_body(error, request_id), status_code=error.status, headers=headers
    )


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "request_too_large", "Request too large", f"the upload exceeds the limit of {limit} bytes"
    )


def stalled(seconds: float) -> ApiError:
    return ApiError(408, "idle_timeout", "Idle timeout", f"the upload sent nothing for {seconds:g} s")


def limited_receive(receive: Receive, limit: int, idle_timeout: float) -> Receive:
    """Count body bytes as they arrive so a chunked upload can't exceed the limit either, and give up on an
    upload that stalls, so a client that stops sending cannot hold a session slot forever."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except TimeoutError:
            raise stalled(idle_timeout) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return wrapped


def raw_pcm_blocks(fh: IO[bytes], encoding: str, sample_rate: int) -> Iterator[np.ndarray]:
    decoder = PcmDecoder(encoding, sample_rate)
    received = 0
    while data := fh.read(RAW_BLOCK_BYTES):
        received += len(data)
        yield decoder.feed(data)
    if received < decoder.width:
        # Headerless input has nothing else to validate; an empty upload is a client mistake, not silence.
        raise AudioError(f"the upload holds no {encoding} sample ({received} bytes)")
    yield decoder.flush()


class BatchRoutes:
    def __init__(self, engine: Engine, auth: Authenticator, limits: SessionLimiter) -> None:
        self.engine = engine
        self.auth = auth
        self.limits = limits

    async def status(self, request: Request) -> JSONResponse:
        body = {"ok": True, "version": self.engine.settings.api_version}
        return JSONResponse(body, headers={"X-Request-Id": new_request_id()})

    async def transcribe(self, request: Request) -> JSONResponse:
        request_id = new_request_id()
        logs.request_id.set(request_id)
        try:
            principal = self.auth.authenticate(request.headers, request.query_params)
            # The slot is held from before the upload is read until the answer is ready.
            async with self.limits.session(principal, "batch"):
                body = await self._transcribe(request, request_id)
        except ApiError as exc:
            return error_response(exc, request_id)
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    async def _transcribe(self, request: Request, request_id: str) -> dict[str, object]:
        limit = self.engine.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("send the audio as multipart/form-data with a `file` field")
        idle = self.engine.settings.upload_idle_timeout
        request = Request(request.scope, limited_receive(request.receive, limit, idle))
        try:
            form = await request.form(max_files=4, max_fields=64)
        except ApiError:
            raise
        except Exception as exc:  # python-multipart raises several types for malformed bodies
            raise bad_request(f"malformed multipart body: {exc}") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise bad_request("the `file` field is required and must be a file upload")
            model_field = form.get("model")
            recognizer = require_model(self.engine, model_field if isinstance(model_field, str) else None)
            language_field = form.get("language")
            language = protocol.parse_language(
                language_field if isinstance(language_field, str) else None,
                self.engine.languages(str(model_field)),
            )
            granularities = [
                *form.getlist("timestamp_granularities[]"),
                *form.getlist("timestamp_granularities"),
            ]
            want_words = any(isinstance(g, str) and g.strip() == "word" for g in granularities)
            blocks = self._blocks(request, upload)
            try:
                result = await transcribe_blocks(self.engine, recognizer, blocks, language, want_words)
            except AudioError as exc:
                raise ApiError(400, "invalid_audio", "Unsupported or corrupt audio", str(exc)) from None
        finally:
            await form.close()
        log.info("batch %s: %.1f s of audio, model %s", request_id, result.duration, recognizer.spec.name)
        metrics.audio_seconds(result.duration, "batch")
        return protocol.batch_response(
            result.text, language, result.duration, request_id, result.words if want_words else None
        )

    def _blocks(self, request: Request, upload: UploadFile) -> Iterator[np.ndarray]:
        """Raw PCM when the query names an encoding, otherwise whatever container the file is."""
        encoding = protocol.parse_encoding(request.query_params, ENCODINGS, required=False)
        upload.file.seek(0)
        if encoding is None:
            return iter_file(upload.file)
        rate = protocol.parse_int(request.query_params, "sample_rate", None, MIN_INPUT_RATE, MAX_INPUT_RATE)
        return raw_pcm_blocks(upload.file, encoding, rate)


class TokenRoutes:
    """`POST /access-token`: an API key mints a short-lived token for a browser (auth.py: open servers)."""

    def __init__(self, auth: Authenticator, default_ttl: int, idle_timeout: float) -> None:
        self.auth = auth
        self.default_ttl = default_ttl
        self.idle_timeout = idle_timeout

    async def create(self, request: Request) -> JSONResponse:
        request_id = new_request_id()
        logs.request_id.set(request_id)
        try:
            principal = self.auth.authenticate_key(request.headers, request.query_params)
            grants, expires_in = await self._params(request)
        except ApiError as exc:
            return error_response(exc, request_id)
        token = self.auth.mint(principal, grants, expires_in)
        log.info("minted a token for %s: grants %s, %d s", principal.key_id, sorted(grants), expires_in)
        return JSONResponse({"token": token}, headers={"X-Request-Id": request_id})

    async def _params(self, request: Request) -> tuple[frozenset[str], int]:
        """`{grants: {stt, tts, agent}, expires_in}`, every field optional; unknown fields are ignored."""
        receive = limited_receive(request.receive, MAX_TOKEN_REQUEST_BYTES, self.idle_timeout)
        request = Request(request.scope, receive)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (UnicodeDecodeError, ValueError):
            raise bad_request('the body must be JSON: {"grants": {"stt": true}, "expires_in": 60}') from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        expires_in = body.get("expires_in")
        if expires_in is None:
            expires_in = self.default_ttl
        numeric = isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
        if not numeric or expires_in != int(expires_in) or not 1 <= expires_in <= tokens.MAX_EXPIRES_IN:
            raise bad_request(
                f"expires_in must be an integer number of seconds from 1 to {tokens.MAX_EXPIRES_IN}",
                title="Invalid parameter",
            )
        grants = body.get("grants") or {}
        if not isinstance(grants, dict) or any(not isinstance(v, bool | None) for v in grants.values()):
            raise bad_request('grants must be a JSON object of booleans: {"stt": true}')
        return frozenset(name for name in tokens.GRANTS if grants.get(name) is True), int(expires_in)
