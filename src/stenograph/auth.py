"""Credentials: where a client may put them, and whether they are good.

Cartesia's clients send API keys as `Authorization: Bearer`, `X-API-Key` or `?api_key=`, and access tokens as
`Authorization: Bearer` or `?access_token=`. A Bearer value can be either, so it is classified by its shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from stenograph.errors import unauthorized


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key (by index, never by value, so it is safe to log) or an open server."""

    kind: str  # "key" | "open"
    key_id: str


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
    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in api_keys]

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

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Principal:
        if self.open:
            return Principal("open", "open")
        credential = extract_credential(headers, query)
        if credential is None:
            raise unauthorized("missing API key: send Authorization: Bearer <key> or X-API-Key")
        principal = self.check_key(credential)
        if principal is None:
            raise unauthorized("invalid API key or access token")
        return principal
