"""API keys of the HTTP API: taken from the ``Authorization`` header and checked before any
request body is read (RFC 6750 section 2.1: ``Authorization: Bearer NAME.SECRET``).

The HTTP front checks the key from the headers alone, so an unauthenticated client cannot
make the server read, buffer or parse a body; it then hands the app's name to the API's
dispatcher (ingress.api_dispatch) in the ASGI scope (:data:`AUTH_STATE`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from postroom.apps import Apps

# scope["state"][AUTH_STATE]: the app the front authenticated this request as.
AUTH_STATE = "postroom.api_app"
CHALLENGE = 'Bearer realm="postroom"'
# Longer tokens are refused without a look-up: `postroom app add` prints far shorter ones.
MAX_TOKEN = 300
_KEY_FIX = ("send 'Authorization: Bearer NAME.SECRET' with the key `postroom app add NAME` "
            "printed")


@dataclass(frozen=True)
class Refusal:
    """Why a request is not authenticated: its 401 error (code, message, fix) and the
    ``WWW-Authenticate`` challenge to send with it."""

    code: str
    message: str
    fix: str
    challenge: str


def bearer_token(authorization: str | None) -> str | Refusal:
    """The token of an ``Authorization: Bearer TOKEN`` header, or why there is none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        given = "no API key" if authorization is None else (
            "the Authorization header is not a Bearer token")
        return Refusal("auth.missing", given, _KEY_FIX, CHALLENGE)
    return token.strip()


_INVALID = Refusal(
    "auth.invalid", "unknown or revoked API key",
    "check the key (NAME.SECRET as `postroom app add NAME` printed it); `postroom app list` "
    "shows the apps", f'{CHALLENGE}, error="invalid_token"')


class KeyChecker:
    """Checks API keys, remembering those verified in the last ``ttl`` seconds (by SHA-256 of
    the token, never the token) so a busy app's requests skip even the cheap re-check: a
    SELECT on a thread. A key removed with `postroom app remove` stops working within
    ``ttl`` (plus the app cache's own second, postroom.apps.POLICY_TTL)."""

    def __init__(self, ttl: float = 1.0, size: int = 1024) -> None:
        self.ttl, self.size = ttl, size
        self._seen: dict[bytes, tuple[str, float]] = {}
        # Checks run on threads of their own: a burst of bad keys must not queue ahead of
        # the database writes that share the default executor. Threads start on first use.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="api-auth")

    async def check(self, apps: Apps, authorization: str | None) -> str | Refusal:
        """The app the ``Authorization`` header's key belongs to, or why it is refused."""
        token = bearer_token(authorization)
        if isinstance(token, Refusal):
            return token
        if len(token) > MAX_TOKEN or "." not in token:
            return _INVALID
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._seen.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        app = await asyncio.get_running_loop().run_in_executor(
            self._pool, apps.verify_api_key, token)
        if app is None:
            return _INVALID
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen[digest] = (app, time.monotonic() + self.ttl)
        return app

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
