"""The delivery worker: claim due messages with a lease, deliver, record, decide what next.

Outcome per recipient: accepted -> sent; 5xx -> failed (never retried); anything else ->
pending, retried later with backoff, until the message's lifetime runs out. Only the
recipients still pending are sent on the next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postroom.envelope import Envelope
from postroom.exceptions import ConfigError, DeliveryError, PostroomError
from postroom.queue.backoff import backoff
from postroom.queue.sql import Claimed, Queue, worker_id
from postroom.settings import DeliverySettings
from postroom.store.schema import DEFERRED, FAILED, PARTIAL, SENT
from postroom.transports.base import DeliveryResult, RecipientResult, Transport

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 10.0  # how often a worker refreshes its row in `workers`


@dataclass
class Decision:
    status: str
    next_attempt_at: float
    outcome: str
    last_error: str | None


def decide(
    msg: Claimed,
    results: dict[str, RecipientResult],
    now: float,
    cfg: DeliverySettings,
) -> Decision:
    """Apply one attempt's per-recipient results to ``msg.rcpt_status`` and pick the state."""
    for rcpt, res in results.items():
        state = "sent" if res.ok else "failed" if res.permanent else "pending"
        msg.rcpt_status[rcpt] = {"state": state, "code": res.code, "reply": res.reply[:500]}
    pending = msg.pending
    attempt_no = msg.attempt_count + 1
    errors = [f"{r}: {res.code} {res.reply}" for r, res in results.items() if not res.ok]
    last_error = "; ".join(errors)[:2000] or None
    if pending:
        wait = backoff(attempt_no, cfg.min_backoff, cfg.max_backoff)
        if now + wait <= msg.expires_at:
            return Decision(DEFERRED, now + wait, DEFERRED, last_error)
        for rcpt in pending:  # lifetime over: give up on what is left (Postfix: bounce)
            msg.rcpt_status[rcpt]["state"] = "failed"
            msg.rcpt_status[rcpt]["reply"] = (
                "gave up: maximum lifetime reached; last reply: "
                + str(msg.rcpt_status[rcpt].get("reply", ""))
            )[:500]
        last_error = f"expired after {attempt_no} attempts; {last_error or ''}".strip("; ")
    states = [v["state"] for v in msg.rcpt_status.values()]
    if all(s == "sent" for s in states):
        status = SENT
    elif any(s == "sent" for s in states):
        status = PARTIAL
    else:
        status = FAILED
    return Decision(status, now, status, last_error)


def results_for_error(rcpts: list[str], err: DeliveryError) -> dict[str, RecipientResult]:
    """A session-level failure applies to every recipient of the attempt."""
    code = err.reply_code or (554 if err.permanent else 451)
    if err.permanent and not 500 <= code < 600:
        code = 554
    if not err.permanent and 500 <= code < 600:
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

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, tuple[Claimed, asyncio.Task[dict[str, Any]]]] = {}
        self.delivered = 0
        self._run_task: asyncio.Task[Any] | None = None
        self.started_at = self.clock()
        self._beat_at = 0.0

    def wake(self) -> None:
        """New mail is due (called by an in-process listener): claim without waiting."""
        self._wake.set()

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
            free = slots - len(self._inflight)
            claimed: list[Claimed] = []
            if free > 0 and self.transports:
                try:
                    claimed = await self.queue.claim(
                        self.owner, min(free, self.cfg.claim_batch), self.cfg.lease_seconds
                    )
                except PostroomError as err:
                    log.error("claiming messages failed: %s", err)
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

    async def _heartbeat(self, gone: bool = False) -> None:
        now = time.monotonic()
        if not gone and now - self._beat_at < HEARTBEAT_SECONDS:
            return
        self._beat_at = now
        try:
            await self.queue.heartbeat(self.owner, self.started_at, gone=gone)
        except PostroomError as err:
            log.error("recording this worker's heartbeat failed: %s", err)

    def _done(self, task: asyncio.Task[dict[str, Any]]) -> None:
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
        await self._heartbeat(gone=True)

    async def deliver(self, msg: Claimed) -> dict[str, Any]:
        """One attempt for a claimed message; returns the attempt row it recorded."""
        started = self.clock()
        name = msg.connection or self.default_connection or ""
        rcpts = msg.pending
        env = Envelope(msg.sender, rcpts, msg.raw, id=msg.id)
        transport = self.transports.get(name)
        result: DeliveryResult | None = None
        err: DeliveryError | None = None
        try:
            if transport is None:
                raise ConfigError(
                    f"connection {name!r} is not configured; add it to postroom.toml",
                    code="config.connection.unknown", permanent=False,
                )
            result = await transport.send(env)
            results = result.recipients
        except DeliveryError as e:
            err = e
            results = results_for_error(rcpts, e)
        except PostroomError as e:
            err = DeliveryError(str(e), code=e.code, permanent=e.permanent)
            results = results_for_error(rcpts, err)
        except Exception as e:  # a bug must not lose the message: defer it, log loudly
            log.exception("delivery of %s crashed", msg.id)
            err = DeliveryError(f"internal error: {e!r}", code="internal", permanent=False)
            results = results_for_error(rcpts, err)
        now = self.clock()
        d = decide(msg, results, now, self.cfg)
        if err is not None:
            # The session error is clearer than decide()'s per-recipient copies of it, but
            # keep decide()'s "expired" verdict: it says why a transient error became final.
            expired = bool(d.last_error and d.last_error.startswith("expired after"))
            d.last_error = f"{err.code}: {err.message}"
            if expired:
                d.last_error = f"expired after {msg.attempt_count + 1} attempts; {d.last_error}"
        attempt = {
            "connection": name or "-",
            "started_at": started,
            "ended_at": now,
            "outcome": d.outcome,
            "reply_code": err.reply_code if err else result.reply_code if result else None,
            "reply_text": (err.reply_text or err.message) if err else (
                result.reply_text if result else None),
            "error_code": err.code if err else None,
            "permanent": bool(err and err.permanent),
            "recipients": {
                r: {"code": res.code, "reply": res.reply[:500],
                    "state": msg.rcpt_status[r]["state"]}
                for r, res in results.items()
            },
            "transcript": (err.transcript if err else result.transcript if result else ""),
        }
        if not await self.queue.finish(
            msg, status=d.status, next_attempt_at=d.next_attempt_at, last_error=d.last_error,
            attempt=attempt,
        ):
            log.warning("message %s: lease lost before the result was recorded", msg.id)
        self.delivered += 1
        # One line per attempt, like Postfix's maillog: enough to follow mail without the UI.
        log.info(
            "%s: to=%s via=%s status=%s tries=%d%s", msg.id, ",".join(rcpts), name or "-",
            d.status, msg.attempt_count + 1, f" error={d.last_error}" if d.last_error else "",
        )
        if self.on_delivered is not None:
            self.on_delivered(msg, d)
        return attempt
