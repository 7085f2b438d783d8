"""The fallback walk along one leg's chain of connections, as one pure decision function.

The worker (postroom.queue.worker) is a thin loop around :func:`next_step`: it asks what to
do, does it (one try on one connection), records the try as an :class:`Attempt`, and asks
again until the answer is not "try". What a failure means (fall back, stop, unknown outcome,
hold the message) is ``chain.verdict``'s one rule; this module adds the order along the chain:
which connection is next, which are gone around (paused, circuit open, held at the provider's
request), and when the leg's recipients are worth trying again.

Retry-After (RFC 9110 section 10.2.3): a provider answering 429 or 503 says how long to leave
it alone. That connection is then held (``health.Health.hold``, every worker and node), the
walk falls back to the next connection of the chain now, and when no connection took the
message, it is retried no earlier than the first moment one of its chain is usable again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom.exceptions import DeliveryError
from postroom.routing.chain import Next, after_failure, fails_message
from postroom.transports.base import RecipientResult

FALLBACK = "fallback"  # an attempt's outcome: it failed and the walk went on past it
UNKNOWN = "unknown"  # an attempt's outcome: maybe delivered (see chain.Next.UNKNOWN)


def rcpt_state(res: RecipientResult) -> str:
    """A recipient's state after one result: sent, failed (final) or pending."""
    return "sent" if res.ok else "failed" if res.permanent else "pending"


@dataclass(slots=True)
class Attempt:
    """One try on one connection: the typed record behind an ``attempts`` row."""

    connection: str
    hop: int  # its position in the leg's chain
    started_at: float
    ended_at: float
    error: DeliveryError | None = None
    # The message's own recipients' results: what decides its status (forced policy copies
    # ride along and are recorded apart, postroom.policy.record).
    results: dict[str, RecipientResult] = field(default_factory=dict)
    # Every recipient of the try as the attempt row shows it: {"code", "reply", "state"}.
    recipients: dict[str, dict[str, Any]] = field(default_factory=dict)
    reply_code: int | None = None
    reply_text: str | None = None
    transcript: str = ""
    provider_id: str | None = None  # the provider's id for the message (webhooks find it)
    outcome: str = ""  # set once the run is decided (sent, deferred, fallback...)

    @property
    def held_until(self) -> float | None:
        """Until when the upstream asked to be left alone (Retry-After), or None."""
        wait = self.error.retry_after if self.error is not None else None
        return self.ended_at + wait if wait else None

    def row(self) -> dict[str, Any]:
        """The ``attempts`` row (without ``message_id``, which Queue.finish adds)."""
        err = self.error
        return {
            "connection": self.connection,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "reply_code": err.reply_code if err else self.reply_code,
            "reply_text": (err.reply_text or err.message) if err else self.reply_text,
            "error_code": err.code if err else None,
            "permanent": bool(err and fails_message(err)),
            "recipients": self.recipients,
            "transcript": err.transcript if err else self.transcript,
            "provider_id": self.provider_id,
        }


@dataclass(frozen=True, slots=True)
class Limited:
    """Not a try: the connection is over our own rate or session limit until ``until``
    (postroom.queue.limits). The mail waits for it; it never fails or falls back for it."""

    connection: str
    hop: int
    until: float


Tried = Attempt | Limited


@dataclass(frozen=True, slots=True)
class Usable:
    """A connection as the walk sees it when the leg starts (postroom.routing.health)."""

    blocked: str | None = None  # why it is gone around now (paused, circuit open, held)
    until: float = 0.0  # when a blocked connection is worth looking at again


class Act(enum.Enum):
    TRY = "try"  # send on `connection` (chain position `hop`) now
    DONE = "done"  # the last try took the leg: its per-recipient results decide
    FAIL = "fail"  # stop: the last try's error applies to every recipient of the leg
    UNKNOWN = "unknown"  # maybe delivered: retry later on the same connection only
    WAIT = "wait"  # nothing (more) to try now: the recipients wait, not failed


@dataclass(frozen=True, slots=True)
class Step:
    act: Act
    connection: str = ""  # TRY: the one to try; DONE, FAIL, UNKNOWN: the last one tried
    hop: int = -1
    # WAIT: due again then (None: after the normal backoff); FAIL: retried no earlier
    # than then, whatever the backoff says (None: the backoff decides).
    until: float | None = None
    reason: str = ""  # WAIT: why, for the message's last error
    skipped: tuple[tuple[str, str], ...] = ()  # (connection, why) gone around so far
    fell_back: tuple[str, ...] = ()  # connections that failed before this step's one
    fallback: bool = False  # the last try failed and the walk goes on past it


def _failed(tried: Sequence[Tried]) -> tuple[str, ...]:
    return tuple(t.connection for t in tried if isinstance(t, Attempt) and t.error is not None)


def _not_before(chain: Sequence[str], views: Mapping[str, Usable], tried: Sequence[Tried],
                now: float) -> float | None:
    """The first moment any connection of the chain is usable again: a connection held by
    the provider's Retry-After (now or in this walk), paused or with its circuit open counts
    from when it is worth looking at again, any other from now."""
    held = {t.connection: h for t in tried
            if isinstance(t, Attempt) and (h := t.held_until) is not None}
    first: float | None = None
    for name in chain:
        view = views.get(name)
        if name in held:
            at = held[name]
        elif view is not None and view.blocked is not None:
            at = view.until
        else:
            return None  # usable now: the backoff decides
        first = at if first is None else min(first, at)
    return first if first is not None and first > now else None


def next_step(chain: Sequence[str], views: Mapping[str, Usable], tried: Sequence[Tried],
              now: float) -> Step:
    """What to do next for one leg: its ``chain`` (primary first), each connection's state
    when the leg started (``views``; a connection missing there is usable), and the tries
    of this walk so far, in order. Pure: the caller does what it says."""
    if not chain:
        return Step(Act.WAIT, reason="no route matches; add a default [[routes]] entry or "
                    "a [[connections]] entry")
    last = tried[-1] if tried else None
    if isinstance(last, Limited):  # our own limit: wait, never fail or fall back
        return Step(Act.WAIT, connection=last.connection, hop=last.hop, until=last.until,
                    reason=f"connection {last.connection} reached its rate or session "
                    "limit; waiting in the queue")
    start = 0 if last is None else last.hop + 1
    skipped = tuple((name, view.blocked) for name in chain[:start]
                    if (view := views.get(name)) is not None and view.blocked is not None)
    fell_back = _failed(tried[:-1])
    if last is not None:
        def stop(act: Act, until: float | None = None) -> Step:
            return Step(act, connection=last.connection, hop=last.hop, until=until,
                        skipped=skipped, fell_back=fell_back)

        if last.error is None:
            return stop(Act.DONE)
        nxt = after_failure(last.error)
        if nxt is Next.UNKNOWN:
            return stop(Act.UNKNOWN)
        if nxt is Next.STOP or start >= len(chain):
            return stop(Act.FAIL, _not_before(chain, views, tried, now))
    fallback = last is not None  # a failure that falls back to what comes next
    fell_back = _failed(tried)
    for hop in range(start, len(chain)):
        name = chain[hop]
        view = views.get(name)
        if view is None or view.blocked is None:
            return Step(Act.TRY, connection=name, hop=hop, skipped=skipped,
                        fell_back=fell_back, fallback=fallback)
        skipped += ((name, view.blocked),)
    # Every connection left is gone around: the leg waits for the first to come back.
    untils = [v.until for name in chain if (v := views.get(name)) is not None and v.blocked]
    why = "; ".join(f"{name} {reason}" for name, reason in skipped)
    return Step(Act.WAIT, until=min(untils), reason=f"no usable connection ({why})",
                skipped=skipped, fell_back=fell_back, fallback=fallback)
