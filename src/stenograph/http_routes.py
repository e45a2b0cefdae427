"""HTTP transport: the batch routes, status and the error responses they share."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import IO

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive

from stenograph import protocol
from stenograph.asr import Engine, require_model
from stenograph.audio import ENCODINGS, MAX_INPUT_RATE, MIN_INPUT_RATE, AudioError, PcmDecoder, iter_file
from stenograph.auth import Authenticator
from stenograph.batch import transcribe_blocks
from stenograph.errors import ApiError, bad_request

log = logging.getLogger("stenograph.http")

RAW_BLOCK_BYTES = 1 << 20


def new_request_id() -> str:
    return str(uuid.uuid4())


def error_response(error: ApiError, request_id: str) -> JSONResponse:
    headers = {"X-Request-Id": request_id, **(error.headers or {})}
    return JSONResponse(protocol.http_error_body(error, request_id), status_code=error.status, headers=headers)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", "Request too large", f"the upload exceeds the limit of {limit} bytes")


def limited_receive(receive: Receive, limit: int) -> Receive:
    """Count body bytes as they arrive so a chunked upload can't exceed the limit either."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return wrapped


def raw_pcm_blocks(fh: IO[bytes], encoding: str, sample_rate: int) -> Iterator[np.ndarray]:
    decoder = PcmDecoder(encoding, sample_rate)
    while data := fh.read(RAW_BLOCK_BYTES):
        yield decoder.feed(data)
    yield decoder.flush()


class BatchRoutes:
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth

    async def status(self, request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "version": self.engine.settings.api_version})

    async def transcribe(self, request: Request) -> JSONResponse:
        request_id = new_request_id()
        try:
            body = await self._transcribe(request, request_id)
        except ApiError as exc:
            return error_response(exc, request_id)
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    async def _transcribe(self, request: Request, request_id: str) -> dict[str, object]:
        self.auth.authenticate(request.headers, request.query_params)
        limit = self.engine.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("send the audio as multipart/form-data with a `file` field")
        request = Request(request.scope, limited_receive(request.receive, limit))
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
            granularities = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
            want_words = any(isinstance(g, str) and g.strip() == "word" for g in granularities)
            blocks = self._blocks(request, upload)
            try:
                result = await transcribe_blocks(self.engine, recognizer, blocks, language, want_words)
            except AudioError as exc:
                raise ApiError(400, "invalid_audio", "Unsupported or corrupt audio", str(exc)) from None
        finally:
            await form.close()
        log.info("batch %s: %.1f s of audio, model %s", request_id, result.duration, recognizer.spec.name)
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
