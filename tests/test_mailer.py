"""postroom.Mailer: embedded mode on a temporary store, remote mode against a real
`postroom serve`, delivery to the real Postfix + Dovecot peer, the capture and memory
transports. Every wait is bounded."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, smtp_connection

import postroom
from postroom import Attachment, Mailer
from postroom.exceptions import ConfigError, MessageError, PostroomError
from postroom.queue.sql import Queue
from postroom.store.db import make_engine
from postroom.store.log import LogFilter
from postroom.transports import memory

SENDER = "shop@example.org"
RCPT = "testuser@example.test"
TIMEOUT = 20.0


def write_config(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n{extra}\n')
    return cfg


def queue_of(cfg: Path) -> Queue:
    return Queue(make_engine(f"sqlite:///{cfg.parent / 'data' / 'postroom.db'}"))


def count(cfg: Path) -> int:
    db = cfg.parent / "data" / "postroom.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        con.close()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path / "inst")


@pytest.fixture
def mailer(cfg: Path) -> Iterator[Mailer]:
    with Mailer(config=cfg) as m:
        yield m


# -- embedded mode ---------------------------------------------------------------------------
def test_send_stores_the_composed_message(mailer: Mailer, cfg: Path) -> None:
    msg_id = mailer.send(
        from_=f"Shop <{SENDER}>", to=RCPT, cc=["alice@example.test"], bcc="bob@example.test",
        reply_to="help@example.org", subject="Your order №42", text="Thanks!",
        html="<p>Thanks!</p>", headers={"X-Order": "42"}, tags=["order"],
        metadata={"order": "42"},
    )
    row = queue_of(cfg).log.get(msg_id)
    assert row is not None
    assert row["source"] == "python:embedded"
    assert row["sender"] == SENDER
    assert row["recipients"] == [RCPT, "alice@example.test", "bob@example.test"]
    assert row["tags"] == ["order"] and row["meta"] == {"order": "42"}
    msg = parse(row["raw"])
    assert msg["Subject"] == "Your order №42"
    assert msg["X-Order"] == "42" and msg["Reply-To"] == "help@example.org"
    assert msg["Bcc"] is None  # Bcc is envelope only
    assert msg.get_body(("plain",)).get_content().strip() == "Thanks!"  # type: ignore[union-attr]
    assert msg.get_body(("html",)).get_content().strip() == "<p>Thanks!</p>"  # type: ignore[union-attr]


def test_app_name_is_the_source(cfg: Path) -> None:
    with Mailer(config=cfg, app="shop", default_from=SENDER) as m:
        msg_id = m.send(to=RCPT, subject="hi", text="x")
    q = queue_of(cfg)
    assert q.log.get(msg_id)["source"] == "python:shop"  # type: ignore[index]
    assert [r["id"] for r in q.log.page(LogFilter(app="shop"))] == [msg_id]


def test_config_is_found_like_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "cwd")
    monkeypatch.chdir(cfg.parent)
    monkeypatch.delenv("POSTROOM_CONFIG", raising=False)
    with Mailer() as m:
        msg_id = m.send(from_=SENDER, to=RCPT, subject="found", text="x")
    assert queue_of(cfg).log.get(msg_id) is not None
    monkeypatch.setenv("POSTROOM_CONFIG", str(cfg))
    monkeypatch.chdir(tmp_path)
    with Mailer() as m:
        assert queue_of(cfg).log.get(m.send(from_=SENDER, to=RCPT, text="x")) is not None


def test_missing_or_broken_config_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as err:
        Mailer(config=tmp_path / "nope.toml")
    assert err.value.code == "config.missing" and "nope.toml" in str(err.value)
    # Nothing anywhere on the search path: say where we looked, never make a stray store.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTROOM_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    with pytest.raises(ConfigError) as err:
        Mailer()
    assert "postroom.toml" in str(err.value) and "postroom serve" in str(err.value)
    assert not (tmp_path / "postroom-data").exists()
    bad = write_config(tmp_path / "bad", "smtp_listen = 12")
    with pytest.raises(ConfigError, match="smtp_listen"):
        Mailer(config=bad)
    with pytest.raises(ConfigError, match="not both"):
        Mailer(config=bad, url="http://127.0.0.1:1", api_key="a.b")
    with pytest.raises(ConfigError, match="api_key"):
        Mailer(url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="http://"):
        Mailer(url="127.0.0.1:8025", api_key="a.b")
    with pytest.raises(MessageError, match="app name"):
        Mailer(config=cfg_ok(tmp_path), app="no spaces")


def cfg_ok(tmp_path: Path) -> Path:
    return write_config(tmp_path / "ok")


def test_send_from_many_threads(mailer: Mailer, cfg: Path) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(25):
                got = mailer.send(from_=SENDER, to=RCPT, subject=f"t{n}-{i}", text="x")
                with lock:
                    ids.append(got)
        except BaseException as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(set(ids)) == 200 and count(cfg) == 200


def test_send_and_asend_inside_a_running_loop(mailer: Mailer, cfg: Path) -> None:
    """A Django async view or a Jupyter cell: the caller's own loop is running."""

    async def view() -> list[str]:
        first = mailer.send(from_=SENDER, to=RCPT, subject="sync in loop", text="x")
        more = await asyncio.gather(*(
            mailer.asend(from_=SENDER, to=RCPT, subject=f"async {i}", text="x")
            for i in range(20)))
        return [first, *more]

    ids = asyncio.run(asyncio.wait_for(view(), TIMEOUT))
    # A second event loop (a new asyncio.run) uses the same Mailer.
    ids.append(asyncio.run(mailer.asend(from_=SENDER, to=RCPT, subject="loop 2", text="x")))
    assert len(set(ids)) == 22 and count(cfg) == 22


def test_async_context_manager(cfg: Path) -> None:
    async def main() -> str:
        async with Mailer(config=cfg) as m:
            return await m.asend(from_=SENDER, to=RCPT, subject="async with", text="x")

    msg_id = asyncio.run(main())
    assert queue_of(cfg).log.get(msg_id) is not None


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"to": RCPT, "text": "x"}, "message.no_from"),
        ({"from_": SENDER, "text": "x"}, "message.no_recipients"),
        ({"from_": SENDER, "to": "not-an-address", "text": "x"}, "address"),
        ({"from_": SENDER, "to": RCPT, "subject": "a\r\nBcc: evil@x.test"}, "header"),
        ({"from_": SENDER, "to": RCPT, "headers": {"X-A": "1\nBcc: evil@x.test"}}, "header"),
        ({"from_": SENDER, "to": RCPT, "attachments": ["/nonexistent/file.pdf"]},
         "message.attachment"),
        ({"from_": SENDER, "to": RCPT, "attachments": [42]}, "message.attachment"),
        ({"from_": SENDER, "to": [RCPT, 7]}, "message.type"),
        ({"from_": SENDER, "to": RCPT, "send_at": dt.datetime(2030, 1, 1)}, "message.send_at"),
        ({"from_": SENDER, "to": RCPT, "send_at": "tomorrow"}, "message.send_at"),
        ({"from_": SENDER, "to": RCPT, "metadata": {"n": 1}}, "message.type"),
        ({"from_": SENDER, "to": RCPT, "tags": [""]}, "message.type"),
        ({"from_": SENDER, "to": RCPT, "idempotency_key": "clé ✓"}, "idempotency_key"),
    ],
)
def test_bad_input_is_a_clear_error_and_nothing_is_stored(
    mailer: Mailer, cfg: Path, kwargs: dict[str, Any], code: str
) -> None:
    mailer.send(from_=SENDER, to=RCPT, text="first")  # the store exists
    with pytest.raises(MessageError) as err:
        mailer.send(**kwargs)
    assert code in err.value.code, err.value
    assert str(err.value)  # says what is wrong
    assert count(cfg) == 1


def test_unknown_connection_and_limits(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "lim", 'max_message_size = 2048\nmax_recipients = 2\n'
                       '[[connections]]\nname = "cap"\ntransport = "capture"\n')
    with Mailer(config=cfg) as m:
        with pytest.raises(MessageError, match="cap"):
            m.send(from_=SENDER, to=RCPT, text="x", connection="nope")
        with pytest.raises(MessageError) as err:
            m.send(from_=SENDER, to=RCPT, text="x" * 5000)
        assert err.value.code == "message.too_large" and "2,048" in str(err.value)
        with pytest.raises(MessageError) as err:
            m.send(from_=SENDER, to=["a@x.test", "b@x.test", "c@x.test"], text="x")
        assert err.value.code == "message.too_many_recipients"
        assert queue_of(cfg).log.get(m.send(from_=SENDER, to=RCPT, text="x", connection="cap"))
    assert count(cfg) == 1


def test_idempotency_key(mailer: Mailer, cfg: Path) -> None:
    kw: dict[str, Any] = {"from_": SENDER, "to": RCPT, "subject": "once", "text": "x",
                          "attachments": [("a.txt", b"abc", "text/plain")]}
    first = mailer.send(**kw, idempotency_key="order-42")
    assert mailer.send(**kw, idempotency_key="order-42") == first
    assert asyncio.run(mailer.asend(**kw, idempotency_key="order-42")) == first
    assert count(cfg) == 1
    with pytest.raises(MessageError) as err:  # same key, another message: never a second
        mailer.send(**{**kw, "subject": "other"}, idempotency_key="order-42")
    assert err.value.code == "idempotency.conflict"
    assert mailer.send(**kw, idempotency_key="order-43") != first
    assert count(cfg) == 2


def test_send_at(mailer: Mailer, cfg: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    row = queue_of(cfg).log.get(mailer.send(from_=SENDER, to=RCPT, text="x", send_at=later))
    assert row is not None and abs(row["next_attempt_at"] - later.timestamp()) < 1e-3
    epoch = time.time() + 60
    row = queue_of(cfg).log.get(mailer.send(from_=SENDER, to=RCPT, text="x", send_at=epoch))
    assert row is not None and abs(row["next_attempt_at"] - epoch) < 1e-3


def test_attachments_of_every_kind(mailer: Mailer, cfg: Path, tmp_path: Path) -> None:
    pdf = tmp_path / "Rechnung März.pdf"
    pdf.write_bytes(b"%PDF-1.4 " + os.urandom(3000))
    logo = Attachment("logo.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200), "image/png",
                      content_id="logo")
    msg_id = mailer.send(
        from_=SENDER, to=RCPT, subject="files", text="see attached",
        html='<p>hi <img src="cid:logo"></p>',
        attachments=[pdf, str(pdf), logo, ("notes.txt", b"plain notes\n", "text/plain"),
                     ("data.bin", b"\x00\x01")],
    )
    msg = parse(queue_of(cfg).log.get(msg_id)["raw"])  # type: ignore[index]
    parts = {p.get_filename(): p for p in msg.walk() if p.get_filename()}
    assert set(parts) == {"Rechnung März.pdf", "logo.png", "notes.txt", "data.bin"}
    assert parts["Rechnung März.pdf"].get_content() == pdf.read_bytes()
    assert parts["logo.png"]["Content-ID"] == "<logo>"
    assert parts["logo.png"].get_content() == logo.content
    assert parts["notes.txt"].get_content() == "plain notes\n"
    assert parts["data.bin"].get_content() == b"\x00\x01"


def test_send_raw(mailer: Mailer, cfg: Path) -> None:
    raw = "From: shop@example.org\nTo: testuser@example.test\nSubject: raw\n\nBody line\n"
    msg_id = mailer.send_raw(raw, SENDER, [RCPT, "alice@example.test"], tags="raw",
                             metadata={"k": "v"})
    row = queue_of(cfg).log.get(msg_id)
    assert row is not None
    assert row["raw"] == raw.replace("\n", "\r\n").encode()
    assert row["recipients"] == [RCPT, "alice@example.test"] and row["tags"] == ["raw"]
    assert asyncio.run(mailer.asend_raw(raw.encode(), SENDER, RCPT))
    with pytest.raises(MessageError, match="header"):
        mailer.send_raw(b"no header here", SENDER, RCPT)
    with pytest.raises(MessageError):
        mailer.send_raw(raw, "bad sender", RCPT)
    with pytest.raises(MessageError):
        mailer.send_raw(raw, SENDER, [])
    assert count(cfg) == 2


def test_closed_mailer_says_so(cfg: Path) -> None:
    m = Mailer(config=cfg)
    m.send(from_=SENDER, to=RCPT, text="x")
    m.close()
    m.close()  # twice is fine
    with pytest.raises(PostroomError) as err:
        m.send(from_=SENDER, to=RCPT, text="x")
    assert err.value.code == "mailer.closed"
    assert "closed" in repr(m)


def _send_in_child(mailer: Mailer, out: Any) -> None:
    out.put(mailer.send(from_=SENDER, to=RCPT, subject="from child", text="x"))


def test_a_forked_child_can_send_with_the_parents_mailer(mailer: Mailer, cfg: Path) -> None:
    """gunicorn --preload, Celery prefork: the Mailer was made before fork()."""
    mailer.send(from_=SENDER, to=RCPT, text="parent before")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_send_in_child, args=(mailer, out))
    child.start()
    child.join(TIMEOUT)
    assert child.exitcode == 0
    child_id = out.get(timeout=5)
    mailer.send(from_=SENDER, to=RCPT, text="parent after")
    assert queue_of(cfg).log.get(child_id) is not None and count(cfg) == 3


def test_memory_transport_for_unit_tests(tmp_path: Path) -> None:
    """What README shows for an app's own unit tests: no server, no network."""
    cfg = write_config(tmp_path / "mem", '[[connections]]\nname = "test"\n'
                       'transport = "memory"\n')
    memory.reset()
    try:
        memory.reject("nobody@example.test")
        with Mailer(config=cfg) as m:
            m.send(from_=SENDER, to=[RCPT, "nobody@example.test"], subject="unit", text="x")
            later = m.send(from_=SENDER, to=RCPT, text="x",
                           send_at=time.time() + 3600)
            assert m.deliver_due() == 1  # the scheduled one is not due
        [env] = memory.outbox("test")
        assert env.recipients == [RCPT]
        assert parse(env.raw)["Subject"] == "unit"
        rows = {r["id"]: r for r in queue_of(cfg).log.page(LogFilter())}
        assert rows[later]["status"] == "queued"
        assert {r["status"] for i, r in rows.items() if i != later} == {"partial"}
    finally:
        memory.reset()


def test_deliver_due_is_embedded_only() -> None:
    with Mailer(url="http://127.0.0.1:9", api_key="a.b") as m, pytest.raises(ConfigError):
        m.deliver_due()


def test_capture_transport_keeps_the_message_in_the_log(tmp_path: Path) -> None:
    pr = Postroom(tmp_path / "cap", connections='[[connections]]\nname = "dev"\n'
                  'transport = "capture"\n')
    with pr, Mailer(config=pr.config, app="devapp") as m:
        msg_id = m.send(from_=SENDER, to=[RCPT, "alice@example.test"], subject="captured",
                        text="x")
        q = queue_of(pr.config)
        deadline = time.monotonic() + TIMEOUT
        while (q.log.get(msg_id) or {}).get("status") != "sent":
            assert time.monotonic() < deadline, q.log.get(msg_id)
            time.sleep(0.1)
        shown = pr.cli("show", msg_id)
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout.decode()
        assert "captured" in out and "delivered to nobody" in out and "sent" in out
        logged = pr.cli("log", "--json")
        assert msg_id in logged.stdout.decode()


# -- through a real server, to the real Postfix + Dovecot ------------------------------------
@pytest.fixture
def server(tmp_path: Path, peers: Any) -> Iterator[Postroom]:
    pr = Postroom(tmp_path / "srv", connections=smtp_connection(peers.plain_port))
    with pr:
        yield pr


def _check_arrived(peers: Any, subject: str, pdf: bytes) -> None:
    got = peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    msg = parse(got.raw)
    assert msg["From"] == f"Shöp <{SENDER}>"
    assert msg.get_body(("plain",)).get_content().strip() == "Grüße, 你好"  # type: ignore[union-attr]
    assert "<b>Grüße</b>" in msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    [att] = [p for p in msg.iter_attachments()]
    assert att.get_filename() == "résumé.pdf" and att.get_content() == pdf


def test_embedded_send_is_delivered_by_serve(server: Postroom, peers: Any) -> None:
    pdf = os.urandom(5000)
    subject = f"embedded Mailer ✓ {uuid.uuid4().hex[:8]}"
    with Mailer(config=server.config, app="shop") as m:
        m.send(from_=f"Shöp <{SENDER}>", to=RCPT, subject=subject, text="Grüße, 你好",
               html="<p><b>Grüße</b></p>", attachments=[("résumé.pdf", pdf, None)])
    _check_arrived(peers, subject, pdf)


def test_remote_mode_through_the_http_api(server: Postroom, peers: Any) -> None:
    _secret, key = server.add_app_keys("shop")
    url = f"http://127.0.0.1:{server.http_port}"
    pdf = os.urandom(5000)
    idem = uuid.uuid4().hex
    subject = f"remote Mailer ✓ {idem[:8]}"
    with Mailer(url=url, api_key=key, timeout=TIMEOUT) as m:
        kw: dict[str, Any] = {"from_": f"Shöp <{SENDER}>", "to": RCPT, "subject": subject,
                              "text": "Grüße, 你好", "html": "<p><b>Grüße</b></p>",
                              "attachments": [("résumé.pdf", pdf, "application/pdf")],
                              "tags": ["remote"]}
        msg_id = m.send(**kw, idempotency_key=idem)
        assert m.send(**kw, idempotency_key=idem) == msg_id
        raw_id = asyncio.run(m.asend_raw(
            f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: raw {subject}\r\n\r\nraw body\r\n",
            SENDER, RCPT))
        with pytest.raises(MessageError):
            m.send(from_=SENDER, to="not an address", text="x")
    _check_arrived(peers, subject, pdf)
    peers.wait_for(RCPT, f"raw {subject}", timeout=TIMEOUT)
    q = queue_of(server.config)
    assert q.log.get(msg_id)["source"] == "api:shop"  # type: ignore[index]
    assert q.log.get(raw_id) is not None
    assert len(q.log.page(LogFilter(tag="remote"))) == 1  # the idempotent repeat stored nothing


def test_remote_mode_bad_key_and_no_server(server: Postroom) -> None:
    from postroom.exceptions import CredentialsError, StoreError

    url = f"http://127.0.0.1:{server.http_port}"
    with Mailer(url=url, api_key="shop.wrong") as m, pytest.raises(CredentialsError):
        m.send(from_=SENDER, to=RCPT, text="x")
    from serve_proc import free_port

    with Mailer(url=f"http://127.0.0.1:{free_port()}", api_key="shop.x", timeout=3) as m:
        with pytest.raises(StoreError) as err:
            m.send(from_=SENDER, to=RCPT, text="x")
        assert err.value.permanent is False


def test_public_names() -> None:
    assert postroom.Mailer is Mailer and postroom.Attachment is Attachment
