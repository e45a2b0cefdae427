"""The ASGI application: routes, the shared engine's lifetime, and the last-resort error handler.

`app.state` carries what the transports share: `engine`, `settings`, `auth` (Authenticator), `limits`
(SessionLimiter) and `shutdown` (ShutdownCoordinator; its docstring is the contract for long sessions).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from stenograph import metrics, protocol, tokens, web_routes
from stenograph.asr import Engine
from stenograph.auth import Authenticator
from stenograph.config import Settings
from stenograph.errors import ApiError
from stenograph.http_routes import BatchRoutes, TokenRoutes, error_response, new_request_id
from stenograph.limits import SessionLimiter
from stenograph.models import ModelError
from stenograph.shutdown import ShutdownCoordinator
from stenograph.turn_routes import TurnStream
from stenograph.ws_routes import ManualStream

log = logging.getLogger("stenograph")


def create_app(settings: Settings, engine: Engine | None = None, preload: bool = True) -> Starlette:
    engine = engine or Engine(settings)
    secret = tokens.load_secret(settings.token_secret, settings.state_dir or settings.model_dir)
    auth = Authenticator(settings.api_keys, secret)
    limits = SessionLimiter(settings.max_sessions, settings.max_sessions_per_key)
    shutdown = ShutdownCoordinator(limits, settings.shutdown_grace_seconds)
    batch = BatchRoutes(engine, auth, limits)
    access_tokens = TokenRoutes(auth, settings.token_default_ttl, settings.upload_idle_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if preload:
            engine.preload(["ink-whisper", "ink-2"])
        yield
        engine.close()

    async def on_model_error(request: Request, exc: Exception) -> Response:
        log.error("model unavailable: %s", exc)
        return error_response(
            ApiError(503, "model_unavailable", "Model unavailable", str(exc)), new_request_id()
        )

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, new_request_id())

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """Routing errors (unknown path, wrong method) in the API's JSON error shape, not Starlette's text."""
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        error = ApiError(exc.status_code, code, exc.detail, message, exc.headers)
        return error_response(error, new_request_id())

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request_id = new_request_id()
        log.exception("internal error, request %s", request_id)
        message = f"unexpected server error (request {request_id})"
        return error_response(ApiError(500, "internal_error", "Internal error", message), request_id)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        """Ready = models loaded and not draining, so a load balancer stops routing here on SIGTERM."""
        if shutdown.is_draining or not engine.ready:
            reason = "shutting down" if shutdown.is_draining else "models loading"
            error = ApiError(503, "not_ready", "Not ready", reason)
            return JSONResponse(protocol.http_error_body(error, new_request_id()), status_code=503)
        return JSONResponse({"ok": True, "active_sessions": limits.active})

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    routes = [
        Route("/", batch.status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/access-token", access_tokens.create, methods=["POST"]),
        Route("/stt", batch.transcribe, methods=["POST"]),
        Route("/audio/transcriptions", batch.transcribe, methods=["POST"]),
        Route("/v1/audio/transcriptions", batch.transcribe, methods=["POST"]),
        WebSocketRoute("/stt/websocket", ManualStream(engine, auth, limits, shutdown).handle),
        WebSocketRoute("/stt/turns/websocket", TurnStream(engine, auth, limits, shutdown).handle),
    ]
    routes.extend(web_routes.routes(auth, settings.app_tokens, settings.app_token_ttl))
    if settings.metrics:
        routes.append(Route("/metrics", prometheus, methods=["GET"]))
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["X-Request-Id"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ModelError: on_model_error,
            ApiError: on_api_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.auth = auth
    app.state.limits = limits
    app.state.shutdown = shutdown
    return app
