"""The Flask extension (postroom.flask) in a small Flask shop (tests/flask_shop) made by an
app factory, driven through Flask's test client: each request queues a message in a real
`postroom serve` (embedded mode: straight into its store; remote mode: through its HTTP API),
which delivers it to the real Postfix + Dovecot peer."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_shop import create_app
from serve_proc import Postroom, smtp_connection

from postroom.exceptions import ConfigError
from postroom.flask import Postroom as PostroomExt
from postroom.flask import State

pytestmark = [pytest.mark.peers]

TO, CC, BCC = "testuser@example.test", "alice@example.test", "bob@example.test"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("flask"),
                  connections=smtp_connection(peers.plain_port)) as pr:
        yield pr


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest, server: Postroom) -> Iterator[Flask]:
    common = {"POSTROOM_DEFAULT_FROM": "Shöp <shop@example.org>", "POSTROOM_TAGS": ["flask"]}
    if request.param == "embedded":
        config = {"POSTROOM_CONFIG": str(server.config), "POSTROOM_APP": "flaskshop", **common}
    else:
        key = server.add_app_keys(f"flask-{uuid.uuid4().hex[:6]}")[1]
        config = {"POSTROOM_URL": f"http://127.0.0.1:{server.http_port}",
                  "POSTROOM_API_KEY": key, **common}
    flask_app = create_app(config)
    try:
        yield flask_app
    finally:
        flask_app.extensions["postroom"].mailer.close()


def row(server: Postroom, subject: str) -> tuple[str, list[str]]:
    con = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        [(source, tags)] = con.execute("SELECT source, tags FROM messages WHERE subject = ?",
                                       (subject,)).fetchall()
    finally:
        con.close()
    return str(source), json.loads(tags)


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None, f"no text/{kind} part"
    return str(part.get_content())


def test_a_request_queues_mail_that_reaches_the_maildir(
        app: Flask, server: Postroom, peers: Any) -> None:
    subject = f"flask signup {uuid.uuid4().hex[:8]}"
    client = app.test_client()
    resp = client.post("/signup", data={"email": TO, "subject": subject, "cc": CC,
                                        "bcc": BCC})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert len(resp.get_json()["id"]) == 32
    msg = peers.wait_for(TO, subject, timeout=TIMEOUT)
    assert msg["From"] == "Shöp <shop@example.org>" and msg["Reply-To"] == "help@example.org"
    assert msg["Cc"] == CC and msg["Bcc"] is None
    assert body(msg, "plain").strip() == "Welcome, Grüße!"
    assert body(msg, "html").strip() == "<p>Welcome, <b>Grüße</b>!</p>"
    assert {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()} == {
        "terms.txt": "Terms: café ☕\n".encode()}
    for other in (CC, BCC):
        peers.wait_for(other, subject, timeout=TIMEOUT)
    source, tags = row(server, subject)
    assert source == "python:flaskshop" if app.config.get("POSTROOM_APP") else (
        source.startswith("api:flask-"))
    assert tags == ["flask", "signup"]

    asubject = f"flask async {uuid.uuid4().hex[:8]}"
    resp = client.post("/async-signup", data={"email": TO, "subject": asubject})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    peers.wait_for(TO, asubject, timeout=TIMEOUT)


def test_a_bad_address_is_the_views_error_not_a_traceback(app: Flask) -> None:
    resp = app.test_client().post("/signup", data={"email": "not an address", "subject": "x"})
    assert resp.status_code == 422
    assert resp.get_json()["error"].startswith(("address.", "message.", "request."))


def test_configuration_mistakes_stop_the_app_at_creation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POSTROOM_APIKEY") as err:
        create_app({"POSTROOM_URL": "http://127.0.0.1:1", "POSTROOM_APIKEY": "x.y"})
    assert err.value.code == "flask.config"
    with pytest.raises(ConfigError) as err:
        create_app({"POSTROOM_CONFIG": str(tmp_path / "missing.toml")})
    assert "missing.toml" in err.value.message
    with pytest.raises(ConfigError) as err:
        create_app({"POSTROOM_URL": "http://127.0.0.1:1", "POSTROOM_API_KEY": "x.y",
                    "POSTROOM_TAGS": [""]})
    assert err.value.code == "flask.tags"


def test_one_extension_object_serves_each_app_its_own_mailer(server: Postroom) -> None:
    ext = PostroomExt()
    first, second = Flask("first"), Flask("second")
    first.config.update(POSTROOM_CONFIG=str(server.config),
                        MAIL_DEFAULT_SENDER=("Först", "first@example.org"))
    second.config.update(POSTROOM_URL="http://127.0.0.1:1", POSTROOM_API_KEY="a.b")
    ext.init_app(first)
    ext.init_app(second)
    try:
        with first.app_context():
            assert ext.mailer.mode == "embedded"
            assert ext.mailer.default_from == "Först <first@example.org>"
        with second.app_context():
            assert ext.mailer.mode == "remote"
        with pytest.raises(ConfigError) as err:
            PostroomExt.state(Flask("third"))
        assert err.value.code == "flask.not_initialised"
    finally:
        for a in (first, second):
            state = a.extensions["postroom"]
            assert isinstance(state, State)
            state.mailer.close()
