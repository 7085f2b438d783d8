#!/usr/bin/env python3
"""One `postroom worker` with alerts and metrics on vs off, same run (issue 15: >= 0.97x).

    sudo .venv/bin/python bench/alerts_bench.py                       # 5,000 msgs, 3 reps
    sudo .venv/bin/python bench/alerts_bench.py --messages 200 --reps 1 --out -   # smoke
    ... --only sqlite         # or postgresql
    ... --profile             # + one unmeasured "on" run per database under py-spy

Each run: a fresh database (SQLite WAL, synchronous = FULL, or a new PostgreSQL database of
tests/pgserver.py's throw-away cluster) gets N pre-enqueued 2 KB messages with the queue
paused (bench/worker_bench.py's messages and enqueue); then a `postroom serve` with
``[server] worker = false`` (the node's front, as beside workers in production) and one
`postroom worker` start on the same postroom.toml, the queue is resumed, and the worker
delivers. The same messages, routes and failures in both variants:

* 97 % of the messages go to `smtp-sink -c` (Postfix's, C; it counts them);
* 2 % (Subject ``worker bench *0[01]``: i % 100 in {0, 1} from i = 100 on) are routed to a
  second `smtp-sink -f rcpt` that refuses every recipient with a 5xx: they fail for good,
  which feeds the alerts' "N failed messages in M minutes" rule;
* 1 % (``*02``) are routed to the chain ["down", "sink"] whose first connection is a closed
  port: tried and failed over until its breaker opens (``connection_down``, an error event),
  then skipped (``fallback_used``).

They differ only in two sections of the file:

* **off**: neither ``[[alerts]]`` nor ``[metrics]``;
* **on**: ``[[alerts]]`` with its default kinds and thresholds and one channel, the signed
  generic webhook (``webhook+http://`` to a receiver thread of this harness that checks
  every ``X-Postroom-Signature`` and answers 200), so the worker runs the alerts dispatcher
  chore; and ``[metrics] listen`` on `postroom serve` (default ``cache_seconds``), scraped
  every second during the run by a thread of this harness, as Prometheus would (at a
  scrape interval 15-60 times its default of 1 minute).

The rate is N / (time every message is recorded as sent or failed - the first arrival at
the sink), as in worker_bench.py. CPU from /proc, from the resume to the end: the worker
(all threads), `postroom serve` (where /metrics is answered), the PostgreSQL server, the
whole box. Checked: the sink received the 97 % once each, every row is ``sent`` or (the 2 %)
``failed``; for "on", the scrapes were answered and, after the measured span, that the
connection_down alert reached the receiver with a valid signature. The variants' order
alternates with the repetition; the report gives medians [ranges] and the on/off ratios of
msg/s and of the worker's CPU per message.

The report block goes to docs/benchmarks.md between its BEGIN/END markers and is printed;
raw results in <workdir>/results.json. Needs root (smtp-sink -u nobody, PostgreSQL as the
postgres user), Postfix's smtp-sink, PostgreSQL's server binaries. Every process started
here is stopped by PID in a finally block; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests")]
import _report  # noqa: E402 - bench/_report.py: the docs/benchmarks.md block
import worker_bench  # noqa: E402 - its messages, enqueue, pause switch, meters, profiles
from _logindex import status_counts  # noqa: E402
from https_bench import med  # noqa: E402 - median [min, max]
from pgserver import PgServer  # noqa: E402
from postfix_instance import proc_cpu  # noqa: E402
from relay_bench import (  # noqa: E402
    HOST,
    SMTP_SINK,
    Proc,
    Sink,
    free_port,
    postroom_cmd,
    src_hash,
    versions,
    wait_banner,
    wait_quiet,
)
from worker_bench import (  # noqa: E402
    Meter,
    attempt_outcomes,
    enqueue_postroom,
    fresh_database,
    postroom_counts,
    rate,
    set_paused,
    summarize_profile,
    us,
    wait_log,
    watch_sink,
)

NAME = "alerts_bench.py"
BEGIN, END = _report.markers(NAME)
TARGET = 0.97  # on / off, msg/s (issue 15)
SECRET_ENV, SECRET = "BENCH_ALERT_SECRET", "bench-alert-webhook-secret"
SCRAPE_EVERY = 1.0  # seconds between two scrapes of /metrics
REFUSED, DETOUR = "worker bench *0[01]", "worker bench *02"  # Subject patterns (see above)
DBS = ("sqlite", "postgresql")


def refused_count(n: int) -> int:
    """Messages whose Subject ``worker bench {i}`` matches REFUSED: i >= 100, i % 100 < 2."""
    return sum(1 for i in range(100, n) if i % 100 < 2)


# --------------------------------------------------------------------------- the harness's peers
class Receiver:
    """The alerts' webhook: checks each request's signature, keeps (change, kind) of each
    alert, answers 200 (or 401 to a bad signature, which the outbox would retry)."""

    def __init__(self) -> None:
        from postroom.alerts.webhook import HEADER, verify

        self.alerts: list[tuple[str, str]] = []
        self.bad = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = verify(SECRET, body, self.headers.get(HEADER, ""), now=time.time())
                if ok:
                    alert = json.loads(body)
                    outer.alerts.append((alert["change"], alert["kind"]))
                else:
                    outer.bad += 1
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"webhook+http://{HOST}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_EVERY seconds until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{HOST}:{port}/metrics"
        self.ok = self.failed = 0
        self.last = b""
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    self.last = resp.read()
                self.ok += 1
            except OSError:
                self.failed += 1
            self._halt.wait(SCRAPE_EVERY)

    def stop(self) -> None:
        self._halt.set()
        self.join(15)


class RefusingSink(Proc):
    """`smtp-sink -f rcpt`: every RCPT TO answered with a 5xx."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        super().__init__("smtp-sink-refuse", [SMTP_SINK, "-u", "nobody", "-f", "rcpt",
                                              f"{HOST}:{port}", "64"], log)
        wait_banner(port)


# --------------------------------------------------------------------------- one run
def config(root: Path, url: str, sink: Sink, refuse: RefusingSink, on: bool,
           receiver: Receiver) -> tuple[Path, int | None]:
    """The node's postroom.toml (read by both processes) and the /metrics port (on only)."""
    metrics_port = free_port() if on else None
    text = (f'[server]\ndata_dir = "data"\ndatabase = "{url}"\n'
            f'hostname = "postroom.bench.test"\nsmtp_listen = "{HOST}:{free_port()}"\n'
            'http_listen = ""\nworker = false\n\n[delivery]\nlease_seconds = 60\n\n'
            f'[[connections]]\nname = "sink"\ntransport = "smtp"\nhost = "{HOST}"\n'
            f'port = {sink.port}\nsecurity = "none"\n\n'
            f'[[connections]]\nname = "refuse"\ntransport = "smtp"\nhost = "{HOST}"\n'
            f'port = {refuse.port}\nsecurity = "none"\n\n'
            f'[[connections]]\nname = "down"\ntransport = "smtp"\nhost = "{HOST}"\n'
            f'port = {free_port()}\nsecurity = "none"\nconnect_timeout = 5\n\n'
            f'[[routes]]\nname = "refused"\nchain = ["refuse"]\n'
            f'match = {{ header = {{ subject = "{REFUSED}" }} }}\n\n'
            f'[[routes]]\nname = "detour"\nchain = ["down", "sink"]\n'
            f'match = {{ header = {{ subject = "{DETOUR}" }} }}\n\n'
            '[[routes]]\nname = "default"\nchain = ["sink"]\n')
    if on:
        text += (f'\n[[alerts]]\nname = "ops"\nchannels = ["{receiver.url}"]\n'
                 f'webhook_secret_env = "{SECRET_ENV}"\n\n'
                 f'[metrics]\nlisten = "{HOST}:{metrics_port}"\n')
    cfg = root / "postroom.toml"
    cfg.write_text(text)
    return cfg, metrics_port


def wait_final(url: str, n: int, timeout: float = 60) -> float | None:
    """When all n messages are recorded as sent or failed: the end of a run."""
    from postroom.store.db import make_engine

    engine = make_engine(url)
    deadline = time.perf_counter() + timeout
    try:
        while time.perf_counter() < deadline:
            c = status_counts(engine)
            if c.get("sent", 0) + c.get("failed", 0) >= n:
                return time.perf_counter()
            time.sleep(0.01)
        return None
    finally:
        engine.dispose()


def wait_alerts(receiver: Receiver, kinds: set[str], timeout: float) -> bool:
    """Whether an "opened" alert of each of ``kinds`` reached the receiver in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kinds <= {k for c, k in receiver.alerts if c == "opened"}:
            return True
        time.sleep(0.1)
    return False


def expected_alerts(n: int) -> set[str]:
    """The alerts a run of n messages must raise with the default [[alerts]] rule: the
    failures threshold (2 % refused) and the down connection once its breaker opens."""
    from postroom.alerts.config import AlertRule

    rule, d = AlertRule(channels=["webhook+http://x/"]), worker_bench.DeliverySettings()
    detour = sum(1 for i in range(100, n) if i % 100 == 2)
    return ({"failures"} if rule.failures and refused_count(n) >= rule.failures else set()) \
        | ({"connection_down"} if detour >= d.breaker_failures else set())


def run_one(work: Path, label: str, db: str, on: bool, n: int, pg: PgServer | None, sink: Sink,
            refuse: RefusingSink, quiet: float, profile: Path | None = None) -> dict[str, Any]:
    root = work / label
    root.mkdir(parents=True)
    url = fresh_database(pg) if pg is not None and db == "postgresql" \
        else f"sqlite:///{root / 'queue.db'}"
    failing = refused_count(n)
    rec: dict[str, Any] = {"label": label, "db": db, "on": on, "msgs": n, "refused": failing,
                           "enqueue_s": enqueue_postroom(url, n)}
    receiver = Receiver()
    cfg, metrics_port = config(root, url, sink, refuse, on, receiver)
    env = {**os.environ, SECRET_ENV: SECRET}
    procs: list[Proc] = []
    scraper: Scraper | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        front = Proc("serve", [*postroom_cmd(), "serve", "--config", str(cfg)],
                     root / "serve.log", env=env, cwd=root)
        procs.append(front)
        wait_log(root / "serve.log", "accepting mail on", front)
        worker = Proc("worker", [*postroom_cmd(), "worker", "--config", str(cfg)],
                      root / "worker.log", env=env, cwd=root)
        procs.append(worker)
        wait_log(root / "worker.log", "delivering from", worker)
        if profile is not None:
            spy = worker_bench.spy_on(worker.pid, profile)
        rec["busy_before"] = wait_quiet(quiet)
        meter = Meter([worker.pid], pg.proc.pid if pg is not None and db == "postgresql"
                      and pg.proc else None)
        base, serve0 = sink.count(), proc_cpu(front.pid)
        if metrics_port is not None:
            scraper = Scraper(metrics_port)
            scraper.start()
        meter.start()
        set_paused(url, False)
        first, last, got = watch_sink(sink, base, n - failing, timeout=max(120, n / 50),
                                      alive=lambda: all(p.alive() for p in procs))
        done = wait_final(url, n) if last is not None else None
        rec.update(meter.stop())
        rec["serve_cpu"] = proc_cpu(front.pid) - serve0
        if scraper is not None:
            scraper.stop()
            rec["scrapes"], rec["scrape_errors"] = scraper.ok, scraper.failed
            rec["events_seen"] = {m[1].decode(): int(float(m[2])) for m in re.finditer(
                rb'postroom_events_total\{kind="(\w+)"\} ([\d.e+]+)', scraper.last)
                if float(m[2])}
        rec["alerts_in_run"] = len(receiver.alerts)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        # Not measured: that the alerts' path worked end to end (a tick every 2 s, the
        # failure count read every 15 s).
        rec["alerts_expected"] = sorted(expected_alerts(n)) if on else []
        rec["alerts_ok"] = wait_alerts(receiver, set(rec["alerts_expected"]), 40)
        rec["alerts"] = dict(Counter(f"{c}:{k}" for c, k in receiver.alerts))
        rec["bad_signatures"] = receiver.bad
        rec["delivered"] = got
        rec["statuses"] = postroom_counts(url)
        rec["attempts"] = attempt_outcomes(url)
        rec["span"] = (done - first) if first is not None and done is not None else None
        rec["ok"] = (last is not None and got == n - failing
                     and sink.count() - base == n - failing
                     and rec["statuses"] == {"sent": n - failing, "failed": failing}
                     and (not on or (rec["alerts_ok"] and rec["scrapes"] > 0
                                     and not rec["scrape_errors"] and not receiver.bad)))
    finally:
        if scraper is not None:
            scraper.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(10)
        for p in reversed(procs):
            p.stop()
        receiver.stop()
    shutil.rmtree(root / "data", ignore_errors=True)
    with contextlib.suppress(OSError):
        for f in root.glob("queue.db*"):
            f.unlink()
    return rec


def alerts_share(raw: Path, n: int, rate_hz: int = 100) -> dict[str, float]:
    """GIL µs per message in frames of postroom/alerts/ and postroom/metrics/ (inclusive)."""
    out = {"alerts": 0.0, "metrics": 0.0}
    with contextlib.suppress(OSError):
        for line in raw.read_text().splitlines():
            stack, _, cnt = line.rpartition(" ")
            if cnt.isdigit():
                for key in out:
                    if f"postroom/{key}/" in stack:
                        out[key] += int(cnt) * 1e6 / rate_hz / max(n, 1)
    return out


# --------------------------------------------------------------------------- report
def report(env: dict[str, Any], recs: list[dict[str, Any]],
           profs: list[dict[str, Any]]) -> str:
    L = [BEGIN, "## Alerts and metrics on vs off: one worker's throughput (bench/alerts_bench.py)",
         "", f"{env['date']}, source {env['src']} ({env['versions'].get('git', '?')}), "
         f"{env['n']:,} pre-enqueued 2 KB messages per run (2 % refused for good by a second "
         "sink, 1 % routed first to a connection that is down), one `postroom worker` and a "
         "`postroom serve` front (worker = false) on the same postroom.toml; medians of "
         f"{env['reps']} runs [range], off and on alternating; load average at the start "
         f"{env['load']} on 2 cores shared with other sessions' work: the ratios are what "
         "counts. **on** = `[[alerts]]` (default kinds and thresholds, the signed webhook to "
         "a local receiver answering 200) + `[metrics] listen` scraped every second.", "",
         "| database | alerts + metrics | msg/s | worker CPU µs/msg | serve CPU µs/msg | "
         "PostgreSQL µs/msg | box CPU µs/msg | scrapes | alerts received | check |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for db in DBS:
        by = {on: [r for r in recs if r["db"] == db and r["on"] is on] for on in (False, True)}
        for on, rs in by.items():
            if not rs:
                continue
            m = med(rs, rate)
            c = med(rs, lambda r: us(r, "cpu"))
            pgc = f"{med(rs, lambda r: us(r, 'pg_cpu'))[0]:,.0f}" if db == "postgresql" else "–"
            scrapes = (f"{sum(r['scrapes'] for r in rs) / len(rs):.1f} per run" if on
                       else "–")
            got = "; ".join(", ".join(f"{k} ×{v}" for k, v in sorted(r["alerts"].items()))
                            for r in rs[:1]) if on else "–"
            ok = "ok" if all(r["ok"] for r in rs) else "FAILED: " + "; ".join(
                f"{r['delivered']} arrived, {r['statuses']}, alerts {r['alerts']} (expected "
                f"{r.get('alerts_expected')}), scrape errors {r.get('scrape_errors')}, bad "
                f"signatures {r['bad_signatures']}"
                for r in rs if not r["ok"])
            L.append(f"| {db} | {'on' if on else 'off'} | {m[0]:,.0f} [{m[1]:,.0f}–{m[2]:,.0f}]"
                     f" | {c[0]:,.0f} [{c[1]:,.0f}–{c[2]:,.0f}] | "
                     f"{med(rs, lambda r: us(r, 'serve_cpu'))[0]:,.0f} | {pgc} | "
                     f"{med(rs, lambda r: us(r, 'box_cpu'))[0]:,.0f} | {scrapes} | {got} | "
                     f"{ok} |")
        if by[False] and by[True]:
            rr = med(by[True], rate)[0] / med(by[False], rate)[0]
            cr = (med(by[True], lambda r: us(r, "cpu"))[0]
                  / med(by[False], lambda r: us(r, "cpu"))[0])
            verdicts.append(f"{db}: msg/s {rr:.2f}× (**{'met' if rr >= TARGET else 'missed'}**),"
                            f" worker CPU per message {cr:.2f}×")
    L += ["", f"On / off (target ≥ {TARGET}× msg/s): " + "; ".join(verdicts) + ". \"Alerts "
          "received\" is the first run's, with those that came in up to 40 s after its "
          "measured span: the check waits there for the `connection_down` and `failures` "
          "alerts (the dispatcher reads the failure count every 15 s)."]
    for p in profs:
        if "error" in p:
            L += ["", f"py-spy ({p['db']}): {p['error']}"]
            continue
        L += ["", f"Where an \"on\" worker's time goes ({p['db']}, py-spy `--gil`, an extra run "
              f"of {p['msgs']:,} messages, not measured above, {p['rate_under_spy']:,.0f} msg/s "
              f"under the profiler): {p['gil_us_per_msg']:,.0f} µs of GIL time per message, "
              f"of which {p['share']['alerts']:,.1f} µs in postroom/alerts/ (the dispatcher "
              f"chore) and {p['share']['metrics']:,.1f} µs in postroom/metrics/.", "",
              "| GIL µs/msg incl. | function |", "|---|---|"]
        L += [f"| {v:,.0f} | `{f}` |" for f, v in p["inclusive"][:12]]
    d = worker_bench.DeliverySettings()
    L += ["", f"Settings: `postroom worker`, default `[delivery]` (concurrency {d.concurrency}, "
          f"claim_batch {d.claim_batch}, breaker_failures {d.breaker_failures}), routes "
          "matching the Subject header; SQLite WAL, synchronous = FULL; PostgreSQL with fsync "
          "on (tests/pgserver.py). Rate = messages / (every message recorded as sent or "
          "failed − first arrival at the sink). Postroom "
          f"{env['versions'].get('postroom', '?')}, Python {env['versions'].get('python')}.",
          "", END]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=",".join(DBS), help="sqlite, postgresql or both")
    ap.add_argument("--quiet-wait", dest="quiet", type=float, default=5.0,
                    help="wait up to S seconds for the box to be <20%% busy before each run")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown file for the report block ('-' = print only)")
    ap.add_argument("--from-json", metavar="RESULTS", help="only render a saved results.json")
    args = ap.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        text = report(data["env"], data["runs"], data.get("profiles", []))
        ok = True
    else:
        dbs = [d.strip() for d in args.only.split(",") if d.strip()]
        if not dbs or any(d not in DBS for d in dbs):
            sys.exit(f"--only {args.only!r}: name sqlite, postgresql or both")
        text, ok = measure(args, dbs)
    print(text)
    if args.out != "-":
        _report.write_block(NAME, text, Path(args.out))
    return 0 if ok else 1


def measure(args: argparse.Namespace, dbs: list[str]) -> tuple[str, bool]:
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="alerts-bench-"))
    os.chmod(work, 0o755)
    print(f"work dir {work}; load average {os.getloadavg()}", flush=True)
    env = {"n": n, "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M"),
           "src": src_hash(), "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
           "versions": versions()}
    sink = Sink(free_port(), work / "sink.log")
    refuse: RefusingSink | None = None
    pg: PgServer | None = None
    recs: list[dict[str, Any]] = []
    profs: list[dict[str, Any]] = []
    try:
        refuse = RefusingSink(free_port(), work / "refuse-sink.log")
        pg = PgServer().start() if "postgresql" in dbs else None
        for rep in range(args.reps):
            for db in dbs:
                # Alternate which variant goes first, so neither always meets the same phase.
                for on in ((False, True) if rep % 2 == 0 else (True, False)):
                    label = f"{db}-{'on' if on else 'off'}-{rep}"
                    r = run_one(work, label, db, on, n, pg, sink, refuse, args.quiet)
                    recs.append(r)
                    print(f"   {label}: {rate(r):,.0f} msg/s, worker {us(r, 'cpu'):,.0f} µs/msg"
                          f", serve {us(r, 'serve_cpu'):,.0f}, pg {us(r, 'pg_cpu'):,.0f}, box "
                          f"{us(r, 'box_cpu'):,.0f}; scrapes {r.get('scrapes')}, alerts "
                          f"{r['alerts']}, ok={r['ok']} {r['statuses']} (load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
        for db in dbs if args.profile else ():
            raw = work / f"profile-{db}.txt"
            r = run_one(work, f"profile-{db}", db, True, n, pg, sink, refuse, args.quiet,
                        profile=raw)
            p = {"db": db, "msgs": n, **summarize_profile(raw, n)}
            p["rate_under_spy"], p["share"] = rate(r), alerts_share(raw, n)
            profs.append(p)
            print(json.dumps(p, indent=1)[:3000], flush=True)
    finally:
        sink.stop()
        if refuse is not None:
            refuse.stop()
        if pg is not None:
            pg.stop()
    (work / "results.json").write_text(json.dumps(
        {"env": env, "runs": recs, "profiles": profs}, indent=1, default=str))
    print(f"results: {work / 'results.json'}", flush=True)
    return report(env, recs, profs), all(r["ok"] for r in recs)


if __name__ == "__main__":
    sys.exit(main())
