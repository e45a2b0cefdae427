"""Credentials: where a client may put them, and whether they are good.

Cartesia's clients send API keys as `Authorization: Bearer`, `X-API-Key` or `?api_key=`, and access tokens as
`Authorization: Bearer` or `?access_token=`. A Bearer value can be either, so it is classified by its shape: a
JWT has two dots, an API key has none (keys with two dots are refused at startup for that reason).

A server without API keys is open: any credential, or none, is let in. Access tokens are still checked when
one is presented, so a browser page that mints and sends tokens behaves the same on an open loopback server
as on a protected one, and a forged or expired token is never silently accepted.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from stenograph import tokens
from stenograph.errors import ApiError, unauthorized

ALL_GRANTS = frozenset(tokens.GRANTS)


@dataclass(frozen=True)
class Principal:
    """Who is calling. Safe to log: keys appear by index, tokens by the key that minted them."""

    kind: str  # "key" | "token" | "open"
    key_id: str  # "key-<index>"; for a token, the key that minted it; "open" on a server without keys
    grants: frozenset[str] = ALL_GRANTS


OPEN = Principal("open", "open")


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", "Forbidden", message)


def extract_credential(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for candidate in (headers.get("x-api-key"), query.get("api_key"), query.get("access_token")):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


class Authenticator:
    def __init__(self, api_keys: tuple[str, ...], token_secret: bytes) -> None:
        if any(tokens.looks_like_token(k) for k in api_keys):
            raise ValueError("an API key must not contain two dots: it would be taken for an access token")
        self._keys = [k.encode() for k in api_keys]
        self._secret = token_secret

    @property
    def open(self) -> bool:
        return not self._keys

    def check_key(self, credential: str) -> Principal | None:
        """Constant-time comparison against every key, so timing reveals neither which key nor how much."""
        given = credential.encode()
        match = None
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(given, key):
                match = index
        return None if match is None else Principal("key", f"key-{match}")

    def check_token(self, credential: str) -> Principal:
        try:
            claims = tokens.verify(self._secret, credential)
        except tokens.TokenError as exc:
            raise unauthorized(str(exc)) from None
        return Principal("token", claims.subject or "open", claims.grants)

    def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str], grant: str | None = "stt"
    ) -> Principal:
        """The one entry point for every STT route, HTTP and WebSocket: 401 for bad credentials, 403 for a
        token without `grant`."""
        credential = extract_credential(headers, query)
        if credential is not None and tokens.looks_like_token(credential):
            principal = self.check_token(credential)
            if grant is not None and grant not in principal.grants:
                raise forbidden(f"this access token does not carry the `{grant}` grant")
            return principal
        if self.open:
            return OPEN
        if credential is None:
            raise unauthorized("missing API key: send Authorization: Bearer <key> or X-API-Key")
        principal = self.check_key(credential)
        if principal is None:
            raise unauthorized("invalid API key or access token")
        return principal

    def authenticate_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Principal:
        """Minting needs an API key: a token, however valid, may not extend itself by minting another."""
        principal = self.authenticate(headers, query, grant=None)
        if principal.kind == "token":
            raise forbidden("access tokens cannot mint access tokens; use an API key")
        return principal

    def mint(self, principal: Principal, grants: frozenset[str], expires_in: int) -> str:
        return tokens.mint(self._secret, grants, expires_in, principal.key_id)
