"""The alerts chore of `postroom serve` (and `postroom worker`): read the events written
since the last tick, apply the rules, write the alerts to the outbox, send the rows that are
due. The cursor and the open incidents are kept in the ``control`` table (``alerts.state``),
written in the same transaction as the outbox rows: a restart neither alerts twice nor loses
an alert. Several nodes may run it: the one whose transaction finds the cursor moved gives
its tick up, and each outbox row is claimed before it is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, delete, func, insert, select

from postroom import events
from postroom.alerts import Alert, Change, Channel, ChannelConfig, make_channel, outbox, scheme
from postroom.alerts.config import MAX_ATTEMPTS, AlertRule, AlertsSettings
from postroom.alerts.rates import read_all as read_rates
from postroom.alerts.rules import Facts, State, decide
from postroom.exceptions import AlertError, PostroomError
from postroom.store.db import write_transaction
from postroom.store.schema import control, messages, oauth_grants
from postroom.store.states import FAILED, WAITING

if TYPE_CHECKING:
    from postroom.settings import Settings

log = logging.getLogger("postroom.alerts")
STATE = "alerts.state"
PAGES = 20  # pages of events.READ_LIMIT read in one tick at most (the rest next tick)
INTERVAL = 2.0  # seconds between ticks
# The store's figures (failed messages, the oldest waiting one) are read this often, not at
# every tick: counting failed messages reads an index range each time.
FACTS_EVERY = 15.0
PRUNE_EVERY = 3600.0  # seconds between deletions of old outbox rows
# A tick that only moved the cursor (events read, none alerting: a busy worker's
# fallback_used, lease_expired...) keeps its state in memory and writes it this often, not
# at every tick: a write transaction every 2 s on the queue's database for nothing. After a
# crash those events are read again; the outbox's keys keep any alert from going twice.
SAVE_EVERY = 30.0


def _load(conn: Connection, *, lock: bool = False) -> str | None:
    q = select(control.c.value).where(control.c.name == STATE)
    value = conn.execute(q.with_for_update() if lock else q).scalar()
    return None if value is None else str(value)


def _save(conn: Connection, state: State, now: float) -> str:
    text = json.dumps(state.as_dict())
    conn.execute(delete(control).where(control.c.name == STATE))
    conn.execute(insert(control).values(name=STATE, value=text, updated_at=now))
    return text


def _lasting(state_text: str) -> str:
    """What of a state must be written at once: all but the cursor and the held counts."""
    d = json.loads(state_text)
    return json.dumps({k: v for k, v in d.items() if k not in ("cursor", "held")})


class Dispatcher:
    def __init__(self, engine: Engine, settings: Callable[[], Settings], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine, self.settings, self.clock = engine, settings, clock
        self._facts_cache: tuple[float, Facts] | None = None
        self._pruned_at = 0.0
        # The state as stored (its text) and this node's, which may be ahead of it by
        # SAVE_EVERY seconds of cursor; dropped when another node writes the stored one.
        self._kept: tuple[str, State] | None = None
        self._saved_at = 0.0
        # channel id -> (what it was made from, the channel): kept between alerts, so the
        # webhook's HTTP client keeps its connection alive for the next one
        self._channels: dict[str, tuple[tuple[object, ...], Channel]] = {}

    @property
    def config(self) -> AlertsSettings:
        return self.settings().section(AlertsSettings)

    async def tick(self) -> None:
        if not self.config.rules:
            return
        await asyncio.to_thread(self.evaluate)
        await self.deliver()
        now = self.clock()
        keep = self.settings().retention.keep_rows_days
        if keep and now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            await asyncio.to_thread(outbox.prune, self.engine, now - keep * 86400)

    # -- rules -> outbox ---------------------------------------------------------------------
    def evaluate(self) -> list[Alert]:
        """Apply the rules to the new events; the alerts written to the outbox."""
        cfg, now = self.config, self.clock()
        with self.engine.connect() as conn:
            stored = _load(conn)
        if self._kept is not None and self._kept[0] == stored:
            state = self._kept[1]
        else:  # the stored one; none at the first start: what came before is history
            state = (State.from_dict(json.loads(stored)) if stored is not None
                     else State(cursor=events.last_id(self.engine)))
        found: list[events.Event] = []
        for _ in range(PAGES):
            page = events.read(self.engine, after_id=state.cursor if not found else found[-1].id,
                               limit=events.READ_LIMIT)
            found += page
            if len(page) < events.READ_LIMIT:
                break
        alerts = decide(cfg.rules, state, found, self.facts(cfg.rules, now), now,
                        self._apps(cfg.rules, found))
        after = json.dumps(state.as_dict())
        if not alerts and stored is not None and (after == stored or (
                _lasting(after) == _lasting(stored) and now - self._saved_at < SAVE_EVERY)):
            self._kept = (stored, state)  # nothing to write now (SQLite: one writer)
            return []
        self._kept = None
        with write_transaction(self.engine) as conn:
            if _load(conn, lock=True) != stored:
                return []  # another node wrote the state since: its tick did this one's work
            off = outbox_disabled(conn)
            by_rule = {r.name: r for r in cfg.rules}
            for alert in alerts:
                rule = by_rule[alert.rule]
                outbox.add(conn, [alert], [c for c in rule.channel_ids() if c not in off], now)
            saved = _save(conn, state, now)
        self._kept, self._saved_at = (saved, state), now
        return alerts

    def facts(self, rules: Sequence[AlertRule], now: float) -> Facts:
        cached = self._facts_cache
        if cached is None or not 0 <= now - cached[0] < FACTS_EVERY:
            self._facts_cache = cached = (now, self._read_facts(rules, now))
        return cached[1]

    def _read_facts(self, rules: Sequence[AlertRule], now: float) -> Facts:
        m = messages.c
        failures: dict[str, int] = {}
        with self.engine.connect() as conn:
            for rule in rules:
                if not rule.failures:
                    continue
                q = select(func.count()).where(m.status == FAILED,
                                               m.updated_at >= now - rule.failures_minutes * 60)
                if rule.apps:
                    q = q.where(m.app.in_(rule.apps))
                if rule.connections:
                    q = q.where(m.via.in_(rule.connections))
                failures[rule.name] = int(conn.execute(q).scalar_one())
            oldest = None
            if any(r.queue_age for r in rules):
                oldest = conn.execute(select(func.min(m.created_at))
                                      .where(m.status.in_(WAITING))).scalar()
            expires: dict[str, float] = {}
            if any(r.oauth_days for r in rules):
                g = oauth_grants.c
                expires = {r.connection: float(r.refresh_expires_at) for r in conn.execute(
                    select(g.connection, g.refresh_expires_at)
                    .where(g.refresh_expires_at.is_not(None))).all()}
            rates = read_rates(conn, rules, now)
        return Facts(failures, None if oldest is None else float(oldest), expires, rates)

    def _apps(self, rules: Sequence[AlertRule],
              found: Sequence[events.Event]) -> dict[str, str | None]:
        ids = sorted({e.message_id for e in found if e.message_id})
        if not ids or not any(r.apps for r in rules):
            return {}
        out: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                out.update({r.id: r.app for r in conn.execute(
                    select(messages.c.id, messages.c.app)
                    .where(messages.c.id.in_(ids[i:i + 500]))).all()})
        return out

    # -- outbox -> channels ------------------------------------------------------------------
    async def deliver(self) -> int:
        """Send the rows due now; how many went."""
        rows = await asyncio.to_thread(outbox.claim_due, self.engine, self.clock())
        results = await asyncio.gather(*(self._send(row) for row in rows))
        return sum(results)

    async def _send(self, row: outbox.Row) -> bool:
        known = self.config.channel_ids()
        if row.channel not in known:
            await asyncio.to_thread(outbox.failed, self.engine, row, "the channel is no "
                                    "longer configured", self.clock(), final=True)
            return False
        rule, url = known[row.channel]
        try:
            await (await self._channel(row.channel, rule, url)).send(row.alert)
        except PostroomError as err:
            await asyncio.to_thread(self._failed, row, err)
            return False
        except Exception as err:  # a channel library's own error: retried like any other
            await asyncio.to_thread(self._failed, row, AlertError(f"{type(err).__name__}: "
                                                                   f"{err}"))
            return False
        await asyncio.to_thread(outbox.sent, self.engine, row, self.clock())
        return True

    async def _channel(self, cid: str, rule: AlertRule, url: str) -> Channel:
        """Channel ``cid``, made once and kept while its rule, the settings and the event
        loop are the same (a reload or another loop, as in `postroom alerts test`, makes a
        new one: a client's connections belong to the loop that opened them)."""
        settings = self.settings()
        made_of = (rule, url, id(settings), id(asyncio.get_running_loop()))
        kept = self._channels.get(cid)
        if kept is not None and kept[0] == made_of:
            return kept[1]
        if kept is not None and kept[0][3] == made_of[3]:
            await close_channel(kept[1])
        channel = channel_for(rule, url, settings, self.engine)
        self._channels[cid] = (made_of, channel)
        return channel

    async def aclose(self) -> None:
        """Close the kept channels' clients (the dispatcher stops)."""
        kept, self._channels = self._channels, {}
        loop = id(asyncio.get_running_loop())
        for made_of, channel in kept.values():
            if made_of[3] == loop:
                await close_channel(channel)

    def _failed(self, row: outbox.Row, err: PostroomError) -> None:
        now = self.clock()
        final = err.permanent or row.attempts + 1 >= MAX_ATTEMPTS
        log.warning("alert %s to channel %s failed (try %d): %s", row.alert.key, row.channel,
                    row.attempts + 1, err)
        outbox.failed(self.engine, row, str(err), now, final=final)
        if final:
            self.disable(row.channel, str(err), now)

    def disable(self, channel: str, why: str, now: float) -> None:
        """Disable ``channel`` and say so on every other channel that is on."""
        cfg = self.config
        with write_transaction(self.engine) as conn:
            if not outbox.disable(conn, channel, why, now):
                return
            off = outbox_disabled(conn)
            others = [c for c in cfg.channel_ids() if c != channel and c not in off]
            rule = cfg.channel_ids()[channel][0].name if channel in cfg.channel_ids() else "-"
            alert = Alert(f"channel_disabled:{channel}:{now:.3f}", rule, Change.CHANNEL_DISABLED,
                          "error", "channel_disabled", f"alert channel {channel} disabled",
                          f"alert channel {channel} failed for good and is disabled: {why}. "
                          f"Fix it, then run `postroom alerts enable {channel}`.", now)
            outbox.add(conn, [alert], others, now)
        log.error("alert channel %s disabled: %s", channel, why)


def outbox_disabled(conn: Connection) -> set[str]:
    rows = conn.execute(select(control.c.name).where(
        control.c.name.like(outbox.DISABLED + "%"))).scalars()
    return {n[len(outbox.DISABLED):] for n in rows}


def channel_for(rule: AlertRule, url: str, settings: Settings | None = None,
                engine: Engine | None = None) -> Channel:
    """The channel of ``url``; ``settings`` and ``engine`` for those that send through
    Postroom's own parts (email)."""
    secret = None
    if scheme(url).startswith("webhook+"):
        from pathlib import Path

        from postroom.secrets import resolve

        secret = resolve(f"alert rule {rule.name}", "webhook_secret",
                         env=rule.webhook_secret_env,
                         file=Path(rule.webhook_secret_file) if rule.webhook_secret_file
                         else None, stored=rule.webhook_secret)
    return make_channel(ChannelConfig(url, secret, rule=rule, settings=settings,
                                      engine=engine))


async def close_channel(channel: Channel) -> None:
    """Close a channel that holds a client (``aclose``, as the webhook's); a failure to
    close is logged, never raised: the channel is dropped either way."""
    close = getattr(channel, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.warning("alerts: closing a channel failed", exc_info=True)


async def run(dispatcher: Dispatcher, interval: float = INTERVAL) -> None:
    """Tick until cancelled; a failing tick is logged and the next one tries again. The
    kept channels are closed when it stops."""
    try:
        while True:
            try:
                await dispatcher.tick()
            except Exception:
                log.exception("alerts: a tick failed; trying again in %.0f s", interval)
            await asyncio.sleep(interval)
    finally:
        await dispatcher.aclose()
