"""A summary report assembled from the store: figures per connection and per app for a
period and the one before it (the hourly rollups, never a scan of the messages), the top
failure causes with their advice, OAuth grant health, the suppression list and the
deliverability doctor's findings for each sending domain.

:func:`build` only reads; the doctor's DNS work is given to it (:func:`doctor_part`), so a
report never waits on DNS longer than it was told to, and says so when DNS did not answer.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from postroom.exceptions import ConfigError, PostroomError
from postroom.store.schema import attempts, log_rollups, messages
from postroom.store.states import FAILED, PARTIAL, SENT, SUPPRESSED

if TYPE_CHECKING:
    from postroom.runtime import Instance

HOUR = 3600
LENGTHS = {"day": 86_400, "week": 7 * 86_400}
CAUSE_SAMPLE = 2000  # newest failed messages of the period whose last attempt is read
TOP_CAUSES = 5
NEWEST_SUPPRESSED = 10


@dataclass(frozen=True)
class Figures:
    """Finished messages of one period (rollup statuses)."""

    sent: int = 0
    partial: int = 0
    failed: int = 0
    suppressed: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.partial + self.failed + self.suppressed

    @property
    def failure_rate(self) -> float | None:
        """Failed among those tried (suppressed ones never were); None when none was."""
        tried = self.sent + self.partial + self.failed
        return self.failed / tried if tried else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "failure_rate": self.failure_rate}


@dataclass(frozen=True)
class Row:
    """One connection or app (or every message: ``name`` "") in both periods."""

    name: str
    now: Figures
    before: Figures

    @property
    def change(self) -> int:
        return self.now.total - self.before.total

    @property
    def change_pct(self) -> float | None:
        """The total's change in percent of the previous period's (None from zero)."""
        return 100.0 * self.change / self.before.total if self.before.total else None

    @property
    def rate_change(self) -> float | None:
        """The failure rate's change, in percentage points."""
        a, b = self.now.failure_rate, self.before.failure_rate
        return None if a is None or b is None else 100.0 * (a - b)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "now": self.now.to_dict(), "before": self.before.to_dict(),
                "change": self.change, "change_pct": self.change_pct,
                "rate_change": self.rate_change}


@dataclass(frozen=True)
class Cause:
    """A failure cause: failed messages whose last attempt ended with ``code``."""

    code: str
    count: int
    example: str  # one reply or error text, as the log shows it
    advice: dict[str, Any] | None  # postroom.diagnostics.advice Advice.to_dict()


@dataclass(frozen=True)
class DoctorPart:
    """The doctor's verdicts: ``state`` done, checking (DNS slow or unreachable within the
    wait), failed (the run raised: ``error``), or off (no sending domain to check)."""

    state: str
    error: str = ""
    checked_at: float | None = None
    domains: list[dict[str, Any]] = field(default_factory=list)  # {subject, counts, findings}


@dataclass(frozen=True)
class Report:
    kind: str  # "day" | "week"
    start: float
    end: float
    generated_at: float
    totals: Row
    connections: list[Row]
    apps: list[Row]
    causes: list[Cause]
    oauth: list[dict[str, Any]]
    suppressed_total: int
    suppressed_new: int
    suppressed_newest: list[dict[str, Any]]
    doctor: DoctorPart

    @property
    def previous_start(self) -> float:
        return self.start - (self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": self.start, "end": self.end,
                "previous_start": self.previous_start, "generated_at": self.generated_at,
                "totals": self.totals.to_dict(),
                "connections": [r.to_dict() for r in self.connections],
                "apps": [r.to_dict() for r in self.apps],
                "causes": [asdict(c) for c in self.causes], "oauth": self.oauth,
                "suppressed": {"total": self.suppressed_total, "new": self.suppressed_new,
                               "newest": self.suppressed_newest},
                "doctor": asdict(self.doctor)}


def period(kind: str, end: float) -> tuple[float, float]:
    """``kind``'s period ending at ``end`` floored to the hour (the rollups' grain)."""
    if kind not in LENGTHS:
        raise ConfigError(f"period {kind!r}: use day or week", code="reports.period")
    stop = math.floor(end / HOUR) * HOUR
    return stop - LENGTHS[kind], stop


def _figures(counts: Mapping[str, int]) -> Figures:
    return Figures(sent=counts.get(SENT, 0), partial=counts.get(PARTIAL, 0),
                   failed=counts.get(FAILED, 0), suppressed=counts.get(SUPPRESSED, 0))


def rollup_rows(engine: Any, start: float, end: float
                ) -> tuple[Row, list[Row], list[Row]]:
    """Totals, per connection and per app, for [start, end) and the period before it, from
    log_rollups (one grouped read of its (hour, ...) primary key range)."""
    r = log_rollups.c
    length = end - start
    half = (r.hour >= start).label("current")
    q = (select(half, r.connection, r.app, r.status, func.sum(r.count))
         .where(r.hour >= start - length, r.hour < end)
         .group_by(half, r.connection, r.app, r.status))
    acc: dict[tuple[str, str, bool], dict[str, int]] = {}
    with engine.connect() as conn:
        for current, connection, app, status, n in conn.execute(q):
            n = int(n or 0)
            for key in (("", "", bool(current)), ("c", connection or "", bool(current)),
                        ("a", app or "", bool(current))):
                bucket = acc.setdefault(key, {})
                bucket[status] = bucket.get(status, 0) + n

    def rows(prefix: str) -> list[Row]:
        names = sorted({k[1] for k in acc if k[0] == prefix})
        out = [Row(n, _figures(acc.get((prefix, n, True), {})),
                   _figures(acc.get((prefix, n, False), {}))) for n in names]
        return sorted(out, key=lambda row: (-row.now.total, row.name))

    totals = Row("", _figures(acc.get(("", "", True), {})), _figures(acc.get(("", "", False), {})))
    return totals, rows("c"), rows("a")


def causes(engine: Any, start: float, end: float, settings: Any = None,
           top: int = TOP_CAUSES) -> list[Cause]:
    """The commonest reasons the period's failed messages failed: each one's last attempt's
    error code (its reply code when it has none), over the newest CAUSE_SAMPLE failed
    messages read through the (status, created_at) index; with the advice for one of each."""
    from postroom.diagnostics.advice import advice_for_attempt

    m, a = messages.c, attempts.c
    failed = (select(m.id, m.last_error).where(m.status == FAILED, m.created_at >= start,
                                                m.created_at < end)
              .order_by(m.status, m.created_at.desc()).limit(CAUSE_SAMPLE).subquery())
    last = (select(func.max(a.id)).where(a.message_id == failed.c.id)
            .correlate(failed).scalar_subquery())
    # Transcripts are read below for the few attempts the advice is asked about only.
    q = (select(failed.c.last_error, a.id, a.connection, a.error_code, a.reply_code,
                a.reply_text).select_from(failed.outerjoin(attempts, a.id == last)))
    groups: dict[str, tuple[int, dict[str, Any]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(q):
            got = dict(row._mapping)
            code = (got.get("error_code") or (f"reply {got['reply_code']}"
                                              if got.get("reply_code") else None)
                    or "no_attempt")
            n, first = groups.get(code, (0, got))
            groups[code] = (n + 1, first)
    chosen = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    ids = [got["id"] for _, (_, got) in chosen if got.get("id") is not None]
    with engine.connect() as conn:
        transcripts = dict(conn.execute(select(a.id, a.transcript).where(a.id.in_(ids))).all())
    out = []
    for code, (n, got) in chosen:
        example = str(got.get("reply_text") or got.get("last_error") or "")[:300]
        advice = None
        if got.get("id") is not None:
            advice = advice_for_attempt({**got, "transcript": transcripts.get(got["id"], "")},
                                        settings=settings)
        out.append(Cause(code, n, example, advice))
    return out


def oauth_health(inst: Instance) -> list[dict[str, Any]]:
    """Each OAuth connection's grant as `postroom oauth status` shows it (no token in it)."""
    if not any(getattr(c, "oauth", None) for c in inst.settings.connections):
        return []  # no OAuth connection: do not build the token manager at all
    from postroom.commands.oauth import oauth_rows

    keep = ("connection", "provider", "state", "account", "expires_at", "last_error",
            "last_refresh_at")
    return [{k: row.get(k) for k in keep} for row in oauth_rows(inst)]


def suppressed(engine: Any, start: float, end: float) -> tuple[int, int, list[dict[str, Any]]]:
    """The list's size, entries added in [start, end), and the newest of those."""
    from postroom.store.schema import suppressions as table
    from postroom.suppression import Suppressions

    c = table.c
    with engine.connect() as conn:
        new = int(conn.execute(select(func.count()).select_from(table).where(
            c.created_at >= start, c.created_at < end)).scalar_one())
        newest = [dict(r._mapping) for r in conn.execute(
            select(c.address, c.scope, c.reason, c.source, c.created_at)
            .where(c.created_at >= start, c.created_at < end)
            .order_by(c.created_at.desc()).limit(NEWEST_SUPPRESSED))]
    return Suppressions(engine).count(), new, newest


def doctor_part(inst: Instance, *, wait: float, dns_server: str | None = None,
                shared: bool = True) -> DoctorPart:
    """The doctor's findings for every sending domain, waiting at most ``wait`` seconds.
    ``shared``: from the runs the Deliverability page shares (postroom.ops.deliverability,
    cached a few minutes: serve); else (a command) on a daemon thread of its own, so the
    process does not wait for an unreachable DNS server at exit."""
    from postroom.ops import deliverability as ops

    started = time.time()
    if not shared:
        result: list[tuple[dict[str, Any], Any]] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                result.append(ops.run_doctor(inst, "", dns_server))
            except Exception as err:  # reported in the report, as the shared runs are
                failure.append(err)

        worker = threading.Thread(target=run, name="report-doctor", daemon=True)
        worker.start()
        worker.join(wait)
        if result:
            return DoctorPart("done", "", started, by_subject(result[0][0]["findings"]))
        if failure:
            err = failure[0]
            return DoctorPart("failed", err.message if isinstance(err, PostroomError)
                              else f"the check failed: {type(err).__name__}: {err}", started)
        return DoctorPart("checking", _no_answer(wait), started)
    key = ("", dns_server or "")

    def start() -> Any:
        return ops.run_doctor(inst, "", dns_server)

    found = ops.CHECKS.get(key, start)
    deadline = time.monotonic() + wait
    while found.state is ops.State.CHECKING and time.monotonic() < deadline:
        time.sleep(0.1)  # bounded by ``wait``
        found = ops.CHECKS.get(key, start)
    if found.state is ops.State.CHECKING:
        return DoctorPart("checking", _no_answer(wait), found.started_at)
    if found.state is not ops.State.DONE or found.report is None:
        return DoctorPart("failed", found.error, found.started_at)
    return DoctorPart("done", "", found.started_at, by_subject(found.report["findings"]))


def _no_answer(wait: float) -> str:
    return (f"the DNS checks gave no answer within {wait:g} s: the DNS server is slow or "
            "unreachable from this host; see the Deliverability page or `postroom doctor`")


def by_subject(findings: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The doctor's findings by subject (a domain, a connection), each with its counts;
    only warnings and failures are listed (the rest are counted)."""
    out: dict[str, dict[str, Any]] = {}
    for f in findings:
        part = out.setdefault(str(f["subject"]), {
            "subject": str(f["subject"]),
            "counts": {"ok": 0, "info": 0, "warn": 0, "fail": 0}, "findings": []})
        part["counts"][f["status"]] = part["counts"].get(f["status"], 0) + 1
        if f["status"] in ("warn", "fail"):
            part["findings"].append({"check": f["check"], "status": f["status"],
                                     "summary": f["summary"], "fix": f.get("fix")})
    return list(out.values())


def build(inst: Instance, kind: str, *, end: float | None = None,
          doctor: DoctorPart | None = None) -> Report:
    """The ``kind`` ("day" | "week") report for the period ending at ``end``; by default
    at the end of the current hour, so the mail of the last minutes is in it."""
    start, stop = period(kind, time.time() + HOUR if end is None else end)
    engine = inst.engine
    totals, conns, apps = rollup_rows(engine, start, stop)
    total, new, newest = suppressed(engine, start, stop)
    return Report(kind=kind, start=start, end=stop, generated_at=time.time(), totals=totals,
                  connections=conns, apps=apps,
                  causes=causes(engine, start, stop, inst.settings),
                  oauth=oauth_health(inst), suppressed_total=total, suppressed_new=new,
                  suppressed_newest=newest,
                  doctor=doctor if doctor is not None else DoctorPart("off"))


def local_time(ts: float, zone: dt.tzinfo) -> str:
    """A time as reports show it: "2026-12-07 08:00 CET"."""
    return dt.datetime.fromtimestamp(ts, zone).strftime("%Y-%m-%d %H:%M %Z")
