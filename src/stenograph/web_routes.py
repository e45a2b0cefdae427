"""The live-captions page at `/app` and the endpoint that hands it short-lived access tokens.

The page never sees an API key. It asks `POST /app/token` for an `stt`-only token that lives
`app_token_ttl` seconds (enough to open a WebSocket or start an upload; a session outlives its token once
admitted) and sends that as `?access_token=` or `Authorization: Bearer`.

When the endpoint mints. On an open server (no API keys) it always does: every caller may already
transcribe there, so a token grants nothing new. On a keyed server it mints only when the operator sets
`STENOGRAPH_APP_TOKENS=true`, which means "whoever can load this page may transcribe"; otherwise it answers
403 and the page says how to enable it. Either way a request from another site's page (an `Origin` that is
not this server's) is refused, so a page elsewhere cannot borrow a visitor's access to this server, whatever
the CORS setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from stenograph import logs, tokens
from stenograph.auth import Authenticator, Principal, forbidden
from stenograph.http_routes import error_response, new_request_id

log = logging.getLogger("stenograph.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
APP_PRINCIPAL = Principal("key", "app")
# Only what the page loads: its own files, its own server's HTTP and WebSocket routes, and media from the
# file the user drops (a blob: URL). Nothing from elsewhere, and the page may not be framed. The WebSocket
# origins are spelled out because older Safari does not count ws:/wss: as 'self'.
CSP = (
    "default-src 'self'; connect-src 'self'{sockets}; media-src 'self' blob:; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self)",
}


class PageFiles(StaticFiles):
    """The page's own files with the security headers above on every response."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        host = Headers(scope=scope).get("host", "")
        # A Host header that could break out of the directive gets the policy without those two sources.
        plain = host and all(c.isalnum() or c in ".-:[]" for c in host)
        sockets = f" ws://{host} wss://{host}" if plain else ""
        response.headers["Content-Security-Policy"] = CSP.format(sockets=sockets)
        return response


def same_origin(request: Request) -> bool:
    """Browsers send `Origin` on every POST from a page; a missing one means a non-browser client.

    Hosts are compared, not schemes: behind a TLS-terminating proxy the page is https while the request that
    reaches us is http, and the host is what tells this server's page from another site's.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


class PageTokens:
    """`POST /app/token` -> `{"token": ..., "expires_in": ...}`, an `stt`-only token for the page."""

    def __init__(self, auth: Authenticator, enabled: bool, ttl: int) -> None:
        self.auth = auth
        self.enabled = enabled or auth.open
        self.ttl = ttl

    async def create(self, request: Request) -> JSONResponse:
        request_id = new_request_id()
        logs.request_id.set(request_id)
        if not self.enabled:
            error = forbidden(
                "the live-captions page is not enabled on this server; "
                "its operator can enable it with STENOGRAPH_APP_TOKENS=true"
            )
            return error_response(error, request_id)
        if not same_origin(request):
            return error_response(
                forbidden("page tokens are only issued to this server's own page"), request_id
            )
        token = self.auth.mint(APP_PRINCIPAL, frozenset({"stt"}), self.ttl)
        log.info("minted a page token (stt, %d s)", self.ttl)
        headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
        return JSONResponse({"token": token, "expires_in": self.ttl}, headers=headers)


async def to_page(request: Request) -> Response:
    """`/app` -> `/app/`, relative so that it also works behind a path prefix."""
    return RedirectResponse("app/", status_code=308)


def routes(auth: Authenticator, enabled: bool, ttl: int) -> list[BaseRoute]:
    if not 1 <= ttl <= tokens.MAX_EXPIRES_IN:
        raise ValueError(f"STENOGRAPH_APP_TOKEN_TTL must be between 1 and {tokens.MAX_EXPIRES_IN} seconds")
    page_tokens = PageTokens(auth, enabled, ttl)
    return [
        Route("/app", to_page, methods=["GET"]),
        Route("/app/token", page_tokens.create, methods=["POST"]),
        Mount("/app", PageFiles(directory=STATIC_DIR, html=True), name="app"),
    ]
