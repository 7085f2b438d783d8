"""The provider's id for each message (issue 14): kept on the attempt row
(``attempts.provider_id``, migration 0012), found again by (connection, id) for delivery
events, shown by `postroom show`; for SMTP, the queue id of the server's final reply (the
real Postfix peer). Store tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest
from queue_helpers import FakeClock, run
from sqlalchemy import Engine, inspect, select
from test_retry_after import Provider, deliver, worker

from postroom.envelope import Envelope
from postroom.queue.sql import Queue
from postroom.smtpwire import queue_id
from postroom.store.attempts import messages_for_provider_ids
from postroom.store.schema import attempts
from postroom.transports.base import TransportContext
from postroom.transports.smtp import Settings, Transport


def test_the_provider_id_is_kept_and_finds_the_message(queue: Queue, clock: FakeClock) -> None:
    w = worker(queue, clock, "node-a", Provider("api", [30]), Provider("backup"))

    async def go() -> list[list[dict[str, Any]]]:
        return [await deliver(queue, w, f"u{i}@example.test") for i in range(3)]

    runs = run(queue, go)
    assert [[(a["connection"], a["provider_id"]) for a in r] for r in runs] == [
        [("api", None), ("backup", "backup-1")],  # a 429 names no message
        [("backup", "backup-2")],  # api held: not tried
        [("backup", "backup-3")]]
    with queue.engine.connect() as conn:
        stored = {r.provider_id: r.message_id for r in conn.execute(
            select(attempts.c.provider_id, attempts.c.message_id))}
    assert queue.message_for_provider_id("backup", "backup-2") == stored["backup-2"]
    assert queue.message_for_provider_id("api", "backup-2") is None  # another connection's
    assert queue.message_for_provider_id("backup", "nope") is None
    wanted = ["backup-1", "backup-3", "nope", ""]
    assert messages_for_provider_ids(queue.engine, "backup", wanted) == {
        "backup-1": stored["backup-1"], "backup-3": stored["backup-3"]}
    assert messages_for_provider_ids(queue.engine, "backup", []) == {}


def test_show_prints_the_provider_id(capsys: pytest.CaptureFixture[str]) -> None:
    from postroom.cli import _print_attempt

    _print_attempt({"connection": "api", "started_at": 1.8e9, "ended_at": 1.8e9 + 0.2,
                    "outcome": "sent", "recipients": {}, "provider_id": "0a1b-2c3d"})
    assert "provider id: 0a1b-2c3d" in capsys.readouterr().out


def test_migration_0012_goes_down_and_up(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    from postroom.store.db import MIGRATIONS, write_transaction

    def columns(table: str) -> set[str]:
        with engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns(table)}

    def to(revision: str, up: bool) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with write_transaction(engine) as conn:
            cfg.attributes["connection"] = conn
            (command.upgrade if up else command.downgrade)(cfg, revision)

    assert {"provider_id"} <= columns("attempts") and "held_until" in columns("connection_state")
    to("0011", up=False)
    assert "provider_id" not in columns("attempts")
    assert "held_until" not in columns("connection_state")
    to("head", up=True)
    assert "provider_id" in columns("attempts") and "held_until" in columns("connection_state")
    with engine.connect() as conn:
        assert "ix_attempts_provider" in {i["name"] for i in inspect(conn).get_indexes("attempts")}


@pytest.mark.parametrize(("reply", "found"), [
    ("2.0.0 Ok: queued as 4Xyz12AbC", "4Xyz12AbC"),  # Postfix
    ("Ok: queued as dIrFTM4aQj-Y0F3dnJx8Ug", "dIrFTM4aQj-Y0F3dnJx8Ug"),  # SendGrid
    ("OK id=1q2w3e-0004Rt-Ab", "1q2w3e-0004Rt-Ab"),  # Exim
    ("2.0.0 OK  1712345678 a1b2c3d4e5.45 - gsmtp", "a1b2c3d4e5.45"),  # Gmail
    ("2.0.0 x8ABCdef012345 Message accepted for delivery", "x8ABCdef012345"),  # Sendmail
    ("Ok 0100018c8f1a2b3c-1a2b3c4d-aaaa-bbbb-cccc-111122223333-000000",
     "0100018c8f1a2b3c-1a2b3c4d-aaaa-bbbb-cccc-111122223333-000000"),  # Amazon SES
    ("2.0.0 Ok", None),
    ("Great success", None),
    ("", None),
])
def test_queue_id_of_a_final_reply(reply: str, found: str | None) -> None:
    assert queue_id(reply) == found


@pytest.mark.peers
def test_postfix_queue_id_is_the_provider_id(peers: Any) -> None:
    """The real Postfix names its queue id in the final reply; the same id is in the
    Received header of the delivered copy ("with ESMTP id ...")."""
    subject = f"postroom-queue-id-{uuid.uuid4().hex[:12]}"
    raw = (f"From: app@example.org\r\nTo: testuser@example.test\r\nSubject: {subject}\r\n"
           "\r\nbody\r\n").encode()
    settings = Settings(name="peer", host="127.0.0.1", port=peers.plain_port,
                        security="none", connect_timeout=10, timeout=30)

    async def go() -> str | None:
        t = Transport(settings, TransportContext(ehlo_name="postroom.test"))
        try:
            result = await asyncio.wait_for(
                t.send(Envelope("app@example.org", ["testuser@example.test"], raw)), 60)
        finally:
            await t.aclose()
        return result.provider_id

    provider_id = asyncio.run(go())
    assert provider_id
    stored = peers.wait_for("testuser@example.test", subject, timeout=30).raw
    assert re.search(rb"with E?SMTP id " + re.escape(provider_id.encode()), stored)

