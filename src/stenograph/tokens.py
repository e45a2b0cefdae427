"""Access tokens: short-lived HS256 JWTs that a backend mints with its API key and hands to a browser.

Only what the API needs is implemented (one algorithm, one secret), with the standard library, so there is no
JWT dependency whose algorithm negotiation could be turned against us: a token whose header names anything but
HS256 is refused before its signature is even looked at.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("stenograph.auth")

GRANTS = ("stt", "tts", "agent")
MAX_EXPIRES_IN = 3600
# Far larger than any token we mint; bounds the work an attacker can make us do per request.
MAX_TOKEN_CHARS = 4096
ISSUER = "stenograph"
SECRET_FILE = "token-secret"


class TokenError(Exception):
    """The token is malformed, forged or expired; the message is safe to show the client."""


@dataclass(frozen=True)
class Claims:
    grants: frozenset[str]
    subject: str  # which API key minted it (an index like "key-0", or "open")
    expires_at: int
    token_id: str


def looks_like_token(credential: str) -> bool:
    """API keys (`sk_...`) contain no dots; a JWT has exactly two."""
    return credential.count(".") == 2


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("access token is malformed") from None


def _sign(secret: bytes, signing_input: str) -> str:
    return _b64encode(hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest())


def mint(
    secret: bytes, grants: frozenset[str], expires_in: int, subject: str, now: float | None = None
) -> str:
    issued = int(time.time() if now is None else now)
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {
        "grants": {name: True for name in sorted(grants)},
        "jti": uuid.uuid4().hex,
        "iat": issued,
        "iss": ISSUER,
        "exp": issued + expires_in,
        "sub": subject,
    }
    signing_input = ".".join(
        _b64encode(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    return f"{signing_input}.{_sign(secret, signing_input)}"


def verify(secret: bytes, token: str, now: float | None = None) -> Claims:
    if len(token) > MAX_TOKEN_CHARS or not looks_like_token(token) or not token.isascii():
        raise TokenError("access token is malformed")
    header_part, payload_part, signature = token.split(".")
    header = _json_object(header_part)
    if header.get("alg") != "HS256":
        raise TokenError("access token uses an unsupported algorithm")
    if not hmac.compare_digest(_sign(secret, f"{header_part}.{payload_part}"), signature):
        raise TokenError("access token signature is invalid")
    payload = _json_object(payload_part)
    expires_at = payload.get("exp")
    if not isinstance(expires_at, int) or isinstance(expires_at, bool):
        raise TokenError("access token has no expiry")
    if expires_at <= (time.time() if now is None else now):
        raise TokenError("access token has expired")
    raw_grants = payload.get("grants")
    grants = raw_grants if isinstance(raw_grants, dict) else {}
    return Claims(
        grants=frozenset(name for name, allowed in grants.items() if allowed is True),
        subject=str(payload.get("sub", "")),
        expires_at=expires_at,
        token_id=str(payload.get("jti", "")),
    )


def _json_object(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part))
    except (UnicodeDecodeError, ValueError):
        raise TokenError("access token is malformed") from None
    if not isinstance(value, dict):
        raise TokenError("access token is malformed")
    return value


def load_secret(configured: str, state_dir: Path) -> bytes:
    """The configured secret, else one generated on first start and kept (mode 0600) to outlive restarts.

    If the state directory is read-only the server still starts, with a secret that lasts only for this
    process: tokens then stop working at a restart, which is safe, rather than the server failing to start.
    """
    if configured:
        if len(configured) < 32:
            log.warning("STENOGRAPH_TOKEN_SECRET is shorter than 32 characters; tokens are easier to forge")
        return configured.encode()
    path = state_dir / SECRET_FILE
    for _ in range(2):
        try:
            stored = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            secret = secrets.token_urlsafe(48)
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # another server process created it first: use theirs
            except OSError as exc:
                log.warning("cannot store the token secret at %s (%s); it lasts until a restart", path, exc)
                return secret.encode()
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secret + "\n")
            log.info("generated a new access-token secret at %s", path)
            return secret.encode()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the token secret at %s (%s); using a per-process secret", path, exc)
            break
        if stored:
            return stored.encode()
        log.warning("the token secret at %s is empty; using a per-process secret", path)
        break
    return secrets.token_urlsafe(48).encode()
