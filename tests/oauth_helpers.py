"""Helpers for the OAuth tests: a second django-oauth-toolkit server with a short access-token
lifetime, sign-in without a browser, connection snippets.

The second server (tests/peers/oauth/oauthsrv.py, the recipe's own file) runs on a free port
with ``OAUTH_ACCESS_TTL`` of a few seconds and the *same* database as the recipe's server on
:9000. Dovecot asks :9000 about every XOAUTH2/OAUTHBEARER token (RFC 7662 introspection), and
:9000 reads the tokens this one issued from the shared database, with the expiry this one
gave them: so tokens really expire within the test, and the mail server really refuses them
afterwards. Its request log (one line per request) counts the token requests Postroom made.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
from conftest import RECIPES_DIR, free_port

USER = "testuser@example.test"
SECRET = "gateway-secret"


class DotServer:
    def __init__(self, peers: Any, log_dir: Path, ttl: int) -> None:
        self.peers = peers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"dot-{self.port}.log"
        self.ttl = ttl
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DotServer:
        venv = Path(os.environ.get("PEERS_VENV", self.peers.state_dir / "venv"))
        env = {**os.environ, "OAUTH_DB": str(self.peers.state_dir / "oauth" / "db.sqlite3"),
               "OAUTH_ACCESS_TTL": str(self.ttl)}
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "python"), str(RECIPES_DIR / "oauth" / "oauthsrv.py"),
             "runserver", f"127.0.0.1:{self.port}", "--noreload", "--insecure"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the second OAuth server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def token_requests(self) -> int:
        """POSTs to the token endpoint so far (its request log)."""
        return len(re.findall(r'"POST /o/token/ HTTP', self.log.read_text(errors="replace")))

    def wait_logged(self, count: int, timeout: float = 5.0) -> int:
        """The request log is written after the response: wait until it shows ``count``."""
        deadline = time.monotonic() + timeout
        while self.token_requests() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.token_requests()


def oauth_connection(name: str, peers: Any, dot: DotServer, *, client_id: str = "gateway",
                     secret: str | None = SECRET, user: str = USER, port: int | None = None,
                     auth: str = "xoauth2", extra: str = "") -> str:
    """An SMTP connection to the Postfix peer's submission port that logs in with OAuth
    through a generic provider: the test server's discovery document and device endpoint."""
    secret_line = f', client_secret = "{secret}"' if secret else ""
    return (
        f'[[connections]]\nname = "{name}"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
        f'port = {port or peers.submission_port}\nsecurity = "starttls"\n'
        f'ca_file = "{peers.ca_file}"\nauth = "{auth}"\nusername = "{user}"\n'
        f"connect_timeout = 5\ntimeout = 20\nidle_timeout = 1\n{extra}"
        f'oauth = {{ provider = "generic", client_id = "{client_id}"{secret_line}, '
        f'discovery_url = "{dot.base}/o/.well-known/oauth-authorization-server", '
        f'device_url = "{dot.base}/o/device-authorization/", '
        f'scopes = ["smtp", "offline_access"] }}\n')


def sign_in(start_link: str, user: str = USER) -> httpx.Response:
    """The authorization-code flow without a browser: Postroom's start link -> the
    provider's authorize endpoint (the user "logged in" by the recipe's test-only header,
    client without a consent page) -> Postroom's callback. Returns the callback's answer."""
    with httpx.Client(timeout=20) as http:
        start = http.get(start_link)
        assert start.status_code == 302, (start.status_code, start.text[:2000])
        authorize = start.headers["location"]
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize).query))
        assert q["code_challenge_method"] == "S256" and q["state"] and q["code_challenge"], q
        back = http.get(authorize, headers={"X-Test-User": user})
        assert back.status_code == 302, (back.status_code, back.text[:2000])
        return http.get(back.headers["location"])


def approve_device(dot_base: str, user_code: str, user: str = USER,
                   client_id: str = "device-client") -> None:
    """What the user does on their phone: enter the code, accept (recipe's test header)."""
    with httpx.Client(timeout=20, headers={"X-Test-User": user}) as http:
        http.post(f"{dot_base}/o/device/", data={"user_code": user_code})
        r = http.post(f"{dot_base}/o/device-confirm/{client_id}/{user_code}",
                      data={"action": "accept"})
        assert r.status_code < 400, (r.status_code, r.text[:2000])


def revoke_at_provider(dot_base: str, refresh_token: str) -> None:
    """The user withdraws access at the provider (RFC 7009 on the refresh token)."""
    r = httpx.post(f"{dot_base}/o/revoke_token/", data={
        "token": refresh_token, "token_type_hint": "refresh_token"},
        auth=("gateway", SECRET), timeout=20)
    assert r.status_code == 200, r.text
