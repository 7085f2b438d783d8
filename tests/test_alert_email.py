"""Email alerts (issue 15): sent by Postroom itself, on a path that does not need the
connection that is failing, into the real Postfix's Maildirs (tests/peers/mailserver.sh),
with the path named in the alert: the designated alert connection, direct to the MX (DNS
from a local dnslib server, tests/dns_helpers.py, and the rule's email_mx_port), the next
working connection of the routes; all paths down: retried, then the channel is disabled
and that is reported on the other channels. And Apprise's mailto:// to the same Postfix."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Peers, StoredMessage
from dns_helpers import DnsServer, dns_server
from queue_helpers import FakeClock
from sqlalchemy import Engine, insert
from test_alerts import Receiver
from typer.testing import CliRunner

from postroom import events
from postroom.alerts import Alert, Change
from postroom.alerts import outbox as ob
from postroom.alerts.config import MAX_ATTEMPTS, AlertsSettings
from postroom.alerts.dispatcher import Dispatcher, channel_for
from postroom.events import Event, Kind
from postroom.exceptions import AlertError, ConfigError
from postroom.settings import Settings, load
from postroom.store.db import write_transaction
from postroom.store.schema import connection_state

HOST = "127.0.0.1"
ZONE = """$TTL 60
example.test.       IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
example.test.       IN MX 10 mail.example.test.
mail.example.test.  IN A 127.0.0.1
"""


# -- set-up ----------------------------------------------------------------------------------
@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound and never listening: every connection to it is refused, for the test's
    whole length (no other process can take it meanwhile)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def address() -> str:
    return f"ops-{uuid.uuid4().hex[:10]}@example.test"


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    """DNS for the MX path: example.test's MX is mail.example.test, 127.0.0.1."""
    with dns_server(ZONE) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def connection(name: str, port: int) -> str:
    return (f'[[connections]]\nname = "{name}"\ntransport = "smtp"\nhost = "{HOST}"\n'
            f'port = {port}\nsecurity = "none"\nconnect_timeout = 5\n')


def settings(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nhostname = "alerts.test"\n'
                    f"{body}", encoding="utf-8")
    return load(path, environ={})


def dispatcher(engine: Engine, cfg: Settings, clock: FakeClock) -> Dispatcher:
    d = Dispatcher(engine, lambda: cfg, clock=clock)
    tick(d)  # first start: the events before it are history
    return d


def tick(d: Dispatcher) -> None:
    asyncio.run(d.tick())


def outage(engine: Engine, tmp_path: Path, clock: FakeClock, body: str,
           *names: str) -> Dispatcher:
    """A dispatcher on ``body``'s settings, then the primary connection down (and these):
    the alert goes out at once."""
    d = dispatcher(engine, settings(tmp_path, body), clock)
    down(engine, "primary", *names)
    tick(d)
    return d


def down(engine: Engine, *names: str) -> None:
    """These connections' circuits are open for an hour (as the workers' breaker leaves
    them), and the event says so."""
    now = time.time()
    with write_transaction(engine) as conn:
        for name in names:
            conn.execute(insert(connection_state).values(
                name=name, paused=False, health="down", failures=5, since=now,
                open_until=now + 3600, last_error="refused", last_error_at=now))
        events.record_all(conn, [Event(Kind.CONNECTION_DOWN, now, None, "primary",
                                       "5 failures in a row; last: refused")])


def alert_mail(peers: Peers, address: str) -> StoredMessage:
    return peers.wait_for(address, lambda m: str(m["Subject"]).startswith("[Postroom]"),
                          timeout=60)


def body(msg: StoredMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


# -- the paths -------------------------------------------------------------------------------
def test_alert_connection_while_the_primary_is_down(
        engine: Engine, tmp_path: Path, clock: FakeClock, peers: Peers, dead_port: int,
        address: str) -> None:
    outage(engine, tmp_path, clock, connection("primary", dead_port)
           + connection("alerts", peers.plain_port)
           + f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
           'email_connection = "alerts"\nemail_from = "postroom@example.org"\n')
    msg = alert_mail(peers, address)
    assert str(msg["Subject"]) == "[Postroom] connection_down on primary"
    assert str(msg["Auto-Submitted"]) == "auto-generated"
    assert str(msg["From"]) == "postroom@example.org"
    text = body(msg)
    assert "This email was sent via connection 'alerts'." in text
    assert "5 failures in a row; last: refused" in text and "connection primary" in text
    assert "Tried before" not in text
    (row,) = ob.history(engine)
    assert (row.channel, row.status) == ("ops#email", ob.SENT)


def test_no_alert_connection_the_next_working_one_after_the_mx(
        engine: Engine, tmp_path: Path, clock: FakeClock, peers: Peers, dead_port: int,
        address: str, dns: DnsServer) -> None:
    outage(engine, tmp_path, clock, connection("primary", dead_port)
           + connection("backup", peers.plain_port)
           + '[[routes]]\nchain = ["primary", "backup"]\n'
           f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
           f'email_dns_server = "{dns.address}"\nemail_mx_port = {dead_port}\n')
    msg = alert_mail(peers, address)
    assert str(msg["From"]) == "postroom@alerts.test"
    text = body(msg)
    assert "This email was sent via connection 'backup'." in text
    # the MX was tried first (and refused); the primary, the alert's subject, never
    assert f"MX mail.example.test: 127.0.0.1:{dead_port} refused the connection" in text
    assert "'primary'" not in text


def test_the_alert_connection_down_goes_direct_to_the_mx(
        engine: Engine, tmp_path: Path, clock: FakeClock, peers: Peers, dead_port: int,
        address: str, dns: DnsServer) -> None:
    outage(engine, tmp_path, clock, connection("primary", dead_port)
           + connection("alerts", peers.plain_port)
           + f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\nemail_connection = "alerts"\n'
           f'email_dns_server = "{dns.address}"\nemail_mx_port = {peers.plain_port}\n',
           "alerts")
    assert ("example.test.", "MX") in dns.zone.queries
    text = body(alert_mail(peers, address))
    # Postfix's port 10025 offers no STARTTLS: said so
    assert ("This email was sent direct to MX mail.example.test, in clear (it offers no "
            "STARTTLS).") in text
    assert "the alert connection 'alerts' is skipped: circuit open after 5 failures" in text


def test_all_paths_down_retried_then_disabled_and_reported(
        engine: Engine, tmp_path: Path, clock: FakeClock, dead_port: int, address: str,
        receiver: Receiver, dns: DnsServer) -> None:
    d = outage(engine, tmp_path, clock, connection("primary", dead_port)
               + connection("alerts", dead_port) + connection("backup", dead_port)
               + '[[routes]]\nchain = ["primary", "backup"]\n'
               f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
               f'channels = ["json://{HOST}:{receiver.port}/apprise"]\n'
               'email_connection = "alerts"\n'
               f'email_dns_server = "{dns.address}"\nemail_mx_port = {dead_port}\n')
    (row,) = [r for r in ob.history(engine) if r.channel == "ops#email"]
    assert row.status == ob.PENDING and row.attempts == 1
    for path in ("connection 'alerts'", "MX mail.example.test", "connection 'backup'"):
        assert f"{path}: 127.0.0.1:{dead_port} refused the connection" in row.last_error
    for _ in range(MAX_ATTEMPTS):
        clock.advance(ob.MAX_BACKOFF)
        tick(d)
    assert list(ob.disabled(engine)) == ["ops#email"]
    titles = [b["title"] for b in receiver.bodies("/apprise")]
    assert titles == ["Postroom: connection_down on primary",
                      "Postroom: alert channel ops#email disabled"]


def send_now(engine: Engine, cfg: Settings, about: str | None) -> str:
    """The email channel's send of one alert about connection ``about`` (as `postroom
    alerts test` sends it): the error it raised."""
    (rule,) = cfg.section(AlertsSettings).rules
    [(_, url)] = rule.destinations()
    alert = Alert("k", "ops", Change.OPENED, "error", "connection_down", "down", "down",
                  time.time(), about)
    with pytest.raises(AlertError) as failed:
        asyncio.run(channel_for(rule, url, cfg, engine).send(alert))
    assert not failed.value.permanent  # the outbox tries again
    return failed.value.message


def test_never_through_the_connection_the_alert_is_about(
        engine: Engine, tmp_path: Path, dead_port: int, address: str) -> None:
    cfg = settings(tmp_path, connection("alerts", dead_port)
                   + f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
                   'email_connection = "alerts"\nemail_direct = false\n')
    said = send_now(engine, cfg, "alerts")
    assert "the alert connection 'alerts' is the one this alert is about" in said
    assert "refused" not in said  # not tried, neither as designated nor by the routes
    assert "connection 'alerts': 127.0.0.1" in send_now(engine, cfg, "primary")


def test_an_mx_with_an_untrusted_certificate_gets_nothing_in_clear(
        engine: Engine, tmp_path: Path, peers: Peers, address: str, dns: DnsServer) -> None:
    # Postfix's port 10588 offers STARTTLS with a certificate of the peers' private CA
    cfg = settings(tmp_path, f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
                   f'email_dns_server = "{dns.address}"\nemail_mx_port = {peers.legacy_port}\n')
    said = send_now(engine, cfg, "primary")
    assert f"MX mail.example.test: TLS certificate of 127.0.0.1:{peers.legacy_port} not " \
           "trusted" in said
    assert "in clear" not in said and "refused" not in said


def test_apprise_mailto_to_the_real_postfix(
        engine: Engine, tmp_path: Path, clock: FakeClock, peers: Peers, address: str) -> None:
    url = (f"mailto://{HOST}:{peers.plain_port}?to={address}&from=alerts@example.org"
           "&mode=insecure")  # Postfix's port 10025 offers no TLS
    outage(engine, tmp_path, clock, f'[[alerts]]\nname = "ops"\nchannels = ["{url}"]\n')
    msg = peers.wait_for(address, "Postroom: connection_down on primary", timeout=60)
    assert "5 failures in a row" in body(msg)


# -- configuration and commands --------------------------------------------------------------
def test_config_values_and_errors(tmp_path: Path) -> None:
    cfg = settings(tmp_path, '[[alerts]]\nname = "ops"\nemail = ["a@example.com", '
                   '"b@example.org"]\n').section(AlertsSettings)
    (rule,) = cfg.rules
    assert rule.channels == [] and rule.email_direct and rule.email_mx_port == 25
    assert cfg.channel_ids() == {"ops#email": (rule, "email://a@example.com,b@example.org")}
    both = settings(tmp_path, '[[alerts]]\nname = "ops"\nchannels = ["ntfy://n/t"]\n'
                    'email = ["a@example.com"]\n').section(AlertsSettings)
    assert list(both.channel_ids()) == ["ops#1", "ops#email"]
    many = ", ".join(f'"a{i}@example.com"' for i in range(21))
    for text, words in [
        ("", "needs somewhere to send"),
        ('email = ["not an address"]', "malformed"),
        ('email = ["a@example.com", "A@example.com"]', "twice"),
        (f"email = [{many}]", "at most 20"),
        ('email = ["a@example.com"]\nemail_from = "nobody"', "email_from"),
        ('email = ["a@example.com"]\nemail_mx_port = 0', "email_mx_port"),
        ('email = ["a@example.com"]\nemail_dns_server = "dns.example"', "IP\\[:PORT\\]"),
        ('channels = ["email://a@example.com"]', "email = \\[...\\]"),
    ]:
        with pytest.raises(ConfigError, match=words):
            settings(tmp_path, f"[[alerts]]\n{text}\n")


def test_commands_list_and_test(tmp_path: Path, peers: Peers, address: str) -> None:
    from postroom.cli import app

    settings(tmp_path, connection("alerts", peers.plain_port)
             + f'[[alerts]]\nname = "ops"\nemail = ["{address}"]\n'
             'email_connection = "alerts"\nemail_direct = false\n')
    cfg = str(tmp_path / "postroom.toml")
    runner = CliRunner()
    listed = runner.invoke(app, ["alerts", "list", "--json", "--config", cfg])
    assert listed.exit_code == 0, listed.output
    assert [(c["channel"], c["url"]) for c in json.loads(listed.output)] == [
        ("ops#email", f"email://{address}")]
    tested = runner.invoke(app, ["alerts", "test", "ops#email", "--config", cfg])
    assert tested.exit_code == 0, tested.output
    assert "ops#email: sent" in tested.output
    msg = alert_mail(peers, address)
    assert str(msg["Subject"]) == "[Postroom] test alert"
    assert "sent via connection 'alerts'" in body(msg)
