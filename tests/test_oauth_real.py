"""OAuth 2.0 end to end, all real and local (issue 5): a real `postroom serve` process, the
recipe's django-oauth-toolkit server (plus a second one on the same database whose access
tokens live 6 seconds, see oauth_helpers), and the Postfix + Dovecot upstream, which checks
every XOAUTH2/OAUTHBEARER token with the OAuth server (RFC 7662 introspection).

- sign in through Postroom's own /oauth/start and /oauth/callback (authorization code with
  PKCE and state), tokens stored encrypted, mail delivered with XOAUTH2 and OAUTHBEARER;
- the access token expires: Postroom refreshes it (one token request), the provider rotates
  the refresh token, the new one is kept, mail is delivered;
- an access token revoked before its expiry: SMTP 535, refreshed once, delivered;
- the grant revoked at the provider: the message stays queued (deferred) with the cause and
  the sign-in link, an ``oauth_grant_dead`` event is recorded; signing in again delivers it;
- the device-code flow through `postroom oauth login --device`.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from oauth_helpers import (
    USER,
    DotServer,
    approve_device,
    oauth_connection,
    revoke_at_provider,
    sign_in,
)
from real_servers import raw_message
from serve_proc import Postroom
from sqlalchemy import select

from postroom import settings as settings_mod
from postroom.oauth.store import Grant
from postroom.oauth.tokens import TokenManager
from postroom.oauth.web import ticket
from postroom.queue.sql import Queue
from postroom.runtime import Instance
from postroom.store.db import make_engine
from postroom.store.schema import events, oauth_grants

TTL = 6  # seconds an access token of the test server lives
DELIVERY = "min_backoff = 30\nmax_backoff = 60\npoll_interval = 0.2\nshutdown_grace = 2\n"


class World:
    def __init__(self, root: Path, peers: Any) -> None:
        self.peers = peers
        self.dot = DotServer(peers, root, TTL)
        self.root = root

    def start(self) -> World:
        self.dot.start()
        conns = (
            oauth_connection("dot", self.peers, self.dot)
            + oauth_connection("bearer", self.peers, self.dot, auth="oauthbearer",
                               port=self.peers.smtps_port).replace(
                                   'security = "starttls"', 'security = "smtps"')
            + oauth_connection("dev", self.peers, self.dot, client_id="device-client",
                               secret=None)
            + '[[routes]]\nmatch = { sender = "bearer@app.test" }\nchain = ["bearer"]\n'
            + '[[routes]]\nmatch = { sender = "dev@app.test" }\nchain = ["dev"]\n'
            + '[[routes]]\nchain = ["dot"]\n')
        self.pr = Postroom(self.root / "pr", connections=conns, delivery=DELIVERY).start()
        self.inst = Instance(settings_mod.load(self.pr.config))
        return self

    def stop(self) -> None:
        try:
            self.pr.stop()
            self.inst.close()
        finally:
            self.dot.stop()

    @property
    def tm(self) -> TokenManager:
        return self.inst.oauth

    def link(self, name: str) -> str:
        return f"http://127.0.0.1:{self.pr.http_port}/oauth/start/{name}"

    def signin_link(self, name: str) -> str:
        """The start link with a fresh single-use ticket, as `postroom oauth login` prints."""
        return f"{self.link(name)}?ticket={ticket(self.tm.key, name)}"

    def grant(self, name: str) -> Grant:
        g = self.tm.store.get(name)
        assert g is not None, f"no grant for {name}"
        return g

    def send(self, sender: str, subject: str) -> str:
        """Hand one message to the listener; returns its queue id."""
        raw = raw_message(sender, USER, subject, f"<{uuid.uuid4().hex}@app.test>")
        with smtplib.SMTP("127.0.0.1", self.pr.smtp_port, timeout=30) as s:
            s.ehlo("app.test")
            s.mail(sender)
            s.rcpt(USER)
            code, reply = s.data(raw)
        assert code == 250, reply
        found = re.search(rb"queued as (\S+)", reply)
        assert found, reply
        return found.group(1).decode()

    def wait_status(self, msg_id: str, want: set[str], timeout: float = 30) -> dict[str, Any]:
        engine = make_engine(f"sqlite:///{self.pr.db}")
        queue = Queue(engine)
        deadline = time.monotonic() + timeout
        try:
            while True:
                m = queue.log.get(msg_id)
                if m is not None and m["status"] in want:
                    return m
                if time.monotonic() >= deadline:
                    raise AssertionError(f"message {msg_id} not {want} after {timeout}s: "
                                         f"{m and (m['status'], m['last_error'])}\n"
                                         + self.pr.log.read_text(errors="replace")[-3000:])
                time.sleep(0.1)
        finally:
            engine.dispose()

    def events(self, kind: str) -> list[Any]:
        with self.inst.engine.connect() as c:
            return list(c.execute(select(events).where(events.c.kind == kind)
                                  .order_by(events.c.id)).all())


@pytest.fixture(scope="module")
def world(peers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("oauth"), peers)
    try:
        yield w.start()
    finally:
        w.stop()


def test_sign_in_stores_tokens_encrypted_and_delivers(world: World, unique_subject: str) -> None:
    page = sign_in(world.signin_link("dot"))
    assert page.status_code == 200, page.text
    assert "Signed in" in page.text and "smtp offline_access" in page.text
    g = world.grant("dot")
    assert g.access_token and g.refresh_token and g.grant_type == "authorization_code"
    # The local provider names no account (no ID token, no profile): the grant does not
    # claim the configured username signed in (issue 12).
    assert g.account is None and g.expires_at and 0 < g.expires_at - time.time() <= TTL
    with world.inst.engine.connect() as c:
        row = c.execute(select(oauth_grants).where(oauth_grants.c.connection == "dot")).one()
    # At rest: Fernet ciphertext, never the token itself.
    for plain, stored in ((g.access_token, row.access_token),
                          (g.refresh_token, row.refresh_token)):
        assert stored.startswith("gAAAA") and plain not in stored
    msg_id = world.send("app@app.test", unique_subject)
    world.wait_status(msg_id, {"sent"})
    got = world.peers.wait_for(USER, unique_subject)
    assert "Authenticated sender: testuser@example.test" in str(got["Received"])
    shown = json.loads(world.pr.cli("show", msg_id, "--json").stdout)
    transcript = shown["attempts"][-1]["transcript"]
    assert "C: AUTH XOAUTH2 ********" in transcript and g.access_token not in transcript
    assert world.events("oauth_granted")


def test_oauthbearer_over_implicit_tls(world: World, unique_subject: str) -> None:
    assert sign_in(world.signin_link("bearer")).status_code == 200
    msg_id = world.send("bearer@app.test", unique_subject)
    world.wait_status(msg_id, {"sent"})
    world.peers.wait_for(USER, unique_subject)
    shown = json.loads(world.pr.cli("show", msg_id, "--json").stdout)
    assert "C: AUTH OAUTHBEARER ********" in shown["attempts"][-1]["transcript"]


def test_expired_token_is_refreshed_once_and_the_rotated_refresh_token_kept(
        world: World, unique_subject: str) -> None:
    assert sign_in(world.signin_link("dot")).status_code == 200
    first = world.send("app@app.test", unique_subject + "-1")
    world.wait_status(first, {"sent"})
    before = world.grant("dot")
    assert before.expires_at is not None
    time.sleep(max(0.0, before.expires_at - time.time()) + 0.5)  # now it is expired
    requests = world.dot.token_requests()
    second = world.send("app@app.test", unique_subject + "-2")
    world.wait_status(second, {"sent"})
    world.peers.wait_for(USER, unique_subject + "-2")
    after = world.grant("dot")
    assert after.access_token != before.access_token
    assert after.refresh_token != before.refresh_token  # the provider rotated it: kept
    assert after.refreshes == before.refreshes + 1 and after.generation == before.generation + 1
    assert world.dot.wait_logged(requests + 1) == requests + 1  # one refresh, not one per try
    # The old refresh token is dead at the provider (rotation), the new one works.
    old = httpx.post(f"{world.dot.base}/o/token/", auth=("gateway", "gateway-secret"), data={
        "grant_type": "refresh_token", "refresh_token": before.refresh_token}, timeout=20)
    assert old.json().get("error") == "invalid_grant"


def test_token_refused_before_expiry_is_refreshed_once_on_535(
        world: World, unique_subject: str) -> None:
    assert sign_in(world.signin_link("dot")).status_code == 200
    g = world.grant("dot")
    # An access token the mail server refuses although it has not expired (revoked by the
    # provider alone): stored in place of the real one, as a new generation.
    world.tm.store.update("dot", access_token=f"revoked-{uuid.uuid4().hex}",
                          generation=g.generation + 1, issued_at=time.time() - 60,
                          expires_at=time.time() + 3600)
    requests = world.dot.token_requests()
    # A session the previous test left in the pool is already logged in and would carry
    # this message without an AUTH: wait out the connection's idle_timeout (1 s).
    time.sleep(1.2)
    msg_id = world.send("app@app.test", unique_subject)
    m = world.wait_status(msg_id, {"sent", "deferred"})
    assert m["status"] == "sent", m["last_error"]
    world.peers.wait_for(USER, unique_subject)
    shown = json.loads(world.pr.cli("show", msg_id, "--json").stdout)
    transcript = shown["attempts"][-1]["transcript"]
    assert "refreshing it once" in transcript and transcript.count("S: 535") == 1
    assert transcript.count("S: 235") == 1
    assert world.dot.wait_logged(requests + 1) == requests + 1
    assert world.grant("dot").refreshes == g.refreshes + 1


def test_revoked_grant_defers_explains_alerts_and_renewal_delivers(
        world: World, unique_subject: str) -> None:
    assert sign_in(world.signin_link("dot")).status_code == 200
    g = world.grant("dot")
    assert g.refresh_token
    revoke_at_provider(world.dot.base, g.refresh_token)  # the user withdraws access
    dead_before = len(world.events("oauth_grant_dead"))
    # A session the previous test left in the pool is already logged in and would carry
    # this message without an AUTH (it was sent, once, in CI): wait out the connection's
    # idle_timeout (1 s), as the test above does.
    time.sleep(1.2)
    msg_id = world.send("app@app.test", unique_subject)
    m = world.wait_status(msg_id, {"deferred", "failed", "sent"})
    assert m["status"] == "deferred", (m["status"], m["last_error"])  # kept, not failed
    assert "oauth.invalid_grant" in m["last_error"] and "sign in again" in m["last_error"]
    assert world.link("dot") in m["last_error"]
    dead = world.events("oauth_grant_dead")
    assert len(dead) == dead_before + 1 and dead[-1].connection == "dot"
    assert world.link("dot") in dead[-1].detail
    status = json.loads(world.pr.cli("oauth", "status", "--json").stdout)
    assert {r["connection"]: r["state"] for r in status}["dot"] == "dead"
    # Renew: sign in again; the waiting message goes at once (its backoff is 30 s+).
    assert sign_in(world.signin_link("dot")).status_code == 200
    world.wait_status(msg_id, {"sent"}, timeout=20)
    world.peers.wait_for(USER, unique_subject)
    assert world.grant("dot").state == "ok"
    assert any(e.connection == "dot" for e in world.events("oauth_renewed"))


def test_device_flow_end_to_end(world: World, unique_subject: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom.cli", "oauth", "login", "dev", "--device",
         "--config", str(world.pr.config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**world.pr.env, "COLUMNS": "200"})
    try:
        assert proc.stdout is not None
        shown = ""
        deadline = time.monotonic() + 30
        while "enter the code" not in shown and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            shown += line
        code = re.search(r"enter the code (\S+)", shown)
        assert code, shown
        assert f"{world.dot.base}/o/device" in shown or "127.0.0.1:9000/o/device" in shown
        approve_device(world.dot.base, code.group(1))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, shown + (out or "")
    assert "signed in: connection dev as" in out
    assert world.grant("dev").grant_type == "device_code"
    msg_id = world.send("dev@app.test", unique_subject)
    world.wait_status(msg_id, {"sent"})
    world.peers.wait_for(USER, unique_subject)


def test_status_and_revoke_commands(world: World) -> None:
    assert sign_in(world.signin_link("bearer")).status_code == 200
    out = world.pr.cli("oauth", "status")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "bearer" in text and "not named by the provider" in text
    assert "smtp offline_access" in text
    out = world.pr.cli("oauth", "revoke", "bearer")
    assert out.returncode == 0, out.stderr
    assert "grant removed" in out.stdout.decode() and "revoked at" in out.stdout.decode()
    assert world.tm.store.get("bearer") is None
    rows = json.loads(world.pr.cli("oauth", "status", "--json").stdout)
    bearer = {r["connection"]: r for r in rows}["bearer"]
    assert bearer["state"] == "no_grant" and bearer["sign_in"].endswith("/oauth/start/bearer")
