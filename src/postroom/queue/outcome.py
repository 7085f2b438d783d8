"""What one delivery run makes of a message: its recipients' new states, its status, and
when it (or its forced copies) is tried next.

Outcome per recipient: accepted -> sent; 5xx -> failed (never retried); anything else ->
pending, retried later with backoff, until the message's lifetime runs out. Only the
recipients still pending are sent on the next try. The worker (postroom.queue.worker) walks
the chains (postroom.routing.walk) and hands the results here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postroom import policy as message_policy
from postroom.exceptions import DeliveryError
from postroom.queue.backoff import backoff
from postroom.queue.lease import Claimed
from postroom.routing.chain import fails_message
from postroom.routing.walk import rcpt_state
from postroom.settings import DeliverySettings
from postroom.store.schema import DEFERRED, FAILED, PARTIAL, SENT, SUPPRESSED
from postroom.transports.base import RecipientResult

LIFETIME_OVER = "gave up: maximum lifetime reached"


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
    # rcpt -> retried no earlier than this, whatever the backoff says: every connection of
    # its chain is held (Retry-After), paused or down until then
    not_before: dict[str, float] = field(default_factory=dict)
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
        msg.rcpt_status[rcpt] = {"state": rcpt_state(res), "code": res.code,
                                 "reply": res.reply[:500]}
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
        later = now + backoff(max(attempt_no, 1), cfg.min_backoff, cfg.max_backoff)
        retry = [max(later, out.not_before.get(r, later)) for r in pending if r not in out.waits]
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
    # A message nobody got (failed, or every recipient suppressed) has nothing to copy.
    why = msg.no_retry or (message_policy.NOT_COPIED if status in (FAILED, SUPPRESSED) else None)
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
