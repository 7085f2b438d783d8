"""From events and a few figures of the store to alerts: pure functions, no I/O.

An incident opens once and closes once: ``connection_down`` opens one for its connection,
``connection_up`` closes it, whatever happened between (an outage of 10,000 messages is one
alert and one "recovered"). Threshold incidents (failed messages, the oldest waiting
message's age, a refresh token dying, the providers' bounce and complaint rates) open when
the figure crosses the line and close when it is back. Other kinds (``fallback_used``,
``unknown_outcome``...) have no end: the first alerts, the next ones within ``throttle``
seconds are counted and sent as one digest.
``fallback_used`` is a warning: mail went, by another connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom.alerts import Alert, Change
from postroom.alerts.config import AlertRule
from postroom.events import Event, Kind, Severity, Subject

# Kind -> (incident family, the kinds that close it). Kinds not here are "noisy".
OPENS: dict[Kind, str] = {
    Kind.CONNECTION_DOWN: "connection_down",
    Kind.CONNECTION_PAUSED: "connection_paused",
    Kind.QUEUE_PAUSED: "queue_paused",
    Kind.OAUTH_GRANT_DEAD: "oauth",
    Kind.OAUTH_SCOPE_MISSING: "oauth",
    Kind.OAUTH_NO_GRANT: "oauth",
    Kind.OAUTH_ACCOUNT_MISMATCH: "oauth",
    Kind.OAUTH_TESTING_APP: "oauth_expiring",
    Kind.OAUTH_IDLE: "oauth_expiring",
}
CLOSES: dict[Kind, tuple[str, ...]] = {
    Kind.CONNECTION_UP: ("connection_down",),
    Kind.CONNECTION_RESUMED: ("connection_paused",),
    Kind.QUEUE_RESUMED: ("queue_paused",),
    Kind.OAUTH_GRANTED: ("oauth", "oauth_expiring"),
    Kind.OAUTH_RENEWED: ("oauth", "oauth_expiring"),
}

@dataclass
class Incident:
    rule: str
    family: str
    kind: str
    severity: str
    connection: str | None
    opened_at: float
    serial: int  # the opening event's id (or the tick's time for thresholds): in alert keys
    detail: str = ""
    alerted: bool = False  # an alert went out (down_for may hold it back)


@dataclass
class State:
    """What the dispatcher keeps between ticks (control table, as JSON)."""

    cursor: int = 0  # the last event id read
    open: dict[str, Incident] = field(default_factory=dict)
    last_alert: dict[str, float] = field(default_factory=dict)  # throttle key -> when
    held: dict[str, int] = field(default_factory=dict)  # throttle key -> events not sent

    def as_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "open": {k: vars(i) for k, i in self.open.items()},
                "last_alert": self.last_alert, "held": self.held}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> State:
        return cls(cursor=int(d.get("cursor", 0)),
                   open={k: Incident(**v) for k, v in dict(d.get("open", {})).items()},
                   last_alert={k: float(v) for k, v in dict(d.get("last_alert", {})).items()},
                   held={k: int(v) for k, v in dict(d.get("held", {})).items()})


@dataclass(frozen=True)
class Rate:
    """One connection's messages sent in a rule's ``rate_minutes``, and the bounces and
    complaints its provider reported in that time."""

    sent: int = 0
    bounced: int = 0
    complained: int = 0

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.sent + other.sent, self.bounced + other.bounced,
                    self.complained + other.complained)


# A rate incident closes once the rate is under this share of its line, not just under it:
# the window slides, so a rate hovering at the line would otherwise alert and recover over
# and over.
RECOVER = 0.8


@dataclass(frozen=True)
class Facts:
    """Figures of the store at this tick, per rule where a rule's filters change them."""

    failures: Mapping[str, int] = field(default_factory=dict)  # rule -> failed in its window
    oldest_waiting: float | None = None  # created_at of the oldest queued/deferred message
    refresh_expires: Mapping[str, float] = field(default_factory=dict)  # connection -> when
    # rule -> connection -> its sent messages, bounces and complaints in rate_minutes
    rates: Mapping[str, Mapping[str, Rate]] = field(default_factory=dict)


def _wants(rule: AlertRule, ev: Event, apps: Mapping[str, str | None]) -> bool:
    # an event about the whole queue concerns every connection
    if (rule.connections and ev.connection not in rule.connections
            and ev.subject is not Subject.QUEUE):
        return False
    if rule.apps and ev.subject is Subject.MESSAGE:
        return apps.get(ev.message_id or "") in rule.apps
    return True


def _what(ev: Event) -> str:
    return f" ({ev.connection})" if ev.connection else ""


class _Run:
    def __init__(self, state: State, now: float) -> None:
        self.state, self.now = state, now
        self.out: list[Alert] = []

    def alert(self, inc: Incident, change: Change, title: str, text: str) -> None:
        key = f"{inc.rule}:{inc.family}:{inc.connection or '*'}:{inc.serial}:{change.value}"
        sev = Severity.INFO.value if change is Change.RECOVERED else inc.severity
        self.out.append(Alert(key, inc.rule, change, sev, inc.kind, title, text, self.now,
                              inc.connection))

    def open(self, rule: AlertRule, inc: Incident, hold: float = 0) -> None:
        key = f"{rule.name}:{inc.family}:{inc.connection or '*'}"
        if key in self.state.open:
            return  # already open: the same incident
        self.state.open[key] = inc
        if hold <= 0:
            self.fire(inc)

    def fire(self, inc: Incident) -> None:
        inc.alerted = True
        where = f" on {inc.connection}" if inc.connection else ""
        self.alert(inc, Change.OPENED, f"{inc.kind}{where}", inc.detail or inc.kind)

    def close(self, rule: AlertRule, family: str, connection: str | None, why: str) -> None:
        inc = self.state.open.pop(f"{rule.name}:{family}:{connection or '*'}", None)
        if inc is not None and inc.alerted:
            self.alert(inc, Change.RECOVERED,
                       f"recovered: {inc.kind}{' on ' + connection if connection else ''}",
                       f"{why} (open since {inc.opened_at:.0f})")

    def noisy(self, rule: AlertRule, ev: Event) -> None:
        tkey = f"{rule.name}:{ev.kind.value}:{ev.connection or '*'}"
        last = self.state.last_alert.get(tkey)
        if last is not None and self.now - last < rule.throttle:
            self.state.held[tkey] = self.state.held.get(tkey, 0) + 1
            return
        self.state.last_alert[tkey] = self.now
        change = Change.OPENED
        title = f"{ev.kind.value}{_what(ev)}"
        key = f"{rule.name}:{ev.kind.value}:{ev.connection or '*'}:{ev.id}:{change.value}"
        self.out.append(Alert(key, rule.name, change, ev.severity.value, ev.kind.value, title,
                              ev.detail or ev.kind.value, self.now, ev.connection))

    def digests(self, rule: AlertRule) -> None:
        for tkey, n in list(self.state.held.items()):
            name, kind, conn = tkey.split(":", 2)
            if name != rule.name or self.now - self.state.last_alert.get(tkey, 0) < rule.throttle:
                continue
            del self.state.held[tkey]
            self.state.last_alert[tkey] = self.now
            connection = None if conn == "*" else conn
            key = f"{tkey}:{self.now:.3f}:{Change.DIGEST.value}"
            self.out.append(Alert(key, name, Change.DIGEST, Severity(Kind(kind).severity).value,
                                  kind, f"{n} more {kind}{' on ' + conn if connection else ''}",
                                  f"{n} more {kind} events in the last {rule.throttle:.0f} s",
                                  self.now, connection))


def decide(rules: Sequence[AlertRule], state: State, events: Sequence[Event], facts: Facts,
           now: float, apps: Mapping[str, str | None] | None = None) -> list[Alert]:
    """The alerts due now; ``state`` is updated in place (cursor, incidents, throttles).
    ``apps``: message id -> app, for rules that filter by app."""
    run = _Run(state, now)
    apps = apps or {}
    for ev in events:
        state.cursor = max(state.cursor, ev.id or 0)
        for rule in rules:
            _event(run, rule, ev, apps)
    for rule in rules:
        _thresholds(run, rule, facts)
        _held_back(run, rule)
        run.digests(rule)
    return run.out


def _event(run: _Run, rule: AlertRule, ev: Event, apps: Mapping[str, str | None]) -> None:
    if not _wants(rule, ev, apps):
        return
    family = OPENS.get(ev.kind)
    if family is not None:
        if ev.kind in rule.kinds:
            hold = rule.down_for if ev.kind is Kind.CONNECTION_DOWN else 0
            run.open(rule, Incident(rule.name, family, ev.kind.value, ev.severity.value,
                                    ev.connection, ev.at, ev.id or 0, ev.detail), hold)
        return
    for fam in CLOSES.get(ev.kind, ()):
        run.close(rule, fam, ev.connection, ev.kind.value)
    if ev.kind not in CLOSES and ev.kind in rule.kinds:
        run.noisy(rule, ev)


def _held_back(run: _Run, rule: AlertRule) -> None:
    """A connection down for longer than ``down_for``: its alert goes now."""
    for inc in run.state.open.values():
        if (inc.rule == rule.name and not inc.alerted
                and run.now - inc.opened_at >= rule.down_for):
            run.fire(inc)


def _thresholds(run: _Run, rule: AlertRule, facts: Facts) -> None:
    serial = int(run.now * 1000)
    if rule.failures:
        n = facts.failures.get(rule.name, 0)
        if n >= rule.failures:
            run.open(rule, Incident(
                rule.name, "failures", "failures", Severity.ERROR.value, None, run.now, serial,
                f"{n} messages failed in the last {rule.failures_minutes:g} minutes"))
        elif n == 0:
            run.close(rule, "failures", None, "no message failed in the window")
    if rule.queue_age:
        age = None if facts.oldest_waiting is None else run.now - facts.oldest_waiting
        if age is not None and age > rule.queue_age:
            run.open(rule, Incident(
                rule.name, "queue_age", "queue_age", Severity.ERROR.value, None, run.now,
                serial, f"the oldest waiting message is {age / 60:.0f} minutes old"))
        else:
            run.close(rule, "queue_age", None, "the queue is moving again")
    if rule.oauth_days:
        for conn, dies in facts.refresh_expires.items():
            if rule.connections and conn not in rule.connections:
                continue
            if dies - run.now < rule.oauth_days * 86400:
                run.open(rule, Incident(
                    rule.name, "oauth_expiry", "oauth_expiry", Severity.WARNING.value, conn,
                    run.now, serial, f"the OAuth grant of {conn} dies in "
                    f"{max(0.0, dies - run.now) / 86400:.1f} days; sign in again "
                    f"(postroom oauth login {conn})"))
            else:
                run.close(rule, "oauth_expiry", conn, "the grant was renewed")
    _rates(run, rule, facts.rates.get(rule.name, {}), serial)


def _rates(run: _Run, rule: AlertRule, by_conn: Mapping[str, Rate], serial: int) -> None:
    """Bounce and complaint rates per connection, and in all when mail went through more
    than one (with one, the total is that connection's figure: one alert, not two)."""
    figures: dict[str | None, Rate] = {conn: rate for conn, rate in by_conn.items()}
    if len(by_conn) > 1:
        figures[None] = sum(by_conn.values(), Rate())
    for conn, rate in figures.items():
        if rate.sent < rule.rate_min_sent:
            continue  # too few messages to tell: an open incident stays as it is
        for family, line, n, what in (
                ("bounce_rate", rule.bounce_rate, rate.bounced, "bounced"),
                ("complaint_rate", rule.complaint_rate, rate.complained,
                 "were reported as spam")):
            if not line:
                continue
            pct = 100 * n / rate.sent
            where = f" through {conn}" if conn else ""
            if pct >= line:
                run.open(rule, Incident(
                    rule.name, family, family, Severity.WARNING.value, conn, run.now, serial,
                    f"{n} of {rate.sent} messages sent{where} in the last "
                    f"{rule.rate_minutes:g} minutes {what} ({pct:.2f}%, the line is "
                    f"{line:g}%): providers slow down or stop senders over it"))
            elif pct < line * RECOVER:
                run.close(rule, family, conn, f"the rate is down to {pct:.2f}%")
