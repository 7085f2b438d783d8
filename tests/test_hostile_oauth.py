"""Issue 11, point 3: the OAuth sign-in of a real `postroom serve` cannot be taken over.

The provider is a tiny local OpenID-style server in this process (FakeIdP): its authorize
endpoint "signs in" whichever account the request names and redirects back to Postroom; its
token endpoint checks the PKCE verifier and answers with an ID token naming that account.
Every hostile request is refused with a clear page, and after each a legitimate sign-in
(ticket from the instance key, cookie kept by the client) still works.

127.0.0.2 plays a remote client (outside the default admin_networks); 127.0.0.1 without a
ticket plays every internet client behind a same-host TLS proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from serve_proc import Postroom, free_port

from postroom import settings as settings_mod
from postroom.oauth.store import Grant, GrantStore
from postroom.oauth.web import ticket
from postroom.runtime import key_file
from postroom.secrets import Vault, load_or_create_key
from postroom.store.db import make_engine

OWNER = "owner@example.com"
ATTACKER = "attacker@evil.example"
REMOTE = "127.0.0.2"
TIMEOUT = 15.0  # every request in this module


class FakeIdP:
    """Authorization code + PKCE, signed in as the ``X-Test-Account`` header says."""

    def __init__(self) -> None:
        self.codes: dict[str, dict[str, str]] = {}
        self.refresh_tokens: dict[str, str] = {}
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any] | None = None,
                        location: str | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                account = self.headers.get("X-Test-Account")
                if url.path != "/authorize" or not account or q.get("response_type") != "code":
                    self._answer(400, {"error": "invalid_request"})
                    return
                code = secrets.token_urlsafe(16)
                idp.codes[code] = {"account": account, "challenge": q["code_challenge"],
                                   "redirect_uri": q["redirect_uri"]}
                back = q["redirect_uri"] + "?" + urllib.parse.urlencode(
                    {"code": code, "state": q["state"]})
                self._answer(302, location=back)

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(size).decode()))
                if self.path != "/token":
                    self._answer(404)
                    return
                if form.get("grant_type") == "refresh_token":
                    account = idp.refresh_tokens.get(form.get("refresh_token", ""))
                else:
                    got = idp.codes.pop(form.get("code", ""), None)
                    verifier = form.get("code_verifier", "").encode()
                    challenge = base64.urlsafe_b64encode(
                        hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                    ok = got is not None and got["challenge"] == challenge and (
                        got["redirect_uri"] == form.get("redirect_uri"))
                    account = got["account"] if ok and got else None
                if account is None:
                    self._answer(400, {"error": "invalid_grant"})
                    return
                refresh = secrets.token_urlsafe(16)
                idp.refresh_tokens[refresh] = account
                claims = base64.urlsafe_b64encode(json.dumps(
                    {"sub": account, "email": account}).encode()).rstrip(b"=").decode()
                self._answer(200, {
                    "access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                    "expires_in": 3600, "refresh_token": refresh, "scope": "mail",
                    "id_token": f"eyJhbGciOiJub25lIn0.{claims}."})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeIdP:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _connection(name: str, idp: FakeIdP, identity: str) -> str:
    oauth = (f'oauth = {{ provider = "generic", client_id = "postroom", client_secret = "s", '
             f'authorize_url = "{idp.base}/authorize", token_url = "{idp.base}/token", '
             'scopes = ["mail"] }\n')
    # Nothing is delivered in this module: the upstream port only has to be valid.
    return (f'[[connections]]\nname = "{name}"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
            f'port = {free_port()}\nsecurity = "none"\nauth = "xoauth2"\n{identity}{oauth}')


class World:
    def __init__(self, pr: Postroom, idp: FakeIdP) -> None:
        self.pr = pr
        self.idp = idp
        self.base = f"http://127.0.0.1:{pr.http_port}"
        self.key = load_or_create_key(key_file(settings_mod.load(pr.config)))

    def ticket(self, name: str = "owner") -> str:
        return ticket(self.key, name)

    def start_link(self, name: str = "owner", tick: str | None = None) -> str:
        return f"{self.base}/oauth/start/{name}?ticket={tick or self.ticket(name)}"

    def grant(self, name: str = "owner") -> Grant | None:
        engine = make_engine(f"sqlite:///{self.pr.db}")
        try:
            return GrantStore(engine, Vault(self.key)).get(name)
        finally:
            engine.dispose()

    def events(self, kind: str) -> list[str]:
        with sqlite3.connect(self.pr.db, timeout=TIMEOUT) as db:
            rows = db.execute("SELECT detail FROM events WHERE kind = ? ORDER BY id",
                              (kind,)).fetchall()
        return [str(r[0]) for r in rows]

    def pending(self) -> int:
        with sqlite3.connect(self.pr.db, timeout=TIMEOUT) as db:
            return int(db.execute("SELECT count(*) FROM oauth_pending WHERE state NOT LIKE "
                                  "'ticket:%'").fetchone()[0])

    def to_callback(self, http: httpx.Client, link: str, account: str) -> str:
        """Open the start link and sign in at the provider; the callback URL it sends the
        browser back to (not opened yet)."""
        start = http.get(link)
        assert start.status_code == 302, (start.status_code, start.text)
        back = http.get(start.headers["location"], headers={"X-Test-Account": account})
        assert back.status_code == 302, back.text
        return str(back.headers["location"])

    def sign_in(self, account: str = OWNER, name: str = "owner") -> httpx.Response:
        """A legitimate sign-in from this machine, as a browser does it."""
        with client() as http:
            return http.get(self.to_callback(http, self.start_link(name), account))

    def signed_in_ok(self, name: str = "owner", account: str = OWNER) -> None:
        page = self.sign_in(account, name)
        assert page.status_code == 200 and "Signed in" in page.text, page.text
        g = self.grant(name)
        assert g is not None and g.account == account


def client(source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT, follow_redirects=False,
                        transport=httpx.HTTPTransport(local_address=source))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with FakeIdP() as idp:
        conns = (_connection("owner", idp, f'username = "{OWNER}"\n')
                 + '[[connections]]\nname = "anyone"\ntransport = "msgraph"\n'
                 f'oauth = {{ provider = "generic", client_id = "postroom", client_secret = '
                 f'"s", authorize_url = "{idp.base}/authorize", token_url = "{idp.base}/token",'
                 ' scopes = ["mail"] }\n')
        pr = Postroom(tmp_path_factory.mktemp("hostile-oauth"), connections=conns)
        pr.start()
        try:
            yield World(pr, idp)
        finally:
            pr.stop()


def test_start_without_a_ticket_is_refused_even_from_this_machine(world: World) -> None:
    before = world.pending()
    with client() as http:  # 127.0.0.1: what every client is behind a same-host proxy
        bare = http.get(f"{world.base}/oauth/start/owner")
        assert bare.status_code == 403 and "location" not in bare.headers
        assert "postroom oauth login owner" in bare.text
        # The old ticket format (expiry.mac) and a ticket for another connection: refused.
        old = http.get(f"{world.base}/oauth/start/owner?ticket=9999999999.{'0' * 32}")
        assert old.status_code == 403 and "not valid for connection owner" in old.text
        other = http.get(world.start_link("owner", ticket(world.key, "anyone")))
        assert other.status_code == 403
    # From outside admin_networks even a valid ticket is not enough, and is not spent.
    good = world.ticket()
    with client(REMOTE) as http:
        far = http.get(world.start_link("owner", good))
    assert far.status_code == 403 and "server.admin_networks" in far.text
    assert world.pending() == before  # no authorization was started by any of these
    with client() as http:  # the same ticket, legitimately: it still works
        page = http.get(world.to_callback(http, world.start_link("owner", good), OWNER))
    assert page.status_code == 200 and "Signed in" in page.text


def test_a_ticket_starts_one_sign_in_only(world: World) -> None:
    tick = world.ticket()
    with client() as http:
        first = http.get(world.start_link("owner", tick))
        assert first.status_code == 302
        again = http.get(world.start_link("owner", tick))
    assert again.status_code == 403 and "already used" in again.text
    # Many at once with one fresh ticket: exactly one wins (the database decides).
    racing = world.ticket()

    def use(_: int) -> int:
        with client() as http:
            return http.get(world.start_link("owner", racing)).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(use, range(8)))
    assert sorted(codes) == [302] + [403] * 7, codes
    # A restart forgets nothing: the used ticket stays used.
    world.pr.stop()
    world.pr.start()
    with client() as http:
        assert http.get(world.start_link("owner", tick)).status_code == 403
    world.signed_in_ok()


def test_callback_is_finished_only_in_the_browser_that_started_it(world: World) -> None:
    world.signed_in_ok()
    before = world.grant()
    assert before is not None
    with client() as victim:
        start = victim.get(world.start_link())
        cookie = start.headers["set-cookie"]
        name = cookie.split("=", 1)[0]
        low = cookie.lower()
        assert name.startswith("postroom_oauth_") and "httponly" in low
        assert "samesite=lax" in low and "path=/oauth" in low and "secure" not in low
        back = victim.get(start.headers["location"], headers={"X-Test-Account": OWNER})
        callback = str(back.headers["location"])
        # The callback URL in another browser: without the cookie, then with a wrong one.
        with client() as other:
            bare = other.get(callback)
            forged = other.get(callback, headers={"Cookie": f"{name}={'0' * 32}"})
        for page in (bare, forged):
            assert page.status_code == 400 and "not started in this browser" in page.text
        after = world.grant()
        assert after is not None and after.access_token == before.access_token
        # Nothing was spent: the browser that started it finishes it.
        done = victim.get(callback)
    assert done.status_code == 200 and "Signed in" in done.text
    assert name in done.headers.get("set-cookie", "")  # the cookie is cleared
    now = world.grant()
    assert now is not None and now.access_token != before.access_token


def test_sign_in_as_another_account_keeps_the_old_grant(world: World) -> None:
    world.signed_in_ok()
    before = world.grant()
    assert before is not None
    refused_before = len(world.events("oauth_account_refused"))
    page = world.sign_in(ATTACKER)
    assert page.status_code == 400 and "Signed in as the wrong account" in page.text
    assert OWNER in page.text and ATTACKER in page.text
    assert "were not stored" in page.text and "change its username" in page.text
    kept = world.grant()
    assert kept is not None and kept.account == OWNER
    assert kept.access_token == before.access_token
    assert kept.refresh_token == before.refresh_token
    refused = world.events("oauth_account_refused")
    assert len(refused) == refused_before + 1 and ATTACKER in refused[-1]
    # The same account in other letter case is the same account; the owner still signs in.
    assert world.sign_in(OWNER.upper()).status_code == 200
    world.signed_in_ok()


def test_forged_host_header_is_refused(world: World) -> None:
    tick = world.ticket()
    port = world.pr.http_port
    with client() as http:
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
            r = http.get(world.start_link("owner", tick), headers={"Host": host})
            assert r.status_code == 421 and "server.allowed_hosts" in r.text, (host, r.text)
        r = http.get(f"{world.base}/oauth/callback?state=x&code=y",
                     headers={"Host": "evil.example"})
        assert r.status_code == 421
    # HTTP/1.0 without any Host header.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"GET /oauth/start/owner?ticket={tick} HTTP/1.0\r\n\r\n".encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 421") and b"no Host header" in got
    # The ticket was not spent by the refused requests; localhost is a name Postroom has.
    with client() as http:
        start = http.get(world.start_link("owner", tick).replace("127.0.0.1", "localhost"))
    assert start.status_code == 302
    world.signed_in_ok()


def test_cli_link_signs_in_and_a_connection_naming_nobody_says_who(world: World) -> None:
    out = world.pr.cli("oauth", "login", "owner")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    link = next(w for w in text.split() if "/oauth/start/owner?ticket=" in w)
    assert "15 minutes" in text
    with client() as http:
        page = http.get(world.to_callback(http, link, OWNER))
    assert page.status_code == 200 and OWNER in page.text
    notes = len(world.events("oauth_account_note"))
    page = world.sign_in(ATTACKER, name="anyone")
    assert page.status_code == 200 and f"now sends as {ATTACKER}" in page.text
    assert len(world.events("oauth_account_note")) == notes + 1
    g = world.grant("anyone")
    assert g is not None and g.account == ATTACKER
