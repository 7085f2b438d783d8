"""Email alerts sent by Postroom itself: ``[[alerts]] email = ["ops@example.com"]``.

Not through the queue: the queue, or the connection the alert is about, may be what is
failing. The channel sends each alert at once, on the first path that takes it, decided at
send time from the connections' health (postroom.routing.health, shared through the
database):

1. the rule's ``email_connection`` (a connection kept for alerts), unless it is paused, its
   circuit is open or its provider asked to be left alone (Retry-After);
2. straight to each recipient domain's MX hosts (:mod:`.mx`), unless ``email_direct =
   false``;
3. the connections of the routes that would carry the alert, in the routes' order, whose
   circuit is closed.

Never the connection the alert is about (``Alert.connection``). The message says which path
took it, and what was tried before. Recipients one path did not take go on to the next;
when no path took one of them the channel fails and the outbox tries again later (so a
recipient a path did take may get that alert twice: never none).

The message is built by postroom.message (text only), its Subject starts "[Postroom]", and
``Auto-Submitted: auto-generated`` (RFC 3834) keeps auto-responders from answering it; a
connection's DKIM key signs it as it signs the connection's mail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sqlalchemy import Engine, select

from postroom import dkim, transports
from postroom.alerts import Alert, ChannelConfig, mx, outbox
from postroom.alerts.config import AlertRule
from postroom.diagnostics.dns import Resolver
from postroom.envelope import Envelope
from postroom.exceptions import AlertError, ConfigError, PostroomError
from postroom.message import Draft, build
from postroom.routing.health import DOWN, State
from postroom.routing.rules import Facts, Router
from postroom.settings import Settings
from postroom.store.schema import connection_state
from postroom.transports.base import DeliveryResult, Transport, TransportContext

log = logging.getLogger("postroom.alerts")
# Every path of one send together: less than the outbox's claim on the row, so that no other
# node takes the row (and sends the alert again) while this one is still trying.
BUDGET = outbox.CLAIM * 0.8
SOURCE = "alert"
HEADERS = {
    "Auto-Submitted": "auto-generated",  # RFC 3834: no vacation or out-of-office replies
    "X-Auto-Response-Suppress": "All",  # the same, for Microsoft Exchange
}


def health(engine: Engine) -> dict[str, State]:
    """Every connection's health row, fresh (an alert is no hot path)."""
    with engine.connect() as conn:
        return {r.name: State(**r._mapping) for r in conn.execute(select(connection_state))}


class EmailChannel:
    def __init__(self, config: ChannelConfig) -> None:
        if config.rule is None or config.settings is None or config.engine is None:
            raise ConfigError("the email alert channel needs its rule, the settings and the "
                              "database", code="alert.email")
        self.rule: AlertRule = config.rule
        self.settings: Settings = config.settings
        self.engine: Engine = config.engine
        self.hostname = self.settings.server.hostname
        self.sender = self.rule.email_from or f"postroom@{self.hostname}"
        self._context: TransportContext | None = None

    async def send(self, alert: Alert) -> None:
        tried: list[str] = []  # each path skipped or failed, and why
        left = list(self.rule.email)
        try:
            async with asyncio.timeout(BUDGET):
                left = await self._paths(alert, left, tried)
        except TimeoutError:
            tried.append(f"no path took it within {BUDGET:.0f} s")
        if left:
            raise AlertError(f"email to {', '.join(left)}: no path took the alert: "
                             f"{'; '.join(tried)}", code="alert.email")

    async def _paths(self, alert: Alert, left: list[str], tried: list[str]) -> list[str]:
        states = await asyncio.to_thread(health, self.engine)
        now = time.time()
        designated = self._designated(alert, states, now, tried)
        if designated is not None:
            left = await self._via(designated, alert, left, tried)
        if left and self.rule.email_direct:
            left = await self._direct(alert, left, tried)
        for name in self._working(alert, states, now, designated, tried):
            if not left:
                break
            left = await self._via(name, alert, left, tried)
        return left

    # -- which connections ---------------------------------------------------------------------
    def _designated(self, alert: Alert, states: Mapping[str, State], now: float,
                    tried: list[str]) -> str | None:
        name = self.rule.email_connection
        if name is None:
            return None
        if name == alert.connection:
            tried.append(f"the alert connection {name!r} is the one this alert is about")
            return None
        why = (states.get(name) or State(name)).blocked(now)
        if why:
            tried.append(f"the alert connection {name!r} is skipped: {why}")
            return None
        return name

    def _working(self, alert: Alert, states: Mapping[str, State], now: float,
                 designated: str | None, tried: list[str]) -> list[str]:
        """The connections the routes give an alert, in order, without the one it is
        about, the designated one (tried already) and those whose circuit is not closed."""
        conns = self.settings.connections
        router = Router(self.settings.routes, conns[0].name if conns else None)
        facts = Facts(self.sender, tuple(self.rule.email), "", ("postroom-alert",), {})
        chain = dict.fromkeys(n for leg in router.legs(facts) for n in leg.chain)
        out = []
        for name in chain:
            if name in (alert.connection, designated):
                continue
            st = states.get(name) or State(name)
            # down: its circuit is open, or half-open (the workers' next message probes it)
            why = st.blocked(now) or ("its circuit is open" if st.health == DOWN else None)
            if why:
                tried.append(f"connection {name!r} is skipped: {why}")
                continue
            out.append(name)
        return out

    # -- the paths -----------------------------------------------------------------------------
    async def _via(self, name: str, alert: Alert, left: list[str],
                   tried: list[str]) -> list[str]:
        """Through connection ``name``'s own transport; the recipients it did not take."""
        how = f"sent via connection {name!r}"
        transport: Transport | None = None
        try:
            conn = self.settings.connection(name)
            username = getattr(conn, "username", None) or ""
            # A provider may take mail only from its account's address: that one, unless
            # the rule names a sender.
            sender = self.rule.email_from or (username if "@" in username else self.sender)
            transport = transports.create(conn, self.context())
            env = await dkim.sign_envelope(self.message(alert, left, how, tried, sender),
                                           transport)
            result = await transport.send(env)
        except PostroomError as err:
            tried.append(f"connection {name!r}: {err.message}")
            return left
        finally:
            if transport is not None:
                await transport.aclose()
        return self._taken(alert, result, left, how, f"connection {name!r}", tried)

    async def _direct(self, alert: Alert, left: list[str], tried: list[str]) -> list[str]:
        """To each recipient domain's MX hosts; the recipients none took."""
        try:
            resolver = Resolver(self.rule.email_dns_server)
        except PostroomError as err:
            tried.append(f"MX: {err.message}")
            return left
        domains: dict[str, list[str]] = defaultdict(list)
        for address in left:
            domains[address.rpartition("@")[2].lower()].append(address)
        ctx = TransportContext(ehlo_name=self.hostname)  # no secret goes to an MX
        out: list[str] = []
        for domain, rcpts in domains.items():
            hosts, why = await asyncio.to_thread(mx.hosts, resolver, domain)
            if not hosts:
                tried.append(f"MX of {domain}: {why}")
            for host in hosts:
                if not rcpts:
                    break

                def message(how: str, to: Sequence[str] = tuple(rcpts)) -> Envelope:
                    return self.message(alert, to, how, tried, self.sender)

                try:
                    sent = await mx.send(host, self.rule.email_mx_port, ctx, message)
                except PostroomError as err:
                    tried.append(f"MX {host.name}: {err.message}")
                    continue
                rcpts = self._taken(alert, sent.result, rcpts, sent.how, f"MX {host.name}",
                                    tried)
            out += rcpts
        return out

    def _taken(self, alert: Alert, result: DeliveryResult, sent_to: list[str], how: str,
               where: str, tried: list[str]) -> list[str]:
        left = []
        for address in sent_to:
            said = result.recipients.get(address)
            if said is not None and said.ok:
                continue
            tried.append(f"{where} refused {address}: "
                         f"{f'{said.code} {said.reply}' if said else 'no answer'}")
            left.append(address)
        if len(left) < len(sent_to):
            log.info("alert %s emailed to %s, %s", alert.key,
                     ", ".join(a for a in sent_to if a not in left), how)
        return left

    # -- what is sent ------------------------------------------------------------------------
    def context(self) -> TransportContext:
        """What a connection's transport asks for: its stored secrets and OAuth tokens, as
        postroom.runtime gives them to the workers; made at the first need."""
        if self._context is None:
            from postroom.runtime import key_file
            from postroom.secrets import SecretStore, load_or_create_key

            key = load_or_create_key(key_file(self.settings))
            tokens = None
            if any(c.oauth is not None for c in self.settings.connections):
                from postroom.oauth.tokens import TokenManager

                tokens = TokenManager(self.settings, self.engine, key)
            self._context = TransportContext(ehlo_name=self.hostname,
                                             stored_secret=SecretStore(self.engine, key).get,
                                             tokens=tokens)
        return self._context

    def message(self, alert: Alert, to: Sequence[str], how: str, tried: Sequence[str],
                sender: str) -> Envelope:
        when = dt.datetime.fromtimestamp(alert.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        about = [f"rule {alert.rule}", f"kind {alert.kind}", f"severity {alert.severity}"]
        if alert.connection:
            about.append(f"connection {alert.connection}")
        lines = [alert.text, "", f"{alert.change.value.replace('_', ' ')} at {when}; "
                 f"{', '.join(about)}.", "", f"This email was {how}."]
        if tried:
            lines.append("Tried before: " + "; ".join(tried) + ".")
        lines += ["", "-- ", f"Postroom on {self.hostname}, outside its mail queue. "
                  "`postroom alerts history` lists every alert."]
        draft = Draft(from_=sender, to=list(to), subject=f"[Postroom] {alert.title}",
                      text="\n".join(lines) + "\n", headers=HEADERS)
        return build(draft, source=SOURCE)
