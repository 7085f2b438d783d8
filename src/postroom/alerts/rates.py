"""The figures of the bounce and complaint rate rule (``[[alerts]] bounce_rate``,
``complaint_rate``): per connection, the messages sent in the rule's ``rate_minutes`` and
the bounces and complaints its provider reported in that time (``delivery_events``, from
the webhooks and the DSNs of postroom.bounces).

Two grouped queries, each a range of an index, run every FACTS_EVERY seconds by the
dispatcher: the sent messages from the log's hourly rollups (primary key: hour first; so
the window starts at its first hour's start, up to an hour early), the events from
``ix_delivery_events_kind`` (kind, received_at). A bounce counts when it is hard or the
provider did not say: Amazon SES's bounce rate counts hard bounces only, and a soft bounce
is a message still on its way. The rate is per message sent: a message to several
recipients counts once in the sent figure and once per recipient that bounced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy import Connection, func, select

from postroom.alerts.config import AlertRule
from postroom.alerts.rules import Rate
from postroom.store.schema import delivery_events, log_rollups, messages
from postroom.store.states import PARTIAL, SENT

HOUR = 3600.0
BOUNCED, COMPLAINED = "bounced", "complained"  # postroom.webhooks.Kind values


def read(conn: Connection, rule: AlertRule, now: float) -> dict[str, Rate]:
    """Connection -> its sent messages, bounces and complaints in ``rule``'s window, for
    the connections and apps the rule names (every one when it names none)."""
    since = now - rule.rate_minutes * 60
    r, d, m = log_rollups.c, delivery_events.c, messages.c
    sent_q = (select(r.connection, func.sum(r.count))
              .where(r.hour >= math.floor(since / HOUR) * HOUR, r.status.in_((SENT, PARTIAL)))
              .group_by(r.connection))
    events_q = (select(d.connection, d.kind, func.count())
                .where(d.kind.in_((BOUNCED, COMPLAINED)), d.received_at >= since,
                       (d.kind != BOUNCED) | d.permanent.is_not(False))
                .group_by(d.connection, d.kind))
    if rule.connections:
        sent_q = sent_q.where(r.connection.in_(rule.connections))
        events_q = events_q.where(d.connection.in_(rule.connections))
    if rule.apps:
        sent_q = sent_q.where(r.app.in_(rule.apps))
        # few rows (bounces and complaints only), each joined by the messages' primary key
        events_q = events_q.join(messages, m.id == d.message_id).where(m.app.in_(rule.apps))
    sent = {str(c): int(n or 0) for c, n in conn.execute(sent_q) if c}
    counts: dict[tuple[str, str], int] = {(str(c), str(k)): int(n)
                                          for c, k, n in conn.execute(events_q)}
    out = {}
    for name in sorted(set(sent) | {c for c, _ in counts}):
        out[name] = Rate(sent.get(name, 0), counts.get((name, BOUNCED), 0),
                         counts.get((name, COMPLAINED), 0))
    return out


def read_all(conn: Connection, rules: Sequence[AlertRule], now: float
             ) -> dict[str, dict[str, Rate]]:
    """:func:`read` for each rule that has a rate line; rules with the same window and
    filters share one reading."""
    out: dict[str, dict[str, Rate]] = {}
    shared: dict[tuple[float, tuple[str, ...], tuple[str, ...]], dict[str, Rate]] = {}
    for rule in rules:
        if not (rule.bounce_rate or rule.complaint_rate):
            continue
        key = (rule.rate_minutes, tuple(sorted(rule.connections)), tuple(sorted(rule.apps)))
        if key not in shared:
            shared[key] = read(conn, rule, now)
        out[rule.name] = shared[key]
    return out
