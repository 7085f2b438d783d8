"""DSNs (RFC 3464) for SMTP connections (issue 14 part 3): the signed VERP return path, the
report parser, the listener's policy for reports, and the real thing: Postroom delivers
through a real Postfix to an unknown local user, Postfix's own bounce comes back to
Postroom's listener and is linked to the message as ``bounced`` with its status code.

The real test runs a Postfix instance of its own (bench/postfix_instance.py, ``postfix -c
DIR`` on a free port, as the shared peers recipe does): the shared instance's routing cannot
be changed for a per-test port without disturbing the other tests using it, and it has no
unknown users (every address lands in a catch-all Maildir). Here ``local.test`` is delivered
by local(8) with no recipient table, so an unknown user is accepted and then bounced, and
the bounce, for ``bounce.test``, is relayed to the test's Postroom listener.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from serve_proc import free_port, serve_in_process
from sqlalchemy import select

from postroom import bounces
from postroom.exceptions import ConfigError, EventError
from postroom.store.schema import delivery_events, messages, suppressions
from postroom.webhooks import Kind

KEY = b"k" * 32
MSG_ID = "0f3c5e1a9b7d4c2e8f6a1b3c5d7e9f01"


# -- the return path -----------------------------------------------------------------------------
def test_verp_round_trip_and_forgeries() -> None:
    verp = bounces.Verp("bounces@example.com", KEY)
    addr = verp.address(MSG_ID)
    assert addr.startswith(f"bounces+{MSG_ID}.") and addr.endswith("@example.com")
    assert verp.message_of(addr) == MSG_ID
    assert verp.message_of(addr.upper()) == MSG_ID  # an MTA that changes the case
    local, _, domain = addr.partition("@")
    other = "1" * 32
    forged = [
        f"bounces+{other}.{local.rsplit('.', 1)[1]}@{domain}",  # someone else's message
        local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain,  # a changed tag
        "bounces@example.com", f"bounces+{MSG_ID}@example.com",
        addr.replace("example.com", "example.org"), "user@example.com",
    ]
    for a in forged:
        assert verp.message_of(a) is None, a
    assert verp.is_ours("bounces@example.com") and verp.is_ours(forged[1])
    assert not verp.is_ours("user@example.com")
    # Another instance's key signs differently.
    assert bounces.Verp("bounces@example.com", b"x" * 32).message_of(addr) is None


def test_bounce_address_setting_is_checked() -> None:
    for bad in ("bounces", "b+x@example.com", "@example.com", "bö@example.com"):
        with pytest.raises(ValueError):
            bounces.BounceSettings(address=bad)
    with pytest.raises(ValueError):
        bounces.BounceSettings(address="b@example.com", networks=["not-a-net"])


def test_bounces_names_smtp_connections_only(tmp_path: Path) -> None:
    from postroom import settings

    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f"""
[server]
data_dir = "{tmp_path / 'data'}"

[[connections]]
name = "mem"
transport = "memory"

[bounces]
address = "bounces@bounce.test"
connections = ["mem", "nowhere"]
""")
    with pytest.raises(ConfigError, match="'mem', 'nowhere', not an SMTP connection"):
        bounces.configured(settings.load(cfg))


# -- the report ----------------------------------------------------------------------------------
def _dsn(action: str = "failed", status: str = "5.1.1", *, rfc822: bool = False) -> bytes:
    """A report shaped as Postfix writes one (bounce(8)), with the original's headers."""
    original = (b"Message-ID: <orig-1@shop.example>\r\nFrom: shop@shop.example\r\n"
                b"Subject: hello\r\n")
    orig_part = (b"Content-Type: message/rfc822\r\n\r\n" + original + b"\r\nbody\r\n"
                 if rfc822 else b"Content-Type: text/rfc822-headers\r\n\r\n" + original)
    return (b"From: MAILER-DAEMON@mta.example (Mail Delivery System)\r\n"
            b"To: bounces+x@bounce.example\r\nSubject: Undelivered Mail Returned to Sender\r\n"
            b"Message-Id: <dsn-1@mta.example>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=delivery-status;\r\n"
            b"\tboundary=\"B\"\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
            b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
            b"Reporting-MTA: dns; mta.example\r\nX-Postfix-Queue-ID: 4F1\r\n"
            b"Arrival-Date: Mon,  7 Dec 2026 07:40:00 +0000 (UTC)\r\n\r\n"
            b"Final-Recipient: rfc822; nobody@local.test\r\n"
            b"Original-Recipient: rfc822;nobody@local.test\r\n"
            b"Action: " + action.encode() + b"\r\nStatus: " + status.encode() + b"\r\n"
            b"Diagnostic-Code: X-Postfix; unknown user: \"nobody\"\r\n\r\n"
            b"Final-Recipient: rfc822; other@local.test\r\nAction: delayed\r\n"
            b"Status: 4.4.1\r\n\r\n"
            b"--B\r\n" + orig_part + b"\r\n--B--\r\n")


@pytest.mark.parametrize("rfc822", [False, True])
def test_parse_a_postfix_report(rfc822: bool) -> None:
    report = bounces.parse(_dsn(rfc822=rfc822))
    assert report.reporting_mta == "mta.example"
    assert report.original_message_id == "<orig-1@shop.example>"
    assert [(r.recipient, r.action, r.status) for r in report.recipients] == [
        ("nobody@local.test", "failed", "5.1.1"), ("other@local.test", "delayed", "4.4.1")]
    assert report.recipients[0].diagnostic == 'unknown user: "nobody"'
    evs = bounces.events(report, 1.0)
    assert [(e.kind, e.permanent) for e in evs] == [(Kind.BOUNCED, True), (Kind.DEFERRED, None)]
    assert evs[0].detail == '5.1.1 unknown user: "nobody"'
    assert evs[0].message_id_header == "<orig-1@shop.example>"
    # The same report twice has the same event ids (recorded once).
    assert [e.event_id for e in bounces.events(bounces.parse(_dsn(rfc822=rfc822)), 2.0)] == \
        [e.event_id for e in evs]
    soft = bounces.events(bounces.parse(_dsn(status="4.2.2")), 1.0)[0]
    assert (soft.kind, soft.permanent) == (Kind.BOUNCED, False)


def test_what_is_not_a_report_is_refused() -> None:
    plain = b"From: a@example.com\r\nSubject: out of office\r\n\r\nI am away.\r\n"
    for raw in (plain, _dsn().replace(b"message/delivery-status", b"text/plain"),
                _dsn().replace(b"Final-Recipient", b"X-Nothing").replace(b"Action", b"X-No")):
        with pytest.raises(EventError):
            bounces.parse(raw)


# -- Postroom's listener and a real Postfix ------------------------------------------------------
def _postfix_instance() -> Any:
    """bench/postfix_instance.py's PostfixInstance (the benchmarks' private Postfix)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "postfix_instance.py"
    spec = importlib.util.spec_from_file_location("postfix_instance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PostfixInstance


@pytest.fixture
def ports() -> dict[str, int]:
    return {"smtp": free_port()}


@pytest.fixture
def postfix(ports: dict[str, int]) -> Iterator[Any]:
    """A Postfix of this test's own on a free port: ``local.test`` delivered by local(8)
    with no recipient table (an unknown user is accepted, then bounced), everything else
    (the bounce address's domain) relayed to the test's Postroom listener."""
    if os.geteuid() != 0 or shutil.which("postfix") is None:
        pytest.fail("this test runs its own Postfix instance: it needs root and postfix "
                    "(tests/peers/mailserver.sh install)", pytrace=False)
    # Under /tmp itself: Postfix's daemons (user postfix) must reach the queue folder, and
    # pytest's tmp_path sits under a root-only folder.
    root = Path(tempfile.mkdtemp(prefix="postroom-dsn-", dir="/tmp"))
    pf = _postfix_instance()(root, free_port(), ports["smtp"], overrides={
        "myhostname": "mta.dsn-test.invalid", "mydestination": "local.test",
        "local_transport": "local", "delay_warning_time": "0"})
    try:
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


def _maillog(pf: Any) -> str:
    path = Path(pf.root) / "maillog"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _config(tmp_path: Path, smtp_port: int, relay_port: int, networks: str = "") -> Path:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f"""
[server]
data_dir = "{tmp_path / 'data'}"
smtp_listen = "127.0.0.1:{smtp_port}"
http_listen = ""
hostname = "postroom.dsn-test.invalid"

[[connections]]
name = "postfix"
transport = "smtp"
host = "127.0.0.1"
port = {relay_port}
security = "none"

[bounces]
address = "bounces@bounce.test"
connections = ["postfix"]
{networks}
""")
    return cfg


def _send(port: int, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "shop@shop.example", to, subject
    msg["Message-ID"] = f"<{subject}@shop.example>"
    msg.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg)


def test_postfix_bounce_comes_back_and_is_linked(tmp_path: Path, ports: dict[str, int],
                                                postfix: Any,
                                                unique_subject: str) -> None:
    from postroom.store.db import make_engine

    cfg = _config(tmp_path, ports["smtp"], postfix.port)
    db = make_engine(f"sqlite:///{tmp_path / 'data' / 'postroom.db'}")

    def work() -> tuple[Any, list[Any], list[Any]]:
        _send(ports["smtp"], "nobody-here@local.test", unique_subject)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with db.connect() as conn:
                msg = conn.execute(select(messages.c.id, messages.c.status).where(
                    messages.c.subject == unique_subject)).first()
                found = conn.execute(select(delivery_events)).all()
                if found:
                    listed = conn.execute(select(suppressions)).all()
                    return msg, found, listed
            time.sleep(0.2)
        raise AssertionError(f"no delivery report came back; Postfix log:\n{_maillog(postfix)}")

    msg, found, listed = serve_in_process(cfg, work)
    db.dispose()
    assert msg is not None and msg.status == "sent"  # Postfix took it; the bounce came later
    [ev] = found
    assert (ev.message_id, ev.kind, ev.recipient, ev.connection, ev.permanent) == (
        msg.id, "bounced", "nobody-here@local.test", "postfix", True)
    assert ev.detail.startswith("5.1.1")
    assert "mta.dsn-test.invalid" in ev.raw
    # The return path Postfix answered was the message's signed one, and the hard bounce
    # put the address on the suppression list.
    assert f"bounces+{msg.id}." in _maillog(postfix)
    assert [(r.address, r.message_id) for r in listed] == [("nobody-here@local.test", msg.id)]


def test_listener_takes_signed_reports_only(tmp_path: Path, ports: dict[str, int]) -> None:
    """The listener's side alone: a report to a forged return path is refused at RCPT, a
    report without AUTH from outside [bounces] networks is refused at MAIL, one from inside
    is taken only for Postroom's return paths, and no report is ever queued."""
    from postroom import settings
    from postroom.store.db import make_engine

    cfg = _config(tmp_path, ports["smtp"], free_port(), networks='networks = ["127.0.0.2"]')
    verp = bounces.Verp.of(settings.load(cfg), bounces.BounceSettings(
        address="bounces@bounce.test"))

    def work() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30,
                          source_address=("127.0.0.3", 0)) as s:
            s.ehlo("mx.example")
            out["outside"] = s.mail("<>")
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30,
                          source_address=("127.0.0.2", 0)) as s:
            s.ehlo("mx.example")
            out["mail"] = s.mail("<>")
            out["ordinary"] = s.rcpt("someone@example.com")
            out["forged"] = s.rcpt("bounces+" + "1" * 32 + ".aaaaaaaaaaaaaaaa@bounce.test")
            out["bare"] = s.rcpt("bounces@bounce.test")
            out["signed"] = s.rcpt(verp.address(MSG_ID))
            out["data"] = s.data(_dsn())
            s.mail("<>")
            s.rcpt(verp.address(MSG_ID))
            out["not_a_report"] = s.data(b"Subject: away\r\n\r\nI am on holiday.\r\n")
        return out

    got = serve_in_process(cfg, work)
    assert got["outside"][0] == 530
    assert got["mail"][0] == 250
    assert got["ordinary"][0] == 530
    assert got["forged"][0] == got["bare"][0] == 550
    assert got["signed"][0] == 250
    # Taken, for a message this instance does not have: nothing attached, nothing queued.
    assert got["data"][0] == 250 and b"delivery report recorded" in got["data"][1]
    assert got["not_a_report"][0] == 550
    db = make_engine(f"sqlite:///{tmp_path / 'data' / 'postroom.db'}")
    with db.connect() as conn:
        assert conn.execute(select(messages.c.id)).all() == []
    db.dispose()
