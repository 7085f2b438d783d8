"""The delivery worker: claim due messages with a lease, deliver, record, decide what next.

Outcome per recipient: accepted -> sent; 5xx -> failed (never retried); anything else ->
pending, retried later with backoff, until the message's lifetime runs out. Only the
recipients still pending are sent on the next try. A recipient forced by the message policy
(an archive Bcc) still pending when the message is finished is then retried on its own
(:meth:`Worker._deliver_copies`), without changing the message's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from postroom import dkim
from postroom import policy as message_policy
from postroom.envelope import Envelope, header_values
from postroom.exceptions import ConfigError, DeliveryError, PostroomError
from postroom.queue.backoff import backoff
from postroom.queue.limits import Limiter, limited
from postroom.queue.sql import Claimed, Queue, worker_id
from postroom.routing.chain import (
    Next,
    after_failure,
    counts_against_connection,
    fails_message,
    misconfigured,
    scope_of,
)
from postroom.routing.health import Health, State
from postroom.routing.rules import Facts, Leg, Route, Router
from postroom.settings import DeliverySettings
from postroom.store.schema import DEFERRED, FAILED, PARTIAL, SENDING, SENT
from postroom.transports.base import DeliveryResult, RecipientResult, Transport

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 10.0  # how often a worker refreshes its row in `workers`
BIG_BODIES_AT_ONCE = 4  # bodies over queue.sql.BODY_WITH_CLAIM in memory at a time
PAUSED_RECHECK = 15.0  # a message whose connections are all paused looks again this late
LIFETIME_OVER = "gave up: maximum lifetime reached"
HELD = ("held in the queue, not failed: the connection's configuration is wrong; once it "
        "is fixed the message goes at its next try (it fails only when its lifetime ends)")


@dataclass
class Decision:
    status: str
    next_attempt_at: float
    outcome: str
    last_error: str | None
    gave_up: str | None = None  # why recipients still pending were failed (lifetime, test)


@dataclass
class Outcome:
    """What one delivery run found out, recipient by recipient."""

    results: dict[str, RecipientResult] = field(default_factory=dict)  # tried this time
    unknown: dict[str, str] = field(default_factory=dict)  # rcpt -> connection (ambiguous)
    waits: dict[str, float] = field(default_factory=dict)  # rcpt -> retry time (limits...)
    wait_reasons: list[str] = field(default_factory=list)
    held: bool = False  # the last connection tried is misconfigured: waiting for the fix


def decide(
    msg: Claimed,
    results: dict[str, RecipientResult] | Outcome,
    now: float,
    cfg: DeliverySettings,
) -> Decision:
    """Apply one run's per-recipient results to ``msg.rcpt_status`` and pick the state.

    A recipient with an unknown outcome (the connection broke after the data was sent) is
    retried with backoff on the connection that may have delivered it; one that only waited
    (rate limit, paused or broken connections) is due again when its wait ends, and waiting
    is not counted as an attempt."""
    out = results if isinstance(results, Outcome) else Outcome(results=results)
    for rcpt, res in out.results.items():
        state = "sent" if res.ok else "failed" if res.permanent else "pending"
        msg.rcpt_status[rcpt] = {"state": state, "code": res.code, "reply": res.reply[:500]}
    for rcpt, via in out.unknown.items():
        msg.rcpt_status[rcpt] = {"state": "unknown", "via": via, "code": None, "reply": (
            f"outcome unknown: the connection to {via} broke after the message was sent; "
            "retrying on the same connection only (no duplicate elsewhere)")}
    attempt_no = msg.attempt_count + (1 if out.results or out.unknown else 0)
    errors = [f"{r}: {res.code} {res.reply}" for r, res in out.results.items() if not res.ok]
    errors += [f"{r}: outcome unknown via {via}" for r, via in out.unknown.items()]
    errors += out.wait_reasons
    last_error = "; ".join(errors)[:2000] or None
    pending = msg.pending
    gave_up: str | None = None
    if pending:
        retry = [now + backoff(max(attempt_no, 1), cfg.min_backoff, cfg.max_backoff)
                 for r in pending if r not in out.waits]
        retry += [out.waits[r] for r in pending if r in out.waits]
        when = min(retry)
        # Pending recipients are failed when no retry may follow: the lifetime is over, or
        # the message allows one try only (a test send).
        if msg.no_retry is None and when <= msg.expires_at:
            return Decision(DEFERRED, when, DEFERRED, last_error)
        why = msg.no_retry or LIFETIME_OVER
        for rcpt in pending:  # give up on what is left (Postfix: bounce)
            msg.rcpt_status[rcpt]["state"] = "failed"
            msg.rcpt_status[rcpt]["reply"] = (
                f"{why}; last reply: " + str(msg.rcpt_status[rcpt].get("reply", ""))
            )[:500]
        gave_up = msg.no_retry or f"expired after {attempt_no} attempts"
        last_error = f"{gave_up}; {last_error or ''}".strip("; ")
    # The message's own recipients decide; forced policy recipients only ride along.
    states = [msg.rcpt_status[r]["state"] for r in msg.recipients]
    if all(s == "sent" for s in states):
        status = SENT
    elif any(s == "sent" for s in states):
        status = PARTIAL
    else:
        status = FAILED
    return Decision(status, now, status, last_error, gave_up)


def copies_next(msg: Claimed, status: str, now: float, cfg: DeliverySettings) -> float | None:
    """When the message's forced copies still pending are tried on their own (None: none
    is, or they were given up here). While the message itself is deferred they ride along
    with its own tries; once it is finished they are retried with the normal backoff until
    its lifetime ends, unless nobody got the message (nothing to copy) or it was allowed
    one try only (a test send)."""
    tries = [int(e.get("tries") or 1) for e in msg.rcpt_status.values()
             if e.get("forced") and e.get("state") == "pending"]
    if status == DEFERRED or not tries:
        return None
    why = msg.no_retry or (message_policy.NOT_COPIED if status == FAILED else None)
    if why is None:
        when = now + backoff(min(tries), cfg.min_backoff, cfg.max_backoff)
        if when <= msg.expires_at:
            return when
        why = LIFETIME_OVER
    message_policy.give_up(msg.rcpt_status, why)
    return None


def results_for_error(rcpts: list[str], err: DeliveryError) -> dict[str, RecipientResult]:
    """A session-level failure applies to every recipient of the attempt: failed when the
    rule fails the message for it, else pending (a connection's configuration error is
    held: pending, code 451, whatever the server replied)."""
    final = fails_message(err)
    code = err.reply_code or (554 if final else 451)
    if final and not 500 <= code < 600:
        code = 554
    if not final and 500 <= code < 600:
        code = 451
    return {r: RecipientResult(code, f"{err.code}: {err.message}") for r in rcpts}


@dataclass
class Worker:
    queue: Queue
    transports: dict[str, Transport]
    cfg: DeliverySettings
    default_connection: str | None = None
    owner: str = field(default_factory=worker_id)
    clock: Callable[[], float] = time.time
    on_delivered: Callable[[Claimed, Decision], Any] | None = None
    routes: Sequence[Route] = ()
    # connection -> its merged message policy (postroom.policy.for_settings)
    policies: dict[str, message_policy.MessagePolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.router = Router(self.routes, self.default_connection)
        self.health = Health(self.queue, self.cfg.breaker_failures, self.cfg.breaker_cooldown,
                             clock=self.clock)
        self.limiter = Limiter(self.queue, lease=self.cfg.lease_seconds, clock=self.clock)
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, tuple[Claimed, asyncio.Task[list[dict[str, Any]]]]] = {}
        self.delivered = 0
        self._run_task: asyncio.Task[Any] | None = None
        self.started_at = self.clock()
        self._beat_at = 0.0
        self._leased: dict[str, float] = {}  # claim token -> when its lease was last set
        self._renew_at = 0.0
        self._big_bodies = asyncio.Semaphore(BIG_BODIES_AT_ONCE)

    def wake(self) -> None:
        """New mail is due (called by an in-process listener): claim without waiting."""
        self._wake.set()

    def reconfigure(self, transports: dict[str, Transport], routes: Sequence[Route],
                    policies: dict[str, message_policy.MessagePolicy],
                    default_connection: str | None,
                    ) -> tuple[list[Transport], list[asyncio.Task[list[dict[str, Any]]]]]:
        """Use these connections, routes and policies for every try from now on (the
        configuration changed: postroom.reload). A try already under way keeps the
        transport it holds. Returns the transports no longer used and the deliveries under
        way, which the caller lets finish before closing those."""
        old = self.transports
        self.transports = transports
        self.routes = routes
        self.policies = policies
        self.default_connection = default_connection
        self.router = Router(routes, default_connection)
        retired = [t for name, t in old.items() if transports.get(name) is not t]
        self._wake.set()  # mail held for want of a connection may go now
        return retired, [task for _, task in self._inflight.values()]

    async def run(self) -> None:
        """Claim and deliver until :meth:`stop` is called."""
        self._run_task = asyncio.current_task()
        slots = self.cfg.concurrency
        try:
            if n := await self.queue.reclaim_dead_local():
                log.warning("took back %d message(s) leased by a worker that died", n)
        except PostroomError as err:
            log.error("checking for dead workers' leases failed: %s", err)
        while not self._stopping:
            await self._heartbeat()
            await self._renew_leases()
            free = slots - len(self._inflight)
            claimed: list[Claimed] = []
            if free > 0 and self.transports and not self._queue_paused():
                try:
                    claimed = await self.queue.claim(
                        self.owner, min(free, self.cfg.claim_batch), self.cfg.lease_seconds
                    )
                except PostroomError as err:
                    log.error("claiming messages failed: %s", err)
            if claimed:
                self._leased[claimed[0].token] = time.monotonic()
            for msg in claimed:
                task = asyncio.create_task(self.deliver(msg), name=f"deliver-{msg.id}")
                self._inflight[msg.id] = (msg, task)
                task.add_done_callback(self._done)
            if claimed and len(claimed) == min(free, self.cfg.claim_batch):
                continue  # more may be due right now
            if self._stopping:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_interval)

    def _queue_paused(self) -> bool:
        try:
            return self.health.queue_paused()
        except SQLAlchemyError as err:
            log.error("reading the queue's pause switch failed: %s", err)
            return False

    async def _heartbeat(self, gone: bool = False) -> None:
        now = time.monotonic()
        if not gone and now - self._beat_at < HEARTBEAT_SECONDS:
            return
        self._beat_at = now
        try:
            await self.queue.heartbeat(self.owner, self.started_at, gone=gone)
        except PostroomError as err:
            log.error("recording this worker's heartbeat failed: %s", err)

    async def _renew_leases(self) -> None:
        """Extend the leases of messages still in this worker after half their time: mail
        waiting here for a session or a big body must not be taken by another worker (a
        duplicate). Only a dead worker's leases run out."""
        now = time.monotonic()
        lease = self.cfg.lease_seconds
        if now - self._renew_at < min(HEARTBEAT_SECONDS, lease / 4):
            return
        self._renew_at = now
        live = {m.token for m, _ in self._inflight.values()}
        self._leased = {t: at for t, at in self._leased.items() if t in live}
        old = [t for t, at in self._leased.items() if now - at > lease / 2]
        if not old:
            return
        try:
            await self.queue.renew(old, lease)
        except PostroomError as err:
            log.error("extending the leases of messages in delivery failed: %s", err)
            return
        self._leased.update({t: now for t in old})

    def _done(self, task: asyncio.Task[list[dict[str, Any]]]) -> None:
        msg_id = task.get_name().removeprefix("deliver-")
        self._inflight.pop(msg_id, None)
        # Claim again once half the slots are free, not after every delivery: one claim
        # (a write transaction) then serves several messages.
        if len(self._inflight) <= self.cfg.concurrency // 2:
            self._wake.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop claiming; let in-flight deliveries finish for ``grace`` seconds, then cancel
        them and hand their messages back to the queue (due at once)."""
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        run_task = self._run_task
        if run_task is not None and run_task is not asyncio.current_task():
            # Let run() return by itself: cancelled while awaiting a claim, the rows it just
            # leased would stay 'sending', delivered by nobody until the lease runs out.
            await asyncio.wait({run_task}, timeout=grace)
        tasks = [t for _, t in self._inflight.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            unfinished = [m for m, t in list(self._inflight.values()) if t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.queue.release(unfinished)
        # Health and event writes go out without the deliveries waiting for them (queued
        # ahead of each result, so committed with it or before it): none is left behind.
        await self.health.flush()
        await self._heartbeat(gone=True)

    async def deliver(self, msg: Claimed) -> list[dict[str, Any]]:
        """One delivery run for a claimed message: each group of recipients (leg) goes along
        its route's chain, falling back as ``routing.chain`` decides. Returns the attempt
        rows recorded, one per connection tried."""
        if not msg.body_later:
            return await self._deliver(msg)
        async with self._big_bodies:  # a big body: read now, a few at a time
            try:
                msg.raw = await self.queue.body(msg.id)
            except PostroomError as err:
                log.error("message %s: reading its body failed (%s); back to the queue",
                          msg.id, err)
                with contextlib.suppress(PostroomError):
                    await self.queue.release([msg])
                return []
            msg.body_later = False
            return await self._deliver(msg)

    async def _deliver(self, msg: Claimed) -> list[dict[str, Any]]:
        if msg.status != SENDING:
            return await self._deliver_copies(msg)
        out = Outcome()
        attempts: list[dict[str, Any]] = []
        for leg in self._legs(msg):
            await self._deliver_leg(msg, leg, out, attempts)
        now = self.clock()
        d = decide(msg, out, now, self.cfg)
        copy_due = copies_next(msg, d.status, now, self.cfg)
        if attempts and attempts[-1]["error_code"] and d.last_error and not out.wait_reasons:
            last = attempts[-1]
            # The session error is clearer than decide()'s per-recipient copies of it, but
            # keep decide()'s reason for giving up: it says why a transient error became
            # final; and a held message says why it waits rather than failed.
            if last["outcome"] != "unknown":
                d.last_error = f"{last['error_code']}: {last['error_message']}"
                if d.status == DEFERRED and out.held:
                    d.last_error += f"; {HELD}"
                if d.gave_up:
                    d.last_error = f"{d.gave_up}; {d.last_error}"
        for a in attempts:  # the try that ended a leg shows what became of the message
            if a["outcome"] not in ("fallback", "unknown"):
                a["outcome"] = d.outcome
        rows = [{k: v for k, v in a.items() if k != "error_message"} for a in attempts]
        if not await self.queue.finish(
            msg, status=d.status, next_attempt_at=d.next_attempt_at, last_error=d.last_error,
            attempts=rows, copy_due=copy_due,
        ):
            log.warning("message %s: lease lost before the result was recorded", msg.id)
        self.delivered += 1
        # One line per run, like Postfix's maillog: enough to follow mail without the UI.
        via = ">".join(a["connection"] for a in attempts) or "-"
        log.info(
            "%s: to=%s via=%s status=%s tries=%d%s", msg.id, ",".join(msg.recipients), via,
            d.status, msg.attempt_count + (1 if attempts else 0),
            f" error={d.last_error}" if d.last_error else "",
        )
        if self.on_delivered is not None:
            self.on_delivered(msg, d)
        return rows

    async def _deliver_copies(self, msg: Claimed) -> list[dict[str, Any]]:
        """A run of a finished message's forced copies alone: each pending one goes to the
        connection whose policy added it, with only the copies in RCPT TO. The message's
        status and error stay as its own recipients left them (Queue.finish)."""
        attempts: list[dict[str, Any]] = []
        waits: list[float] = []
        for hop, (via, copies) in enumerate(message_policy.copies_due(msg.rcpt_status).items()):
            name = via or msg.connection or self.default_connection or ""
            transport = self.transports.get(name)
            st = self.health.state(name)
            if transport is not None and st.blocked(self.clock()) is not None:
                waits.append(self._blocked_until(st))  # not a try: its lifetime still runs
                continue
            tried = await self._try(msg, name, transport, [], hop, copies)
            if isinstance(tried, float):  # over our own rate or session limit
                waits.append(tried)
                continue
            attempt, err = tried
            attempt.pop("_results")
            if err is None:
                await self.health.succeeded(name)
            elif transport is not None and counts_against_connection(err):
                await self.health.failed(name, f"{err.code}: {err.message}")
            attempt["outcome"] = "copy"
            attempts.append(attempt)
        now = self.clock()
        due = copies_next(msg, msg.status, now, self.cfg) if attempts else None
        if waits:
            due = min([*waits, *([due] if due is not None else [])])
            if due > msg.expires_at:
                message_policy.give_up(msg.rcpt_status, LIFETIME_OVER)
                due = None
        rows = [{k: v for k, v in a.items() if k != "error_message"} for a in attempts]
        if not await self.queue.finish(msg, status=msg.status, next_attempt_at=now,
                                       last_error=None, attempts=rows, copy_due=due):
            log.warning("message %s: lease lost before the copy's result was recorded", msg.id)
        left = message_policy.copies_due(msg.rcpt_status)
        log.info("%s: forced copy via=%s status=%s pending=%s", msg.id,
                 ">".join(a["connection"] for a in attempts) or "-", msg.status,
                 ",".join(a for c in left.values() for a in c) or "-")
        return rows

    def _blocked_until(self, st: State) -> float:
        """When a paused or broken (circuit open) connection is worth looking at again."""
        if not st.paused and st.open_until:
            return float(st.open_until)
        return self.clock() + PAUSED_RECHECK

    def _legs(self, msg: Claimed) -> list[Leg]:
        unknown: dict[str, list[str]] = {}
        fresh: list[str] = []
        for rcpt in msg.pending:
            st = msg.rcpt_status[rcpt]
            if st["state"] == "unknown" and st.get("via"):
                unknown.setdefault(str(st["via"]), []).append(rcpt)
            else:
                fresh.append(rcpt)
        legs = [Leg("unknown outcome", (via,), tuple(r)) for via, r in unknown.items()]
        if fresh:
            facts = Facts(sender=msg.sender, recipients=fresh, app=msg.app or "",
                          tags=msg.tags, headers=self._headers(msg.raw))
            legs += self.router.legs(facts, pinned=msg.connection)
        return legs

    def _headers(self, raw: bytes) -> dict[str, str]:
        if not self.router.header_names:
            return {}
        return header_values(raw, self.router.header_names)

    async def _deliver_leg(self, msg: Claimed, leg: Leg, out: Outcome,
                           attempts: list[dict[str, Any]]) -> None:
        rcpts = list(leg.recipients)
        if not leg.chain:
            out.waits.update({r: self.clock() + self.cfg.min_backoff for r in rcpts})
            out.wait_reasons.append(f"{', '.join(rcpts)}: no route matches; add a default "
                                    "[[routes]] entry or a [[connections]] entry")
            return
        blocked: list[str] = []
        wait_until: float | None = None
        first = len(attempts)  # this leg's attempts start here
        for hop, name in enumerate(leg.chain):
            transport = self.transports.get(name)
            st = self.health.state(name)
            reason = st.blocked(self.clock())
            if transport is not None and reason is not None:
                blocked.append(f"{name} {reason}")
                until = self._blocked_until(st)
                wait_until = until if wait_until is None else min(wait_until, until)
                continue
            tried = await self._try(msg, name, transport, rcpts, hop)
            if isinstance(tried, float):  # over our own limit: wait, never fail or fall back
                out.waits.update({r: tried for r in rcpts})
                out.wait_reasons.append(f"{name}: rate or session limit reached; "
                                        "waiting in the queue")
                return
            attempt, err = tried
            attempts.append(attempt)
            if err is None:
                out.results.update(attempt.pop("_results"))
                await self.health.succeeded(name)
                failed_hops = [a["connection"] for a in attempts[first:-1]
                               if a["outcome"] == "fallback"]
                if failed_hops or (blocked and self.health.skipped_once(
                        [b.split(" ", 1)[0] for b in blocked])):
                    await self.health.event(
                        "fallback_used", message_id=msg.id, connection=name,
                        detail=f"delivered via {name} after: "
                        f"{'; '.join(failed_hops + blocked)}")
                return
            attempt.pop("_results")
            verdict = after_failure(err)
            # A connection missing from the configuration has no breaker to count on.
            if transport is not None and counts_against_connection(err):
                await self.health.failed(name, f"{err.code}: {err.message}")
            if verdict is Next.UNKNOWN:
                attempt["outcome"] = "unknown"
                for r in attempt["recipients"].values():
                    r["state"] = "unknown"
                out.unknown.update({r: name for r in rcpts})
                await self.health.event("unknown_outcome", message_id=msg.id, connection=name,
                                        detail=err.message)
                return
            if verdict is Next.FALLBACK and hop + 1 < len(leg.chain):
                attempt["outcome"] = "fallback"
                continue
            out.results.update(results_for_error(rcpts, err))
            out.held = misconfigured(err)
            return
        # Every connection of the chain was skipped (paused or circuit open): wait for them.
        until = wait_until if wait_until is not None else self.clock() + PAUSED_RECHECK
        out.waits.update({r: until for r in rcpts})
        out.wait_reasons.append(f"{', '.join(rcpts)}: no usable connection "
                                f"({'; '.join(blocked)})")

    async def _try(self, msg: Claimed, name: str, transport: Transport | None,
                   rcpts: list[str], hop: int, copies: Mapping[str, str] | None = None,
                   ) -> tuple[dict[str, Any], DeliveryError | None] | float:
        """:meth:`_send` within the connection's rate and session limits; when they are
        reached, the time to come back instead."""
        holder = f"{self.owner}:{msg.id}:{hop}"
        if transport is not None and limited(transport.settings):
            retry = await self.limiter.acquire(transport.settings, holder)
            if retry is not None:
                return float(retry)
        try:
            return await self._send(msg, name, transport, rcpts, copies)
        finally:
            if transport is not None and limited(transport.settings):
                await self.limiter.release(transport.settings, holder)

    async def _send(self, msg: Claimed, name: str, transport: Transport | None,
                    rcpts: list[str], copies: Mapping[str, str] | None = None,
                    ) -> tuple[dict[str, Any], DeliveryError | None]:
        """One try on one connection; returns its attempt row (with the per-recipient
        results under "_results") and the session error, if any. ``copies``: a forced
        copies' run, only those recipients (``rcpts`` is empty)."""
        started = self.clock()
        env = Envelope(msg.sender, rcpts, msg.raw, id=msg.id)
        forced: dict[str, str] = {}
        result: DeliveryResult | None = None
        err: DeliveryError | None = None
        try:
            if transport is None:
                raise ConfigError(
                    f"connection {name!r} is not configured; add it to postroom.toml",
                    code="config.connection.unknown", permanent=False,
                )
            policy = self.policies.get(name)
            if copies is not None:  # as everyone else got it, to the copies alone
                applied = (policy or message_policy.MessagePolicy()).copy(env, copies)
                env, forced = applied.envelope, applied.forced
            elif policy is not None:  # from the stored message each time: nothing added twice
                applied = policy.apply(env, msg.rcpt_status)
                env, forced = applied.envelope, applied.forced
            env = await dkim.sign_envelope(env, transport)  # these exact bytes, this attempt
            result = await transport.send(env)
            results = result.recipients
        except DeliveryError as e:
            err = e
            results = results_for_error(env.recipients, e)
        except PostroomError as e:
            err = DeliveryError(str(e), code=e.code, permanent=e.permanent,
                                scope=scope_of(e))
            results = results_for_error(env.recipients, err)
        except Exception as e:  # a bug must not lose the message: defer it, log loudly
            log.exception("delivery of %s crashed", msg.id)
            err = DeliveryError(f"internal error: {e!r}", code="internal", permanent=False)
            results = results_for_error(env.recipients, err)
        attempt = {
            "connection": name,
            "started_at": started,
            "ended_at": self.clock(),
            "outcome": "",  # set once the run is decided (deliver)
            "reply_code": err.reply_code if err else result.reply_code if result else None,
            "reply_text": (err.reply_text or err.message) if err else (
                result.reply_text if result else None),
            "error_code": err.code if err else None,
            "error_message": err.message if err else None,
            "permanent": bool(err and fails_message(err)),
            "recipients": {r: {"code": res.code, "reply": res.reply[:500], "state": (
                "sent" if res.ok else "failed" if res.permanent else "pending")}
                for r, res in results.items()},
            "transcript": (err.transcript if err else result.transcript if result else ""),
            "_results": results,
        }
        if forced:  # logged with the attempt, kept out of what decides the message's status
            message_policy.record(msg.rcpt_status, forced, results, attempt, via=name)
            attempt["_results"] = message_policy.own_results(results, forced)
        return attempt, err
