"""Deliverability, as the web admin shows it: the doctor's SPF, DKIM, DMARC and MX verdicts
per sending domain with the records to publish, and DKIM key generation.

The doctor (postroom.diagnostics.doctor) asks DNS, dozens of queries per domain, each of
which may wait for a slow server: a page must not hold a request (nor a worker thread of
the server) for that. :func:`check` starts a run on a small pool of its own and returns at
once; the page shows "checking" and asks again. A finished run is kept ``CACHE_SECONDS``, so
a reload or a second admin costs no query; at most ``MAX_PENDING`` runs wait or run at a
time, so a signed-in user clicking through domains cannot pile up threads.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import ConfigError, PostroomError
from postroom.ops import require

if TYPE_CHECKING:
    from postroom.dkim import KeyInfo
    from postroom.runtime import Instance

CACHE_SECONDS = 300.0  # a finished run is shown again for this long
TIME_LIMIT = 60.0  # a run still going after this is reported as timed out
DNS_TIMEOUT = 5.0  # per DNS lookup
WORKERS = 2
MAX_PENDING = 4  # runs waiting or running, all domains together
MAX_KEPT = 64  # finished runs remembered


class State(enum.StrEnum):
    CHECKING = "checking"
    DONE = "done"
    FAILED = "failed"  # the run raised (e.g. no DNS resolver configured)
    TIMED_OUT = "timed_out"  # still running after TIME_LIMIT


@dataclass(frozen=True)
class Check:
    """One doctor run as the page shows it."""

    domain: str  # "" = the domains the connections send from
    state: State
    started_at: float
    report: dict[str, Any] | None = None  # doctor.Report.to_dict()
    records: list[dict[str, Any]] = field(default_factory=list)  # each distinct one to publish
    error: str = ""


def publish_list(report: Any) -> list[dict[str, Any]]:
    """Every distinct record the doctor's findings ask to publish, in order, each with its
    zone-file line (the doctor command's "Publish" list)."""
    seen: dict[str, dict[str, Any]] = {}
    for finding in report.findings:
        if finding.record is not None:
            zone = finding.record.zone()
            seen.setdefault(zone, {**finding.record.to_dict(), "zone": zone})
    return list(seen.values())


@dataclass
class _Run:
    future: Future[tuple[dict[str, Any], list[dict[str, Any]]]]
    started_at: float  # wall clock, shown
    started: float  # monotonic
    finished: float | None = None


class Checks:
    """The doctor runs of one process, by (domain, DNS server)."""

    def __init__(self, *, workers: int = WORKERS, cache: float = CACHE_SECONDS,
                 limit: float = TIME_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self._runs: dict[tuple[str, str], _Run] = {}
        self._lock = threading.Lock()
        self.cache = cache
        self.limit = limit
        self.clock = clock

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="doctor")
        return self._pool

    def get(self, key: tuple[str, str], start: Callable[[], Any]) -> Check:
        now = self.clock()
        with self._lock:
            run = self._runs.get(key)
            if run is not None and run.future.done():
                run.finished = run.finished or now
                if now - run.finished > self.cache:
                    run = None
            if run is None:
                self._forget(now)
                pending = sum(1 for r in self._runs.values() if not r.future.done())
                if pending >= MAX_PENDING:
                    raise PostroomError(
                        f"{pending} deliverability checks are already running; wait for them "
                        "(a minute at most) and try again", code="doctor.busy", permanent=False)
                run = _Run(self._executor().submit(start), time.time(), now)
                self._runs[key] = run
        return self._state(key[0], run, now)

    def _forget(self, now: float) -> None:
        old = [k for k, r in self._runs.items()
               if r.future.done() and now - (r.finished or now) > self.cache]
        for k in old:
            del self._runs[k]
        done = sorted((r.finished or now, k) for k, r in self._runs.items() if r.future.done())
        for _, k in done[:max(0, len(self._runs) - MAX_KEPT)]:
            del self._runs[k]

    def _state(self, domain: str, run: _Run, now: float) -> Check:
        if not run.future.done():
            late = now - run.started > self.limit
            return Check(domain, State.TIMED_OUT if late else State.CHECKING, run.started_at,
                         error=f"no result after {self.limit:g} s: the DNS server answers "
                         "slowly or not at all" if late else "")
        err = run.future.exception()
        if err is not None:
            text = err.message if isinstance(err, PostroomError) else \
                f"the check failed: {type(err).__name__}: {err}"
            return Check(domain, State.FAILED, run.started_at, error=text)
        report, records = run.future.result()
        return Check(domain, State.DONE, run.started_at, report=report, records=records)


CHECKS = Checks()


def checked_domain(domain: str) -> str:
    """``domain`` as the doctor takes it, or ConfigError saying what is wrong."""
    from postroom import dkim

    try:
        return dkim.check_domain(domain)
    except ValueError as err:
        raise ConfigError(f"domain: {err}", code="doctor.domain") from err


def run_doctor(inst: Instance, domain: str, dns_server: str | None = None,
               timeout: float = DNS_TIMEOUT) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One doctor run (blocking): the report and the records to publish. No login to the
    connections (the Connections page tests those)."""
    from postroom.diagnostics import doctor
    from postroom.diagnostics.dns import Resolver

    resolver = Resolver(dns_server, timeout=timeout)
    report = doctor.run(inst, resolver, [domain] if domain else [], connect=False,
                        timeout=timeout)
    return report.to_dict(), publish_list(report)


def check(inst: Instance, actor: Actor, domain: str = "", *, dns_server: str | None = None,
          wait: float = 0.0, checks: Checks = CHECKS) -> Check:
    """The doctor's verdict for ``domain`` ("" = every domain the connections send from):
    the cached run, else a new one started in the background. ``wait``: seconds to wait for
    a run to finish before answering "checking"."""
    require(actor, Role.VIEWER, "check deliverability")
    name = checked_domain(domain) if domain else ""
    key = (name, dns_server or "")
    found = checks.get(key, lambda: run_doctor(inst, name, dns_server))
    deadline = time.monotonic() + max(0.0, min(wait, checks.limit))
    while found.state is State.CHECKING and time.monotonic() < deadline:
        time.sleep(0.1)
        found = checks.get(key, lambda: run_doctor(inst, name, dns_server))
    return found


def generate_dkim(inst: Instance, actor: Actor, domain: str, selector: str, *,
                  bits: int = 2048, force: bool = False) -> KeyInfo:
    """A new DKIM key for ``selector._domainkey.domain``, stored encrypted; returns the
    record to publish. Refuses to replace a key unless ``force``."""
    from postroom import dkim

    require(actor, Role.ADMIN, "generate a DKIM key")
    info = dkim.keygen(inst.secrets.get, inst.secrets.set, domain, selector, bits, force=force)
    record(inst.engine, actor, Action.DKIM_GENERATE, f"dkim:{info.name}",
           {"domain": info.domain, "selector": info.selector, "bits": info.bits,
            "force": force})
    return info


def dkim_keys(inst: Instance, actor: Actor) -> list[KeyInfo]:
    """The DKIM keys stored in this instance, with their records."""
    from postroom import dkim

    require(actor, Role.VIEWER, "list DKIM keys")
    out = []
    for domain, selector in dkim.stored_keys(inst.engine):
        info = dkim.stored(inst.secrets.get, domain, selector)
        if info is not None:
            out.append(info)
    return out
