"""Web Push alerts (issue 15): a local HTTPS push endpoint (a private CA, trusted through
SSL_CERT_FILE) that checks the VAPID JWT (aud, exp, sub, ES256 signature with the instance's
public key) and decrypts the body with the subscription's private key and auth secret
(RFC 8291 aes128gcm, written here with cryptography: not the library that encrypted it);
410 deletes that subscription; public addresses only by default; the subscribe endpoint of
the web admin (auth, CSRF, caps, bad input); the service worker's answer; and headless
Chromium clicking "Send alerts to this browser"."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from admin_browser import (
    ADMIN,
    VIEWER,
    AdminServer,
    assert_clean,
    login,
    shot,
    signed_in,
    wait_for,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from diag_helpers import https_server, make_ca, make_cert, server_context
from migration_helpers import migrate_to, tables
from sqlalchemy import Engine, insert, select

from postroom.alerts import Alert, Change, ChannelConfig, make_channel, outbound, vapid
from postroom.alerts import subscriptions as subs
from postroom.alerts.config import AlertRule
from postroom.exceptions import AlertError, ConfigError
from postroom.runtime import key_file
from postroom.secrets import SecretStore, load_or_create_key
from postroom.settings import Settings, load
from postroom.store.schema import admin_accounts, webpush_subscriptions

SUBJECT = "mailto:ops@example.com"


# -- the browser's side: its keys, and RFC 8291 decryption ------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """A subscription as a browser makes it: a P-256 key pair and a 16-byte auth secret."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)

    def json(self) -> bytes:
        return json.dumps({"endpoint": self.endpoint, "expirationTime": None,
                           "keys": {"p256dh": b64url(self.public),
                                    "auth": b64url(self.auth)}}).encode()

    def decrypt(self, body: bytes) -> bytes:
        """RFC 8291 3.4 and RFC 8188 2: one aes128gcm record."""
        salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender = body[21:21 + idlen]
        ciphertext = body[21 + idlen:]
        assert idlen == 65 and len(ciphertext) <= rs
        shared = self.key.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), sender))
        ikm = HKDF(hashes.SHA256(), 32, salt=self.auth,
                   info=b"WebPush: info\x00" + self.public + sender).derive(shared)
        cek = HKDF(hashes.SHA256(), 16, salt=salt,
                   info=b"Content-Encoding: aes128gcm\x00").derive(ikm)
        nonce = HKDF(hashes.SHA256(), 12, salt=salt,
                     info=b"Content-Encoding: nonce\x00").derive(ikm)
        padded = AESGCM(cek).decrypt(nonce, ciphertext, None).rstrip(b"\x00")
        assert padded.endswith(b"\x02")  # the last record's delimiter
        return padded[:-1]


def check_vapid(header: str, public: str, aud: str) -> dict[str, Any]:
    """RFC 8292: ``vapid t=<JWT>, k=<key>``; the JWT's ES256 signature by ``public``."""
    scheme, _, params = header.partition(" ")
    assert scheme == "vapid"
    parts = dict(p.strip().split("=", 1) for p in params.split(","))
    assert parts["k"] == public
    head, claims, sig = parts["t"].split(".")
    assert json.loads(unb64(head)) == {"typ": "JWT", "alg": "ES256"}
    raw = unb64(sig)
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(public))
    key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big")),
               f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    body: dict[str, Any] = json.loads(unb64(claims))
    assert body["aud"] == aud and body["sub"] == SUBJECT
    assert time.time() < body["exp"] <= time.time() + 24 * 3600
    return body


# -- a push service on 127.0.0.1, https with a private CA --------------------------------------
class PushService:
    """Records each POST; ``status[path]`` answers (201 by default)."""

    def __init__(self, folder: Path) -> None:
        ca = make_ca(folder, "Push Test CA")
        self.ca_file = ca.path
        cert, key = make_cert(ca, folder, ["localhost", "127.0.0.1"])
        self.context: ssl.SSLContext = server_context(cert, key)
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.status: dict[str, int] = {}
        self.port = 0

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def on(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.got if p == path]

    @contextlib.contextmanager
    def running(self) -> Iterator[PushService]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                service.got.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                    body))
                self.send_response(service.status.get(self.path, 201))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        with https_server(Handler, self.context) as server:
            self.port = server.server_address[1]
            yield self


@pytest.fixture
def push(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PushService]:
    service = PushService(tmp_path / "ca")
    # The channel's HTTPS client trusts the system's CAs, or SSL_CERT_FILE's (httpx).
    monkeypatch.setenv("SSL_CERT_FILE", str(service.ca_file))
    with service.running():
        yield service


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    return load(path, connections=False)


def store_of(engine: Engine, settings: Settings) -> SecretStore:
    return SecretStore(engine, load_or_create_key(key_file(settings)))


def account(engine: Engine, name: str, role: str = "admin") -> None:
    with engine.begin() as conn:
        conn.execute(insert(admin_accounts).values(
            name=name, password_hash="x", role=role, created_at=0.0, password_changed_at=0.0,
            failed_logins=0))


def alert(severity: str = "error", key: str = "k1", connection: str | None = "primary"
          ) -> Alert:
    return Alert(key, "ops", Change.OPENED, severity, "connection_down",
                 "connection primary is down", "primary: connection refused", time.time(),
                 connection)


def send(engine: Engine, settings: Settings, url: str, a: Alert, **rule: Any) -> None:
    r = AlertRule(channels=[url], webpush_subject=SUBJECT, **rule)
    channel = make_channel(ChannelConfig(url, rule=r, settings=settings, engine=engine))
    asyncio.run(channel.send(a))


LOCAL = {"webpush_networks": ["127.0.0.0/8", "::1/128"]}


# -- the channel ------------------------------------------------------------------------------
def test_push_is_signed_and_decrypts_to_the_alert(engine: Engine, settings: Settings,
                                                  push: PushService) -> None:
    store = store_of(engine, settings)
    account(engine, "alice")
    browser = Browser(push.url("/sub/alice"))
    subs.add(engine, store.vault, "alice", browser.json(), "Chrome Linux")
    sent = alert()
    send(engine, settings, "webpush://admins", sent, **LOCAL)

    ((headers, body),) = push.on("/sub/alice")
    public = vapid.public_key(vapid.private_key(store))
    check_vapid(headers["authorization"], public, f"https://localhost:{push.port}")
    assert headers["content-encoding"] == "aes128gcm"
    assert (headers["ttl"], headers["urgency"]) == ("86400", "high")
    assert headers["host"] == f"localhost:{push.port}"
    got = json.loads(browser.decrypt(body))
    assert got == {**sent.as_dict(), "url": "/admin/connections/primary"}
    (row,) = subs.of_account(engine, "alice")
    assert row.sent_at is not None

    # a warning: shorter TTL, normal urgency; a kind-less page is the events page
    send(engine, settings, "webpush://all", alert("warning", "k2", None), **LOCAL)
    headers, body = push.on("/sub/alice")[-1]
    assert (headers["ttl"], headers["urgency"]) == ("43200", "normal")
    assert json.loads(browser.decrypt(body))["url"] == "/admin/events?kind=connection_down"


def test_gone_subscription_is_deleted_and_a_retry_skips_those_served(
        engine: Engine, settings: Settings, push: PushService) -> None:
    store = store_of(engine, settings)
    account(engine, "alice")
    account(engine, "bob")
    for name in ("alice", "bob", "carol"):
        subs.add(engine, store.vault, "bob" if name == "carol" else name,
                 Browser(push.url(f"/sub/{name}")).json(), name)
    push.status["/sub/bob"] = 410  # bob unsubscribed at the push service
    push.status["/sub/carol"] = 503  # carol's push service is down for now
    with pytest.raises(AlertError) as err:
        send(engine, settings, "webpush://admins", alert(), **LOCAL)
    assert not err.value.permanent and "503" in err.value.message
    assert [s.label for s in subs.of_account(engine, "bob")] == ["carol"]  # bob's went
    assert len(push.on("/sub/alice")) == 1

    push.status["/sub/carol"] = 201
    send(engine, settings, "webpush://admins", alert(), **LOCAL)  # the outbox's retry
    assert len(push.on("/sub/alice")) == 1  # alice had it: not twice
    assert len(push.on("/sub/carol")) == 2


def test_audiences(engine: Engine, settings: Settings, push: PushService) -> None:
    store = store_of(engine, settings)
    account(engine, "alice")
    account(engine, "vic", role="viewer")
    subs.add(engine, store.vault, "alice", Browser(push.url("/a")).json(), "a")
    subs.add(engine, store.vault, "vic", Browser(push.url("/v")).json(), "v")
    send(engine, settings, "webpush://admins", alert(key="1"), **LOCAL)
    assert (len(push.on("/a")), len(push.on("/v"))) == (1, 0)
    send(engine, settings, "webpush://all", alert(key="2"), **LOCAL)
    send(engine, settings, "webpush://account/vic", alert(key="3"), **LOCAL)
    assert (len(push.on("/a")), len(push.on("/v"))) == (2, 2)
    with pytest.raises(AlertError, match="names no browsers") as bad:  # config checks it too
        asyncio.run(make_channel(ChannelConfig("webpush://everyone", settings=settings,
                                               engine=engine)).send(alert(key="4")))
    assert bad.value.permanent
    with pytest.raises(AlertError, match="no browser is subscribed") as none:
        send(engine, settings, "webpush://account/nobody", alert(key="5"), **LOCAL)
    assert not none.value.permanent  # retried: someone may subscribe meanwhile


def test_public_addresses_only_unless_allowed(engine: Engine, settings: Settings,
                                              push: PushService) -> None:
    store = store_of(engine, settings)
    account(engine, "alice")
    subs.add(engine, store.vault, "alice", Browser(push.url("/a")).json(), "a")
    with pytest.raises(AlertError, match="not public"):
        send(engine, settings, "webpush://admins", alert())
    assert push.got == []
    for ip, ok in [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False),
                   ("10.1.2.3", False), ("169.254.169.254", False), ("::ffff:127.0.0.1", False),
                   ("::1", False), ("192.168.1.1", False), ("100.64.0.1", False)]:
        assert outbound.allowed_address(ip, []) is ok, ip
    assert outbound.allowed_address("10.1.2.3", outbound.networks(["10.0.0.0/8"]))


def test_vapid_key_is_made_once_and_kept_encrypted(engine: Engine, settings: Settings) -> None:
    store = store_of(engine, settings)
    first = vapid.public_key(vapid.private_key(store))
    assert vapid.public_key(vapid.private_key(store_of(engine, settings))) == first
    assert len(unb64(first)) == 65
    from postroom.store.schema import secrets

    with engine.connect() as conn:
        stored = conn.execute(select(secrets.c.ciphertext).where(
            secrets.c.name == vapid.NAME)).scalar_one()
    assert "PRIVATE KEY" not in stored and "PRIVATE KEY" in store.vault.decrypt(stored)


def test_subscription_checks(engine: Engine, settings: Settings) -> None:
    store = store_of(engine, settings)
    account(engine, "alice")
    good = Browser("https://push.example.net/x")
    for body, words in [
        (b"{", "not JSON"),
        (b"[]", "no keys"),
        (Browser("http://push.example.net/x").json(), "not https"),
        (Browser("https://push.example.net/" + "x" * 1100).json(), "longer than"),
        (Browser("https://user@push.example.net/x").json(), "user name"),
        (good.json().replace(b'"auth": "', b'"auth": "AA'), "auth is 18 bytes"),
        (json.dumps({"endpoint": good.endpoint, "keys": {"p256dh": b64url(b"\x04" + b"\x01" * 64),
                                                         "auth": b64url(good.auth)}}).encode(),
         "not a P-256"),
        (b" " * 5000, "larger than"),
    ]:
        with pytest.raises(subs.SubscriptionRefused, match=words):
            subs.add(engine, store.vault, "alice", body, "x")
    for i in range(subs.MAX_PER_ACCOUNT):
        subs.add(engine, store.vault, "alice", Browser(f"https://p.example.net/{i}").json(), "x")
    subs.add(engine, store.vault, "alice", Browser("https://p.example.net/0").json(), "again")
    with pytest.raises(subs.SubscriptionRefused, match="remove one first"):
        subs.add(engine, store.vault, "alice", Browser("https://p.example.net/new").json(), "x")
    with engine.connect() as conn:
        keys = conn.execute(select(webpush_subscriptions.c.secret)).scalars().all()
    assert len(keys) == subs.MAX_PER_ACCOUNT and all("auth" not in k for k in keys)


def test_config_errors(tmp_path: Path) -> None:
    def cfg(body: str) -> None:
        path = tmp_path / "postroom.toml"
        path.write_text(f'[server]\ndata_dir = "{tmp_path / "d"}"\n[[alerts]]\n'
                        f'channels = ["webpush://admins"]\n{body}', encoding="utf-8")
        load(path, connections=False)

    cfg('webpush_subject = "mailto:ops@example.com"\nwebpush_networks = ["10.0.0.0/8"]\n')
    with pytest.raises(ConfigError, match="is not a network"):
        cfg('webpush_networks = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError, match="webpush_subject"):
        cfg('webpush_subject = "ops@example.com"\n')
    path = tmp_path / "postroom.toml"
    path.write_text('[[alerts]]\nchannels = ["webpush://admin"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="names no browsers"):
        load(path, connections=False)


def test_migration_0016_goes_down_and_up(engine: Engine) -> None:
    assert "webpush_subscriptions" in tables(engine)
    migrate_to(engine, "0015", up=False)
    assert "webpush_subscriptions" not in tables(engine)
    migrate_to(engine, "head", up=True)
    assert "webpush_subscriptions" in tables(engine)


def test_through_the_outbox(engine: Engine, tmp_path: Path, push: PushService) -> None:
    """The dispatcher sends an outbox row to webpush://admins like any channel."""
    from postroom.alerts import outbox
    from postroom.alerts.dispatcher import Dispatcher
    from postroom.store.db import write_transaction

    path = tmp_path / "postroom.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[[alerts]]\nname = "ops"\n'
                    f'channels = ["webpush://admins"]\nwebpush_subject = "{SUBJECT}"\n'
                    'webpush_networks = ["127.0.0.0/8"]\n', encoding="utf-8")
    settings = load(path, connections=False)
    store = store_of(engine, settings)
    account(engine, "alice")
    browser = Browser(push.url("/a"))
    subs.add(engine, store.vault, "alice", browser.json(), "a")
    sent = alert()
    with write_transaction(engine) as conn:
        outbox.add(conn, [sent], ["ops#1"], time.time())
    assert asyncio.run(Dispatcher(engine, lambda: settings).deliver()) == 1
    ((_, body),) = push.on("/a")
    assert json.loads(browser.decrypt(body))["key"] == sent.key
    (row,) = outbox.history(engine)
    assert row.status == outbox.SENT


# -- the web admin ----------------------------------------------------------------------------
def test_worker_script_and_headers(admin_server: AdminServer) -> None:
    import httpx

    r = httpx.get(admin_server.base + "/admin/push-worker.js", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    assert "showNotification" in r.text and "notificationclick" in r.text
    csp = r.headers["content-security-policy"]
    # worker-src falls back to script-src 'self' (CSP 3): the worker may be registered
    assert "script-src 'self'" in csp and "worker-src" not in csp


def test_subscribe_endpoint(admin_server: AdminServer) -> None:
    ok = Browser("https://push.example.net/one").json()
    c, csrf = signed_in(admin_server, *ADMIN)
    with contextlib.closing(c):
        page = c.get("/admin/account")
        assert page.status_code == 200 and 'data-key="B' in page.text
        h = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
        assert c.post("/admin/account/push", content=ok,
                      headers={"Content-Type": "application/json"}).status_code == 403
        assert c.post("/admin/account/push", content=ok, headers={
            **h, "Origin": "https://evil.example"}).status_code == 403
        for body, words in [(b"nope", "not JSON"),
                            (Browser("http://push.example.net/x").json(), "not https")]:
            r = c.post("/admin/account/push", content=body, headers=h)
            assert r.status_code == 400 and words in r.json()["error"]["message"]
        r = c.post("/admin/account/push", content=ok, headers=h)
        assert r.status_code == 201 and r.json()["service"] == "push.example.net"
        first = r.json()["id"]
        for i in range(subs.MAX_PER_ACCOUNT - 1):
            assert c.post("/admin/account/push", headers=h, content=Browser(
                f"https://push.example.net/{i}").json()).status_code == 201
        r = c.post("/admin/account/push", headers=h,
                   content=Browser("https://push.example.net/eleven").json())
        assert r.status_code == 400 and r.json()["error"]["code"] == "webpush.too_many"
        assert "push.example.net" in c.get("/admin/account").text

    v, vcsrf = signed_in(admin_server, *VIEWER)
    with contextlib.closing(v):
        # a viewer subscribes its own browser; it cannot remove another account's
        assert v.post("/admin/account/push", content=Browser("https://push.example.net/v").json(),
                      headers={"X-CSRF-Token": vcsrf, "Content-Type": "application/json"}
                      ).status_code == 201
        v.post("/admin/account/push/remove", data={"csrf": vcsrf, "id": str(first)})
    c, csrf = signed_in(admin_server, *ADMIN)
    with contextlib.closing(c):
        assert c.get("/admin/account").text.count("Remove ") >= subs.MAX_PER_ACCOUNT
        r = c.post("/admin/account/push/remove", data={"csrf": csrf, "id": str(first)})
        assert r.status_code == 303 and r.headers["location"].endswith("done=push_off")
        assert "That browser no longer receives alerts." in c.get(r.headers["location"]).text
        r = c.post("/admin/account/push/remove", data={
            "csrf": csrf, "endpoint": "https://push.example.net/0"})
        assert r.status_code == 303
    anonymous = admin_server.base + "/admin/account/push"
    import httpx

    r = httpx.post(anonymous, content=ok, timeout=30, follow_redirects=False)
    assert r.status_code in (303, 403)


def open_push_panel(page: Any, base: str) -> Any:
    """Sign in, open the account page, wait for the push panel's first state; the worker
    is registered at /admin/ by then. Returns the status element."""
    page.context.grant_permissions(["notifications"], origin=base)
    login(page, *ADMIN)
    page.goto("/admin/account")
    status = page.locator("#push-status")
    wait_for(lambda: status.get_attribute("data-state") in ("on", "off", "unsupported"),
             "the push panel's first state")
    scope = page.evaluate(
        "navigator.serviceWorker.getRegistration('/admin/').then(r => r ? r.scope : '')")
    assert scope == base + "/admin/"
    assert status.get_attribute("data-state") == "off"
    assert not page.get_by_role("button", name="Stop alerts to this browser").is_visible()
    page.get_by_role("button", name="Send alerts to this browser").click()
    return status


def test_subscribe_in_chromium(admin_server: AdminServer, page: Any, browser: Any,
                               tmp_path: Path) -> None:
    """Chromium's PushManager subscribes through Google's push service (FCM), which this
    box cannot reach, so no real subscription is made here. What is checked: the worker is
    registered with scope /admin/, the permission asked, and what the page says: in a
    fresh (incognito) context Chromium refuses push at once ("permission denied", shown as
    the browser's error); in a real profile it waits for FCM, and the page says the push
    service does not answer. Were FCM reachable, the subscription would be stored and
    listed: that branch is checked too."""
    status = open_push_panel(page, admin_server.base)
    wait_for(lambda: status.get_attribute("data-state") == "failed", "the browser's refusal")
    assert "could not subscribe to its push service" in status.inner_text()
    assert_clean(page, "account-push-refused")

    from admin_browser import ARGS, CHROMIUM, DESKTOP, TIMEOUT_MS

    # A profile on disk is a second Chromium process, started by the module's Playwright.
    context = browser.browser_type.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
        base_url=admin_server.base, viewport=DESKTOP, timeout=60_000)
    try:
        context.set_default_timeout(TIMEOUT_MS)
        tab = context.new_page()
        status = open_push_panel(tab, admin_server.base)
        wait_for(lambda: status.get_attribute("data-state") in ("slow", "failed", "on"),
                 "the push service's answer, or the page saying it has none", timeout=90)
        shot(tab, "account-push-waiting")
        if status.get_attribute("data-state") == "on":  # FCM answered: stored and listed
            assert tab.get_by_role("button", name="Stop alerts to this browser").is_visible()
            assert tab.locator("#push-table").count() == 1
        else:
            assert "has not answered yet" in status.inner_text() or \
                "could not subscribe" in status.inner_text()
    finally:
        context.close()

