"""The HTTP API of a real `postroom serve` (subprocess), delivering to the real Postfix peer.

Every error case checks the status, the structured body ({"error": {code, message, fix,
field}}) and that nothing was stored (the instance's messages table gains no row). The
client in postroom.client is exercised against the same server. schemathesis drives the
served OpenAPI document with generated requests: no 500, every answer as documented.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_proc import Postroom, free_port, smtp_connection, wait_port

from postroom.client import AsyncClient, Client
from postroom.exceptions import CredentialsError, MessageError, StoreError

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
CC = "alice@example.test"
BCC = "bob@example.test"
SENDER = "shop@example.org"
TIMEOUT = 20.0  # every request and wait in this module
MAX_MESSAGE = 200_000
MAX_BODY = 300_000
MAX_RCPTS = 5


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    p = Postroom(
        tmp_path_factory.mktemp("http-api"),
        # "nowhere": a closed port, for failed attempts (advice, connection health).
        connections=smtp_connection(peers.plain_port)
        + smtp_connection(free_port(), name="nowhere"),
        server=f"max_message_size = {MAX_MESSAGE}\nmax_recipients = {MAX_RCPTS}\n",
        env={"POSTROOM_HTTP__MAX_BODY_SIZE": str(MAX_BODY)},
    )
    p.start()
    try:
        wait_port(p.http_port, timeout=TIMEOUT)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def keys(pr: Postroom) -> dict[str, str]:
    return {name: pr.add_app_keys(name)[1] for name in ("shop", "blog")}


@pytest.fixture(scope="module")
def base(pr: Postroom) -> str:
    return f"http://127.0.0.1:{pr.http_port}"


@pytest.fixture(scope="module")
def shop(base: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/api/v1", timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {keys['shop']}"}) as c:
        yield c


@pytest.fixture(scope="module")
def blog(base: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base}/api/v1", timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {keys['blog']}"}) as c:
        yield c


def rows(pr: Postroom) -> int:
    con = sqlite3.connect(f"file:{pr.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        return int(con.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        con.close()


def subject() -> str:
    return f"http-api {uuid.uuid4().hex}"


def message(**over: Any) -> dict[str, Any]:
    return {"from": f"Shop <{SENDER}>", "to": [RCPT], "subject": subject(), "text": "Hello",
            **over}


def refused(resp: httpx.Response, status: int, code: str | None = None,
            field: str | None = None) -> dict[str, Any]:
    """Check an error answer; returns its error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"code", "message", "fix", "field"}, err
    assert err["message"] and err["fix"], err
    assert "Traceback" not in resp.text
    if code is not None:
        assert err["code"] == code, err
    if field is not None:
        assert err["field"] == field, err
    return err


def final(api: httpx.Client, msg_id: str) -> dict[str, Any]:
    """GET the message until its delivery is over (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        data: dict[str, Any] = api.get(f"/messages/{msg_id}").raise_for_status().json()
        if data["status"] not in ("queued", "sending", "deferred") or \
                time.monotonic() > deadline:
            return data
        time.sleep(0.2)


# -- the happy path ------------------------------------------------------------------------
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


def test_send_json_arrives_intact(pr: Postroom, shop: httpx.Client, peers: Any) -> None:
    subj = subject()
    before = rows(pr)
    resp = shop.post("/messages", json={
        "from": f"Shop <{SENDER}>", "to": RCPT, "cc": [f"Alice <{CC}>"], "bcc": [BCC],
        "reply_to": ["help@example.org"], "subject": subj,
        "text": "Plain body ü", "html": '<p>HTML body ü <img src="cid:logo"></p>',
        "attachments": [
            {"filename": "report.pdf", "content": base64.b64encode(PDF).decode()},
            {"filename": "logo.png", "content": base64.b64encode(PNG).decode(),
             "content_type": "image/png", "content_id": "logo"},
        ],
        "headers": {"X-Order": "42"}, "tags": ["orders"], "metadata": {"order": "42"},
    })
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] == "queued" and not accepted["duplicate"]
    assert sorted(accepted["recipients"]) == sorted([RCPT, CC, BCC])
    assert rows(pr) == before + 1

    got = peers.wait_for(RCPT, subj, timeout=TIMEOUT)
    msg = email.message_from_bytes(got.raw, policy=email.policy.default)
    assert msg["X-Order"] == "42"
    assert msg["Reply-To"] == "help@example.org"
    assert CC in msg["Cc"] and "Bcc" not in msg
    assert msg.get_body(("plain",)).get_content().strip() == "Plain body ü"
    assert "HTML body ü" in msg.get_body(("html",)).get_content()
    files = {p.get_filename(): p for p in msg.iter_attachments()}
    assert files["report.pdf"].get_content() == PDF
    inline = next(p for p in msg.walk() if p["Content-ID"] == "<logo>")
    assert inline.get_content() == PNG
    for other in (CC, BCC):  # every envelope recipient got it, Bcc without a trace
        copy = email.message_from_bytes(peers.wait_for(other, subj, timeout=TIMEOUT).raw,
                                        policy=email.policy.default)
        assert "Bcc" not in copy and BCC not in f"{copy['To']} {copy['Cc']}"

    data = final(shop, accepted["id"])
    assert data["status"] == "sent", data
    assert data["source"] == "api:shop"
    assert data["tags"] == ["orders"] and data["metadata"] == {"order": "42"}
    assert {r["address"]: r["state"] for r in data["recipient_states"]} == {
        RCPT: "sent", CC: "sent", BCC: "sent"}
    assert data["attempts"] and "250" in data["attempts"][-1]["transcript"]


def test_send_raw_arrives_intact(pr: Postroom, shop: httpx.Client, peers: Any) -> None:
    subj = subject()
    body = "Raw body line one\nline two ünïcode\n"
    raw = (f"From: Shop <{SENDER}>\nTo: {RCPT}\nBcc: {BCC}\nSubject: {subj}\n"
           "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
           f"Content-Transfer-Encoding: 8bit\n\n{body}").encode()
    resp = shop.post("/messages/raw", content=raw,
                     headers={"Content-Type": "message/rfc822"})
    assert resp.status_code == 202, resp.text
    assert sorted(resp.json()["recipients"]) == sorted([RCPT, BCC])
    for rcpt in (RCPT, BCC):
        got = peers.wait_for(rcpt, subj, timeout=TIMEOUT)
        head, _, delivered = got.raw.partition(b"\r\n\r\n" if b"\r\n\r\n" in got.raw
                                               else b"\n\n")
        assert delivered.replace(b"\r\n", b"\n") == body.encode()
        assert b"Bcc:" not in head
        assert b"Message-ID:" in head and b"Date:" in head  # added when missing
    assert final(shop, resp.json()["id"])["status"] == "sent"


def test_send_raw_envelope_from_query(pr: Postroom, shop: httpx.Client, peers: Any) -> None:
    subj = subject()
    raw = f"From: {SENDER}\r\nTo: nobody@example.net\r\nSubject: {subj}\r\n\r\nHi\r\n".encode()
    resp = shop.post("/messages/raw", content=raw, headers={"Content-Type": "message/rfc822"},
                     params=[("from", "bounces@example.org"), ("to", RCPT), ("tag", "raw")])
    assert resp.status_code == 202, resp.text
    assert resp.json()["recipients"] == [RCPT]
    peers.wait_for(RCPT, subj, timeout=TIMEOUT)
    data = final(shop, resp.json()["id"])
    assert data["sender"] == "bounces@example.org" and data["tags"] == ["raw"]


# -- auth and isolation --------------------------------------------------------------------
def test_auth_failures(pr: Postroom, base: str, keys: dict[str, str]) -> None:
    before = rows(pr)
    url = f"{base}/api/v1/messages"
    cases = {
        "missing": ({}, "auth.missing"),
        "basic": ({"Authorization": "Basic c2hvcDp4"}, "auth.missing"),
        "wrong secret": ({"Authorization": "Bearer shop.wrong"}, "auth.invalid"),
        "unknown app": ({"Authorization": "Bearer ghost.abc"}, "auth.invalid"),
        "no dot": ({"Authorization": "Bearer abc"}, "auth.invalid"),
        "huge": ({"Authorization": "Bearer " + "x" * 5000}, "auth.invalid"),
    }
    for name, (headers, code) in cases.items():
        resp = httpx.post(url, json=message(), headers=headers, timeout=TIMEOUT)
        refused(resp, 401, code)
        assert resp.headers["www-authenticate"].startswith('Bearer realm="postroom"'), name
        resp = httpx.get(url, headers=headers, timeout=TIMEOUT)
        refused(resp, 401, code)
    # an app removed while the server runs loses access within a second
    key = pr.add_app_keys("gone")[1]
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url, headers=auth, timeout=TIMEOUT).status_code == 200
    assert pr.cli("app", "remove", "gone").returncode == 0
    time.sleep(1.1)  # verified keys are remembered for 1 s (http_api.KeyCache)
    refused(httpx.get(url, headers=auth, timeout=TIMEOUT), 401, "auth.invalid")
    assert rows(pr) == before


def test_apps_see_only_their_own_messages(shop: httpx.Client, blog: httpx.Client) -> None:
    tag = f"iso-{uuid.uuid4().hex[:8]}"
    mine = shop.post("/messages", json=message(tags=[tag])).json()["id"]
    theirs = blog.post("/messages", json=message(tags=[tag])).json()["id"]
    assert [m["id"] for m in shop.get("/messages", params={"tag": tag}).json()["messages"]] \
        == [mine]
    assert [m["id"] for m in blog.get("/messages", params={"tag": tag}).json()["messages"]] \
        == [theirs]
    refused(blog.get(f"/messages/{mine}"), 404, "message.unknown")
    refused(blog.post(f"/messages/{mine}/resend"), 404, "message.unknown")
    refused(shop.get(f"/messages/{mine[:8]}"), 404)  # ids are exact in the API
    assert shop.get(f"/messages/{mine}").json()["source"] == "api:shop"


# -- idempotency ---------------------------------------------------------------------------
def test_idempotency_key(pr: Postroom, shop: httpx.Client, blog: httpx.Client) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    body = message()
    before = rows(pr)
    first = shop.post("/messages", json=body, headers=key)
    assert first.status_code == 202, first.text
    again = shop.post("/messages", json=body, headers=key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    # the same fields written in another order are the same request
    reordered = dict(reversed(list(body.items())))
    assert shop.post("/messages", json=reordered, headers=key).json()["id"] == \
        first.json()["id"]
    err = refused(shop.post("/messages", json={**body, "text": "other"}, headers=key), 409,
                  "idempotency.conflict", "Idempotency-Key")
    assert first.json()["id"] in err["message"]
    assert rows(pr) == before + 1
    # keys belong to one app: another app's same key is its own message
    other = blog.post("/messages", json=body, headers=key)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    refused(shop.post("/messages", json=body, headers={"Idempotency-Key": "x" * 300}), 422,
            field="Idempotency-Key")


def test_idempotency_concurrent_requests(pr: Postroom, base: str, keys: dict[str, str]) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex, "Authorization": f"Bearer {keys['shop']}"}
    body = message()
    before = rows(pr)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=TIMEOUT,
                                     limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*(c.post("/messages", json=body, headers=key)
                                          for _ in range(20)))

    answers = asyncio.run(burst())
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 19 + [202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert rows(pr) == before + 1


# -- limits, validation, injection: nothing stored -----------------------------------------
def test_body_over_limit_is_413(pr: Postroom, shop: httpx.Client) -> None:
    before = rows(pr)
    big = message(text="x" * (MAX_BODY + 10))
    refused(shop.post("/messages", json=big), 413, "request.too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        yield b'{"from": "a@example.org", "to": ["b@example.org"], "text": "'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"}'

    refused(shop.post("/messages", content=chunks(),
                      headers={"Content-Type": "application/json"}), 413, "request.too_large")
    raw = b"From: a@example.org\r\nTo: b@example.org\r\n\r\n" + b"z" * MAX_BODY
    refused(shop.post("/messages/raw", content=raw,
                      headers={"Content-Type": "message/rfc822"}), 413, "request.too_large")
    assert shop.get("/messages", params={"limit": 1}).status_code == 200  # still serving
    assert rows(pr) == before


def test_message_and_recipient_limits(pr: Postroom, shop: httpx.Client) -> None:
    before = rows(pr)
    huge = base64.b64encode(os.urandom(MAX_MESSAGE)).decode()  # fits the body, not the message
    refused(shop.post("/messages", json=message(
        attachments=[{"filename": "big.bin", "content": huge}])), 413, "message.too_large")
    many = [f"r{i}@example.org" for i in range(MAX_RCPTS + 1)]
    refused(shop.post("/messages", json=message(to=many)), 422,
            "message.too_many_recipients")
    refused(shop.post("/messages", json=message(to=many[:3], bcc=many[3:])), 422,
            "message.too_many_recipients")
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    refused(shop.post("/messages/raw", content=raw, params=[("to", a) for a in many],
                      headers={"Content-Type": "message/rfc822"}), 422,
            "message.too_many_recipients")
    assert rows(pr) == before


@pytest.mark.parametrize(("over", "field"), [
    ({"subject": "Hi\r\nBcc: victim@example.org"}, "subject"),
    ({"subject": "Hi\nX-Evil: 1"}, "subject"),
    ({"from": "a@example.org\r\nBcc: victim@example.org"}, "from"),
    ({"to": ["b@example.org\nBcc: victim@example.org"]}, "to[0]"),
    ({"reply_to": ["c@example.org\r"]}, "reply_to[0]"),
    ({"headers": {"X-Tag": "v\r\nBcc: victim@example.org"}}, "headers.X-Tag"),
    ({"headers": {"X-Bad\r\nBcc": "v"}}, "headers.X-Bad\r\nBcc"),
    ({"attachments": [{"filename": "a\r\nBcc: v@example.org", "content": ""}]},
     "attachments[0].filename"),
    ({"subject": "nul\x00byte"}, "subject"),
])
def test_header_injection_is_refused(pr: Postroom, shop: httpx.Client, over: dict[str, Any],
                                     field: str) -> None:
    before = rows(pr)
    err = refused(shop.post("/messages", json=message(**over)), 422,
                  "message.header_injection")
    assert err["field"] == field
    assert rows(pr) == before


def test_header_injection_in_raw_query(pr: Postroom, shop: httpx.Client) -> None:
    before = rows(pr)
    raw = b"From: a@example.org\r\nTo: b@example.org\r\n\r\nx\r\n"
    for params in ([("to", "b@example.org\r\nBcc: v@example.org")],
                   [("from", "a@example.org\nX: y")]):
        refused(shop.post("/messages/raw", content=raw, params=params,
                          headers={"Content-Type": "message/rfc822"}), 422)
    assert rows(pr) == before


@pytest.mark.parametrize(("over", "status", "code", "field"), [
    ({"to": ["not-an-address"]}, 422, "address.malformed", "to[0]"),
    ({"to": ["a@b@example.org"]}, 422, None, "to[0]"),
    ({"cc": ["ok@example.org", "bad@-example.org"]}, 422, None, "cc[1]"),
    ({"from": "nobody"}, 422, None, "from"),
    ({"from": ""}, 422, None, "from"),
    ({"to": [], "cc": [], "bcc": []}, 422, "message.no_recipients", "to"),
    ({"connection": "nope"}, 422, "connection.unknown", "connection"),
    ({"tos": ["x@example.org"]}, 422, "request.unknown_field", "tos"),
    ({"attachments": [{"filename": "a.txt", "content": "!!not base64!!"}]}, 422,
     "attachment.base64", "attachments[0].content"),
    ({"send_at": "2030-01-01T09:00:00"}, 422, "request.time", "send_at"),
    ({"send_at": "next tuesday"}, 422, "request.time", "send_at"),
    ({"send_at": time.time() + 365 * 86400}, 422, "request.send_at", "send_at"),
    ({"subject": 5}, 422, "request.invalid", "subject"),
])
def test_invalid_json_messages(pr: Postroom, shop: httpx.Client, over: dict[str, Any],
                               status: int, code: str | None, field: str) -> None:
    before = rows(pr)
    err = refused(shop.post("/messages", json=message(**over)), status, code, field)
    if code == "connection.unknown":
        assert "up" in err["fix"]  # the known names
    assert rows(pr) == before


def test_missing_from_and_bad_json(pr: Postroom, shop: httpx.Client) -> None:
    before = rows(pr)
    body = message()
    del body["from"]
    refused(shop.post("/messages", json=body), 422, "request.missing", "from")
    refused(shop.post("/messages", content=b'{"from": ', headers={
        "Content-Type": "application/json"}), 422, "request.json")
    refused(shop.post("/messages", content=b"[1, 2]", headers={
        "Content-Type": "application/json"}), 422)
    refused(shop.post("/messages", content=b"from=a", headers={
        "Content-Type": "application/x-www-form-urlencoded"}), 422)
    assert rows(pr) == before


@pytest.mark.parametrize("field", ["subject", "text", "html", "tags", "metadata", "headers",
                                   "reply_to", "send_at", "attachments"])
def test_invalid_unicode_is_refused(pr: Postroom, shop: httpx.Client, field: str) -> None:
    """JSON may carry lone UTF-16 surrogates that no UTF-8 message (or database) can hold."""
    bad = "\\ud800"  # escaped in the JSON text; the client library could not even encode it
    value = {"tags": f'["{bad}"]', "metadata": f'{{"k": "{bad}"}}',
             "headers": f'{{"X-A": "{bad}"}}', "reply_to": f'["{bad}@example.org"]',
             "attachments": f'[{{"filename": "a", "content": "{bad}"}}]'}.get(field, f'"{bad}"')
    text = f'{{"from": "{SENDER}", "to": ["{RCPT}"], "{field}": {value}}}'
    before = rows(pr)
    refused(shop.post("/messages", content=text.encode(),
                      headers={"Content-Type": "application/json"}), 422)
    assert rows(pr) == before


@pytest.mark.parametrize(("raw", "code"), [
    (b"", "raw.empty"),
    (b"just some text, no header at all\r\n", "raw.malformed"),
    (b" indented: first\r\nFrom: a@example.org\r\n\r\nx", "raw.malformed"),
    (b"To: b@example.org\r\nSubject: no from\r\n\r\nbody\r\n", "message.no_from"),
    (b"From: Nobody\r\nTo: b@example.org\r\n\r\nbody\r\n", "address.malformed"),
    (b"From: \r\nTo: b@example.org\r\n\r\nbody\r\n", "message.no_from"),
    (b"From: a@example.org\r\nFrom: c@example.org\r\nTo: b@example.org\r\n\r\nx\r\n",
     "raw.malformed"),
    (b"From: a@example.org\r\nTo: b@example.org\r\nContent-Type: multipart/mixed\r\n\r\n"
     b"no boundary parameter\r\n", "raw.malformed"),
    (b"From: a@example.org\r\nTo: b@example.org\r\nContent-Type: multipart/mixed; "
     b'boundary="XX"\r\n\r\nthe boundary never starts\r\n', "raw.malformed"),
    # NUL is refused by ingress.accept, the same at every door
    (b"From: a@example.org\r\nTo: b@example.org\r\n\r\nnul \x00 byte\r\n", "message.nul"),
    (b"From: a@example.org\r\nSubject: nobody to send to\r\n\r\nbody\r\n",
     "message.no_recipients"),
    (b"From: a@example.org\r\nTo: not-an-address\r\n\r\nbody\r\n", "address.malformed"),
])
def test_malformed_raw_messages(pr: Postroom, shop: httpx.Client, raw: bytes,
                                code: str) -> None:
    before = rows(pr)
    refused(shop.post("/messages/raw", content=raw,
                      headers={"Content-Type": "message/rfc822"}), 422, code)
    assert rows(pr) == before


def test_raw_needs_its_content_type(pr: Postroom, shop: httpx.Client) -> None:
    raw = b"From: a@example.org\r\nTo: b@example.org\r\n\r\nx\r\n"
    refused(shop.post("/messages/raw", content=raw), 415, "request.content_type")
    refused(shop.post("/messages/raw", content=raw, headers={
        "Content-Type": "text/plain"}), 415, "request.content_type")


# -- scheduling, search, resend -----------------------------------------------------------
def test_send_at_schedules_delivery(shop: httpx.Client, peers: Any) -> None:
    subj = subject()
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    resp = shop.post("/messages", json=message(subject=subj, send_at=at.isoformat()))
    assert resp.status_code == 202, resp.text
    assert abs(dt.datetime.fromisoformat(resp.json()["send_at"]) - at) < dt.timedelta(
        milliseconds=1)
    msg_id = resp.json()["id"]
    time.sleep(1.5)
    assert shop.get(f"/messages/{msg_id}").json()["status"] == "queued"
    peers.wait_for(RCPT, subj, timeout=TIMEOUT)
    data = final(shop, msg_id)
    assert data["status"] == "sent"
    started = dt.datetime.fromisoformat(data["attempts"][0]["started_at"])
    assert started >= at
    # epoch seconds are accepted too
    epoch = shop.post("/messages", json=message(send_at=time.time() + 3600))
    assert epoch.status_code == 202 and epoch.json()["send_at"]


def test_priority_expiry_advice_and_connections(pr: Postroom, shop: httpx.Client) -> None:
    """Issue 4 fields on the same door: priority and expiry stored; a failed attempt carries
    the advice catalog's cause and fix; connection health is readable."""
    resp = shop.post("/messages", json=message(priority="high", expires_at=time.time() + 600))
    assert resp.status_code == 202, resp.text
    refused(shop.post("/messages", json=message(priority="urgent")), 422)
    refused(shop.post("/messages", json=message(expires_at=time.time() - 10)), 422,
            "message.expired")
    assert rows(pr) > 0
    bad = shop.post("/messages", json=message(connection="nowhere", subject=subject()))
    assert bad.status_code == 202, bad.text
    deadline = time.monotonic() + TIMEOUT
    while not (data := shop.get(f"/messages/{bad.json()['id']}").json())["attempts"]:
        assert time.monotonic() < deadline, data
        time.sleep(0.2)
    advice = data["attempts"][0]["advice"]
    assert advice and advice["id"].startswith("connect.refused"), advice
    assert advice["fix"]
    conns = shop.get("/connections")
    assert conns.status_code == 200, conns.text
    names = {c["name"]: c for c in conns.json()["connections"]}
    assert names["nowhere"]["health"] in ("degraded", "down") and names["up"]["health"] == "up"


def test_cursor_pagination_and_filters(shop: httpx.Client) -> None:
    tag = f"page-{uuid.uuid4().hex[:8]}"
    ids = [shop.post("/messages", json=message(to=["pages@example.com"], tags=[tag],
                                               subject=f"page {tag} {i}")).json()["id"]
           for i in range(7)]
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"tag": tag, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = shop.get("/messages", params=params).raise_for_status().json()
        seen += [m["id"] for m in page["messages"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    # a page boundary stays right while new mail arrives (a cursor, not an offset)
    first = shop.get("/messages", params={"tag": tag, "limit": 3}).json()
    shop.post("/messages", json=message(tags=[tag]))
    second = shop.get("/messages", params={"tag": tag, "limit": 3,
                                           "cursor": first["next"]}).json()
    assert [m["id"] for m in second["messages"]] == list(reversed(ids))[3:6]
    found = shop.get("/messages", params={"q": f"page {tag} 4"}).json()["messages"]
    assert [m["id"] for m in found] == [ids[4]]
    assert shop.get("/messages", params={"recipient": "pages@example.com", "tag": tag,
                                         "limit": 200}).json()["messages"]
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert shop.get("/messages", params={"since": future}).json()["messages"] == []
    refused(shop.get("/messages", params={"cursor": "garbage"}), 422, "request.cursor",
            "cursor")
    refused(shop.get("/messages", params={"status": "lost"}), 422, field="status")
    refused(shop.get("/messages", params={"limit": 0}), 422, field="limit")
    refused(shop.get("/messages", params={"since": "yesterday"}), 422, "request.time")


def test_resend_to_other_recipients(shop: httpx.Client, peers: Any) -> None:
    subj = subject()
    first = shop.post("/messages", json=message(subject=subj)).json()["id"]
    peers.wait_for(RCPT, subj, timeout=TIMEOUT)
    resp = shop.post(f"/messages/{first}/resend", json={"to": [CC]})
    assert resp.status_code == 202, resp.text
    copy = resp.json()["id"]
    assert copy != first and resp.json()["recipients"] == [CC]
    peers.wait_for(CC, subj, timeout=TIMEOUT)
    data = final(shop, copy)
    assert data["status"] == "sent" and data["source"] == "api:shop"
    # without a body: to the original recipients
    again = shop.post(f"/messages/{first}/resend")
    assert again.status_code == 202 and again.json()["recipients"] == [RCPT]
    refused(shop.post(f"/messages/{first}/resend", json={"to": ["bad"]}), 422, field="to[0]")
    refused(shop.post("/messages/0123456789abcdef/resend"), 404, "message.unknown")


# -- the client library --------------------------------------------------------------------
def test_client(base: str, keys: dict[str, str], peers: Any) -> None:
    subj = subject()
    with Client(base, keys["shop"], timeout=TIMEOUT) as api:
        msg_id = api.send(message(subject=subj), idempotency_key=f"c-{subj}")
        assert api.send(message(subject=subj), idempotency_key=f"c-{subj}") == msg_id
        peers.wait_for(RCPT, subj, timeout=TIMEOUT)
        assert api.get(msg_id)["subject"] == subj
        page = api.search(q=subj, limit=5)
        assert [m["id"] for m in page.messages] == [msg_id] and page.next is None
        raw = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subj} raw\r\n\r\nraw\r\n".encode()
        raw_id = api.send_raw(raw, tags=["client"])
        peers.wait_for(RCPT, f"{subj} raw", timeout=TIMEOUT)
        assert api.get(raw_id)["tags"] == ["client"]
        assert api.resend(msg_id, [CC]) != msg_id
        with pytest.raises(MessageError) as bad:
            api.send(message(to=["nope"]))
        assert bad.value.code == "address.malformed" and "422" in str(bad.value)
        with pytest.raises(MessageError) as missing:
            api.get("0123456789abcdef")
        assert missing.value.code == "message.unknown"
    with Client(base, "shop.wrong") as api, pytest.raises(CredentialsError):
        api.search()
    with Client("http://127.0.0.1:9", keys["shop"], timeout=2) as api, \
            pytest.raises(StoreError) as down:
        api.send(message())
    assert not down.value.permanent and down.value.code == "api.unavailable"


def test_async_client(base: str, keys: dict[str, str]) -> None:
    async def run() -> tuple[str, dict[str, Any]]:
        async with AsyncClient(base, keys["blog"], timeout=TIMEOUT) as api:
            msg_id = await api.send(message(), idempotency_key=uuid.uuid4().hex)
            return msg_id, await api.get(msg_id)

    msg_id, data = asyncio.run(run())
    assert data["id"] == msg_id and data["source"] == "api:blog"


# -- the served document -------------------------------------------------------------------
def test_openapi_document_and_docs(base: str, keys: dict[str, str]) -> None:
    doc = httpx.get(f"{base}/api/v1/openapi.json", timeout=TIMEOUT).json()
    assert {"/api/v1/messages", "/api/v1/messages/raw", "/api/v1/messages/{msg_id}",
            "/api/v1/messages/{msg_id}/resend"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    docs = httpx.get(f"{base}/api/v1/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "openapi.json" in docs.text
    refused(httpx.get(f"{base}/api/v2/nothing", timeout=TIMEOUT), 404, "route.unknown")
    # Without a key every /api/v1 route is a 401 (the key is checked before routing).
    refused(httpx.delete(f"{base}/api/v1/messages", timeout=TIMEOUT), 401, "auth.missing")
    resp = httpx.delete(f"{base}/api/v1/messages", timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {keys['shop']}"})
    refused(resp, 405, "method.not_allowed")
    assert resp.headers["allow"]


EXAMPLES = 300  # per mode, over all operations: about 20 s in all


@schemathesis.serializer("message/rfc822")
def _rfc822(ctx: Any, value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_generated_requests(base: str, keys: dict[str, str], mode: GenerationMode) -> None:
    """schemathesis over every operation of the served document: requests that match the
    schema (valid) and requests that break it (invalid). No 500, and every answer's status,
    content type and body as the document says. (The schema is loaded inside the test, from
    the running server; schemathesis' pytest fixture loader does not work with pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
    auth = {"Authorization": f"Bearer {keys['shop']}"}

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(
            headers=auth, timeout=TIMEOUT,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance])

    run()


# -- /healthz ------------------------------------------------------------------------------
def test_healthz_healthy(base: str) -> None:
    resp = httpx.get(f"{base}/healthz", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["status"] == "ok" and data["store"]["ok"] and data["worker"]["in_process"]
    assert set(data["queue"]) == {"queued", "deferred", "sending"}
    assert httpx.head(f"{base}/healthz", timeout=TIMEOUT).status_code == 200
    assert httpx.post(f"{base}/healthz", timeout=TIMEOUT).status_code == 405


def test_healthz_unhealthy_without_a_worker(tmp_path: Any, peers: Any) -> None:
    with Postroom(tmp_path, connections=smtp_connection(peers.plain_port),
                  server="worker = false\n") as p:
        wait_port(p.http_port, timeout=TIMEOUT)
        url = f"http://127.0.0.1:{p.http_port}/healthz"
        resp = httpx.get(url, timeout=TIMEOUT)
        assert resp.status_code == 503, resp.text
        assert resp.json()["worker"]["ok"] is False and "postroom worker" in \
            resp.json()["worker"]["fix"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "postroom.cli", "worker", "--config", str(p.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=p.env)
        try:
            deadline = time.monotonic() + TIMEOUT
            while (resp := httpx.get(url, timeout=TIMEOUT)).status_code != 200:
                assert time.monotonic() < deadline, resp.text
                time.sleep(0.2)
            assert resp.json()["worker"]["others"]
            os.kill(worker.pid, signal.SIGKILL)  # gone without a word: seen as gone at once
            worker.wait(10)
            resp = httpx.get(url, timeout=TIMEOUT)
            assert resp.status_code == 503, resp.text
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


def test_healthz_unhealthy_when_the_store_fails(tmp_path: Any) -> None:
    """The store check itself (in-process): a database that cannot be opened is a 503 that
    says so, not an exception."""
    from postroom.ingress.health import health
    from postroom.ingress.http_front import Context
    from postroom.queue.sql import Queue
    from postroom.store.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'postroom.db'}")
    try:
        ctx = Context(Queue(engine), apps=None, settings=None,  # type: ignore[arg-type]
                      worker_running=lambda: True)
        status, body = asyncio.run(health(ctx))
    finally:
        engine.dispose()
    assert status == 503 and body["status"] == "unhealthy"
    assert body["store"]["ok"] is False and body["store"]["error"]


def test_server_log_has_no_tracebacks(pr: Postroom) -> None:
    """Run last: nothing above made the server fail on a request (no 500, no traceback)."""
    text = pr.log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]
