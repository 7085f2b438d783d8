"""The delivery worker: claim due messages with a lease, deliver, record, decide what next.

Each group of recipients (a leg) walks its route's chain as postroom.routing.walk decides;
what the run makes of the message (sent, partial, deferred with backoff, failed) is
postroom.queue.outcome's. A recipient forced by the message policy (an archive Bcc) still
pending when the message is finished is then retried on its own
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

from postroom import dkim, suppression
from postroom import policy as message_policy
from postroom.envelope import Envelope, header_values
from postroom.events import Kind
from postroom.exceptions import ConfigError, DeliveryError, PostroomError
from postroom.queue.lease import Claimed
from postroom.queue.limits import Limiter, limited
from postroom.queue.outcome import LIFETIME_OVER, Decision, Outcome, copies_next, results_for_error
from postroom.queue.outcome import decide as decide  # its home before; tests and benches import it
from postroom.queue.sql import Queue
from postroom.queue.workers import worker_id
from postroom.routing.chain import counts_against_connection, misconfigured, scope_of
from postroom.routing.health import Health
from postroom.routing.rules import Facts, Leg, Route, Router
from postroom.routing.walk import (
    FALLBACK,
    UNKNOWN,
    Act,
    Attempt,
    Limited,
    Step,
    Tried,
    Usable,
    next_step,
    rcpt_state,
)
from postroom.settings import DeliverySettings
from postroom.store.schema import DEFERRED, SENDING, SUPPRESSED
from postroom.transports.base import DeliveryResult, Transport

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 10.0  # how often a worker refreshes its row in `workers`
BIG_BODIES_AT_ONCE = 4  # bodies over queue.lease.BODY_WITH_CLAIM in memory at a time
HELD = ("held in the queue, not failed: the connection's configuration is wrong; once it "
        "is fixed the message goes at its next try (it fails only when its lifetime ends)")


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
    # The suppression list, checked before each delivery (None: no list, e.g. bare tests).
    suppressions: suppression.Suppressions | None = None

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
        attempts: list[Attempt] = []
        blocked: dict[str, str] = {}
        if self.suppressions is not None and msg.pending \
                and not self.suppressions.clear_now(msg.pending):
            # Checked at delivery, not intake: an address bounced while the message waited
            # is caught too, and the app handing mail in never sees a refusal for it. Those
            # recipients leave `pending` (their rcpt_status says why), so no leg sends to them.
            _, blocked = await asyncio.to_thread(
                self.suppressions.apply, msg.sender, msg.pending, msg.rcpt_status)
        for leg in self._legs(msg):
            attempts += await self._deliver_leg(msg, leg, out)
        now = self.clock()
        d = decide(msg, out, now, self.cfg)
        if blocked:
            if suppression.all_suppressed(msg.rcpt_status, msg.recipients):
                d.status = d.outcome = SUPPRESSED
            d.last_error = "; ".join(x for x in (d.last_error, suppression.summary(blocked)) if x)
        copy_due = copies_next(msg, d.status, now, self.cfg)
        last = attempts[-1] if attempts else None
        if last is not None and last.error is not None and d.last_error \
                and not out.wait_reasons and last.outcome != UNKNOWN:
            # The session error is clearer than decide()'s per-recipient copies of it, but
            # keep decide()'s reason for giving up: it says why a transient error became
            # final; and a held message says why it waits rather than failed.
            d.last_error = f"{last.error.code}: {last.error.message}"
            if d.status == DEFERRED and out.held:
                d.last_error += f"; {HELD}"
            if d.gave_up:
                d.last_error = f"{d.gave_up}; {d.last_error}"
        for a in attempts:  # the try that ended a leg shows what became of the message
            if a.outcome not in (FALLBACK, UNKNOWN):
                a.outcome = d.outcome
        rows = [a.row() for a in attempts]
        if not await self.queue.finish(
            msg, status=d.status, next_attempt_at=d.next_attempt_at, last_error=d.last_error,
            attempts=rows, copy_due=copy_due,
        ):
            log.warning("message %s: lease lost before the result was recorded", msg.id)
        self.delivered += 1  # its log line: Queue.finish (postroom.maillog)
        if self.on_delivered is not None:
            self.on_delivered(msg, d)
        return rows

    async def _deliver_copies(self, msg: Claimed) -> list[dict[str, Any]]:
        """A run of a finished message's forced copies alone: each pending one goes to the
        connection whose policy added it, with only the copies in RCPT TO. The message's
        status and error stay as its own recipients left them (Queue.finish)."""
        attempts: list[Attempt] = []
        waits: list[float] = []
        for hop, (via, copies) in enumerate(message_policy.copies_due(msg.rcpt_status).items()):
            name = via or msg.connection or self.default_connection or ""
            view = self._usable(name, self.clock())
            if view.blocked is not None:
                waits.append(view.until)  # not a try: its lifetime still runs
                continue
            transport = self.transports.get(name)
            tried = await self._try(msg, name, transport, [], hop, copies)
            if isinstance(tried, Limited):  # over our own rate or session limit
                waits.append(tried.until)
                continue
            await self._learn(name, transport, tried)
            tried.outcome = "copy"
            attempts.append(tried)
        now = self.clock()
        due = copies_next(msg, msg.status, now, self.cfg) if attempts else None
        if waits:
            due = min([*waits, *([due] if due is not None else [])])
            if due > msg.expires_at:
                message_policy.give_up(msg.rcpt_status, LIFETIME_OVER)
                due = None
        rows = [a.row() for a in attempts]
        if not await self.queue.finish(msg, status=msg.status, next_attempt_at=now,
                                       last_error=None, attempts=rows, copy_due=due):
            log.warning("message %s: lease lost before the copy's result was recorded", msg.id)
        left = message_policy.copies_due(msg.rcpt_status)
        log.info("%s: forced copy via=%s status=%s pending=%s", msg.id,
                 ">".join(a.connection for a in attempts) or "-", msg.status,
                 ",".join(a for c in left.values() for a in c) or "-")
        return rows

    def _usable(self, name: str, now: float) -> Usable:
        """A connection as the fallback walk sees it: skipped while paused, down (circuit
        open) or held at its provider's request. One missing from the configuration has no
        state: it is tried, and the try says what is missing."""
        if name not in self.transports:
            return Usable()
        st = self.health.state(name)
        reason = st.blocked(now)
        return Usable() if reason is None else Usable(reason, st.usable_at(now))

    async def _learn(self, name: str, transport: Transport | None, attempt: Attempt) -> None:
        """What one try tells the connection's health: the circuit breaker counts it, and
        a Retry-After holds the connection for every worker and node."""
        err = attempt.error
        if err is None:
            await self.health.succeeded(name)
            return
        if transport is None:  # a connection missing from the configuration has no state
            return
        if (until := attempt.held_until) is not None:
            await self.health.hold(name, until, f"{err.code}: {err.message}")
        if counts_against_connection(err):
            await self.health.failed(name, f"{err.code}: {err.message}")

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

    async def _deliver_leg(self, msg: Claimed, leg: Leg, out: Outcome) -> list[Attempt]:
        """Walk one leg's chain, each step as routing.walk decides, and note in ``out`` what
        became of its recipients. Returns the tries made (attempt rows to be)."""
        rcpts = list(leg.recipients)
        views = {name: self._usable(name, self.clock()) for name in leg.chain}
        tried: list[Tried] = []
        while True:
            step = next_step(leg.chain, views, tried, self.clock())
            if step.fallback and isinstance(tried[-1], Attempt):
                tried[-1].outcome = FALLBACK
            if step.act is not Act.TRY:
                break
            transport = self.transports.get(step.connection)
            attempt = await self._try(msg, step.connection, transport, rcpts, step.hop)
            if isinstance(attempt, Attempt):
                await self._learn(step.connection, transport, attempt)
            tried.append(attempt)
        await self._settle(msg, rcpts, step, tried[-1] if tried else None, out)
        return [t for t in tried if isinstance(t, Attempt)]

    async def _settle(self, msg: Claimed, rcpts: list[str], step: Step, last: Tried | None,
                      out: Outcome) -> None:
        """Apply the walk's last step to the leg's recipients."""
        if step.act is Act.WAIT or not isinstance(last, Attempt):
            until = self.clock() + self.cfg.min_backoff if step.until is None else step.until
            out.waits.update({r: until for r in rcpts})
            out.wait_reasons.append(f"{', '.join(rcpts)}: {step.reason}")
            return
        err = last.error
        if step.act is Act.DONE or err is None:
            out.results.update(last.results)
            names = [name for name, _ in step.skipped]
            if step.fell_back or (names and self.health.skipped_once(names)):
                after = [*step.fell_back, *(f"{name} {why}" for name, why in step.skipped)]
                await self.health.event(
                    Kind.FALLBACK_USED, message_id=msg.id, connection=step.connection,
                    detail=f"delivered via {step.connection} after: {'; '.join(after)}")
            return
        if step.act is Act.UNKNOWN:
            last.outcome = UNKNOWN
            for r in last.recipients.values():
                r["state"] = "unknown"
            out.unknown.update({r: step.connection for r in rcpts})
            await self.health.event(Kind.UNKNOWN_OUTCOME, message_id=msg.id,
                                    connection=step.connection, detail=err.message)
            return
        out.results.update(results_for_error(rcpts, err))  # Act.FAIL
        out.held = misconfigured(err)
        if step.until is not None:
            out.not_before.update({r: step.until for r in rcpts})

    async def _try(self, msg: Claimed, name: str, transport: Transport | None,
                   rcpts: list[str], hop: int, copies: Mapping[str, str] | None = None,
                   ) -> Attempt | Limited:
        """:meth:`_send` within the connection's rate and session limits; when they are
        reached, the time to come back instead."""
        holder = f"{self.owner}:{msg.id}:{hop}"
        if transport is not None and limited(transport.settings):
            retry = await self.limiter.acquire(transport.settings, holder)
            if retry is not None:
                return Limited(name, hop, float(retry))
        try:
            return await self._send(msg, name, transport, rcpts, hop, copies)
        finally:
            if transport is not None and limited(transport.settings):
                await self.limiter.release(transport.settings, holder)

    async def _send(self, msg: Claimed, name: str, transport: Transport | None,
                    rcpts: list[str], hop: int, copies: Mapping[str, str] | None = None,
                    ) -> Attempt:
        """One try on one connection, as its attempt record. ``copies``: a forced copies'
        run, only those recipients (``rcpts`` is empty)."""
        started = self.clock()
        # Tags and metadata ride along: HTTPS providers carry them (Postmark's Tag/Metadata…).
        env = Envelope(msg.sender, rcpts, msg.raw, id=msg.id, tags=list(msg.tags),
                       metadata=dict(msg.metadata))
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
        attempt = Attempt(
            name, hop, started, self.clock(), err, results=results,
            recipients={r: {"code": res.code, "reply": res.reply[:500],
                            "state": rcpt_state(res)} for r, res in results.items()},
        )
        if result is not None:
            attempt.reply_code, attempt.reply_text = result.reply_code, result.reply_text
            attempt.transcript, attempt.provider_id = result.transcript, result.provider_id
        if forced:  # logged with the attempt, kept out of what decides the message's status
            message_policy.record(msg.rcpt_status, forced, results, attempt.recipients,
                                  via=name)
            attempt.results = message_policy.own_results(results, forced)
        return attempt
