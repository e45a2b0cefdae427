"""The ASGI application: routes, the shared engine's lifetime, and the last-resort error handler."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stenograph.asr import Engine
from stenograph.auth import Authenticator
from stenograph.config import Settings
from stenograph.errors import ApiError
from stenograph.http_routes import BatchRoutes, error_response, new_request_id
from stenograph.models import ModelError

log = logging.getLogger("stenograph")


def create_app(settings: Settings, engine: Engine | None = None, preload: bool = True) -> Starlette:
    engine = engine or Engine(settings)
    auth = Authenticator(settings.api_keys)
    batch = BatchRoutes(engine, auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if preload:
            engine.preload(["ink-whisper", "ink-2"])
        yield
        engine.close()

    async def on_model_error(request: Request, exc: Exception) -> Response:
        log.error("model unavailable: %s", exc)
        return error_response(ApiError(503, "model_unavailable", "Model unavailable", str(exc)), new_request_id())

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, new_request_id())

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request_id = new_request_id()
        log.exception("internal error, request %s", request_id)
        error = ApiError(500, "internal_error", "Internal error", f"unexpected server error (request {request_id})")
        return JSONResponse(
            {"error_code": error.error_code, "title": error.title, "message": error.message, "request_id": request_id},
            status_code=500,
        )

    routes = [
        Route("/", batch.status, methods=["GET"]),
        Route("/stt", batch.transcribe, methods=["POST"]),
        Route("/audio/transcriptions", batch.transcribe, methods=["POST"]),
        Route("/v1/audio/transcriptions", batch.transcribe, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ModelError: on_model_error, ApiError: on_api_error, Exception: on_unexpected},
    )
    app.state.engine = engine
    app.state.settings = settings
    return app
