#!/usr/bin/env python3
"""The sendmail command against msmtp, side by side on this machine, in one run.

    sudo .venv/bin/python bench/sendmail_bench.py                 # 400 messages per case
    sudo .venv/bin/python bench/sendmail_bench.py --messages 100 --out -

What a program that "runs sendmail" per message (PHP's mail(), cron) pays. Every case runs the
same 2 KB message ("To:" in the header, ``-t -i`` as PHP does) through a fresh process per
message, 10 processes at a time, until N messages are through:

* ``postroom-sendmail`` store mode: writes the message into the SQLite store of a running
  ``postroom serve`` (whose worker delivers it to the sink meanwhile, as in production);
* ``postroom-sendmail`` SMTP hand-off (``[sendmail] server``) to that ``postroom serve``;
* ``msmtp`` to ``smtp-sink`` (msmtp's own best case: nothing behind it stores anything);
* ``msmtp`` to the same ``postroom serve`` (msmtp used as the sendmail of Postroom).

Reported: messages/s, each as a ratio to msmtp -> smtp-sink; the time from start to exit of
one invocation on an otherwise idle box (median of 30, sequential) and under the parallel
load (p50/p95); peak RSS of one invocation (ru_maxrss from wait4). Checks: every exit status
0, smtp-sink received every msmtp message, the store holds every postroom message.

Needs smtp-sink (Debian package postfix), msmtp, and `postroom` installed in this Python's
environment (pip install -e .); root only for `smtp-sink -u nobody`. Every process started
here is stopped by PID in a finally block. The source is byte-compiled first (compileall), as
an install leaves it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
NAME = "sendmail_bench.py"
BEGIN, END = f"<!-- BEGIN {NAME} -->", f"<!-- END {NAME} -->"
GENERATED_END = "<!-- END GENERATED"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
SENDMAIL = BIN / "postroom-sendmail"
RCPT = "bench@example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {HOST}:{port} after {timeout}s")


def message(n: int, size: int = 2048) -> bytes:
    head = f"To: {RCPT}\nFrom: App <app@example.org>\nSubject: bench {n}\n\n"
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return (head + body).encode()


class Server:
    """A process started here and stopped by PID."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log.open("ab")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  env={**os.environ, **(env or {})})

    def stop(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self.log.close()


class Sink(Server):
    def __init__(self, port: int, log: Path) -> None:
        self.path = log
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        super().__init__([sink, *user, "-c", f"{HOST}:{port}", "256"], log)
        wait_port(port)

    def count(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.path.read_bytes()[-512:])
        return int(found[-1]) if found else 0

    def wait_count(self, target: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.count() < target:
            time.sleep(0.02)
        return self.count()


def invoke(cmd: list[str], data: bytes) -> tuple[float, int, int, str, float]:
    """Run one command with ``data`` on stdin: (seconds to exit, exit status, peak RSS KB,
    stderr, CPU seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stderr is not None
    p.stdin.write(data)
    p.stdin.close()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    return (time.perf_counter() - t0, p.returncode, usage.ru_maxrss,
            err.decode("utf-8", "replace"), usage.ru_utime + usage.ru_stime)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_case(cmd: list[str], n: int, parallel: int, start: int) -> dict[str, Any]:
    results: list[tuple[float, int, int, str, float]] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda i: invoke(cmd, message(start + i)), range(n)))
    wall = time.perf_counter() - t0
    failed = [r for r in results if r[1] != 0]
    lat = [r[0] * 1000 for r in results]
    return {"rate": n / wall, "wall": wall, "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95),
            "rss_kb": statistics.median(r[2] for r in results),
            "rss_max_kb": max(r[2] for r in results), "failed": len(failed),
            "cpu_ms": statistics.median(r[4] for r in results) * 1000,
            "first_error": failed[0][3].strip()[:300] if failed else ""}


def startup(cmd: list[str], times: int) -> float:
    """Median ms from start to exit of one invocation with nothing else running."""
    return statistics.median(invoke(cmd, message(0))[0] * 1000 for _ in range(times))


def stored(db: Path, source_prefix: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        row = c.execute("SELECT count(*) FROM messages WHERE source LIKE ?",
                        (source_prefix + "%",)).fetchone()
    return int(row[0])


def drain(db: Path, timeout: float = 300.0) -> None:
    """Wait until the serve's worker has delivered everything queued so far."""
    deadline = time.monotonic() + timeout
    while db.exists() and time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
            waiting = c.execute("SELECT count(*) FROM messages WHERE status IN "
                                "('queued', 'sending', 'deferred')").fetchone()[0]
        if not waiting:
            return
        time.sleep(0.1)


def quiet(seconds: float) -> None:
    """Wait up to ``seconds`` for the 1-minute load average to fall below 1."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and float(loadavg().split()[0]) >= 1.0:
        time.sleep(2)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400, help="per case")
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1, help="repeat every case, report medians")
    ap.add_argument("--startup-runs", type=int, default=30)
    ap.add_argument("--quiet-wait", type=float, default=0,
                    help="before each case, wait up to S seconds for a load average below 1")
    ap.add_argument("--out", default=str(DOC), help="markdown file to update, or - to print")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    for tool in ("msmtp", "smtp-sink"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing (apt-get install msmtp postfix)")
    if not SENDMAIL.exists():
        sys.exit(f"{SENDMAIL} is missing: pip install -e . into this Python's environment")

    # Byte-compile the source first, as an install does: with PYTHONDONTWRITEBYTECODE set
    # (and an editable install), a module edited since its last compile would otherwise be
    # compiled again by every one of the processes measured here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "postroom")],
                   stdout=subprocess.DEVNULL, check=False)
    work = Path(tempfile.mkdtemp(prefix="sendmail-bench-"))
    print(f"work folder {work}", file=sys.stderr)
    sink_port, smtp_port, http_port = free_port(), free_port(), free_port()
    config = work / "postroom.toml"
    config.write_text(
        f'[server]\ndata_dir = "data"\nsmtp_listen = "{HOST}:{smtp_port}"\n'
        f'http_listen = "{HOST}:{http_port}"\nhostname = "bench.test"\n'
        '[delivery]\nconcurrency = 10\npoll_interval = 0.2\n'
        f'[[connections]]\nname = "sink"\ntransport = "smtp"\nhost = "{HOST}"\n'
        f'port = {sink_port}\nsecurity = "none"\n')
    handoff = work / "handoff.toml"
    handoff.write_text(f'[server]\nhostname = "bench.test"\n[sendmail]\n'
                       f'server = "smtp://{HOST}:{smtp_port}"\n')
    rcs = {}
    for name, port in (("sink", sink_port), ("postroom", smtp_port)):
        rc = work / f"msmtprc-{name}"
        rc.write_text(f"defaults\nsyslog off\naccount default\nhost {HOST}\nport {port}\n"
                      "from app@example.org\nauth off\ntls off\n")
        rc.chmod(0o600)
        rcs[name] = rc
    cases: dict[str, list[str]] = {
        "msmtp -> smtp-sink": ["msmtp", "-C", str(rcs["sink"]), "-t", "-i"],
        "msmtp -> postroom serve": ["msmtp", "-C", str(rcs["postroom"]), "-t", "-i"],
        "postroom-sendmail, store": [str(SENDMAIL), "-C", str(config), "-t", "-i"],
        "postroom-sendmail, SMTP hand-off": [str(SENDMAIL), "-C", str(handoff), "-t", "-i"],
    }
    sink = serve = None
    record: dict[str, Any] = {"cases": {}, "load_start": loadavg(),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        sink = Sink(sink_port, work / "sink.log")
        serve = Server([sys.executable, "-m", "postroom.cli", "serve", "--config", str(config)],
                       work / "serve.log")
        wait_port(smtp_port)
        time.sleep(0.5)
        for cmd in cases.values():  # warm the page cache and the database
            for _ in range(3):
                assert invoke(cmd, message(0))[1] == 0, f"warm-up failed: {cmd}"
        db = work / "data" / "postroom.db"
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
        idle: dict[str, float] = {}
        start = 1000
        for rep in range(args.reps):
            for name, cmd in cases.items():
                # Each case starts on a drained queue (the serve's worker idle) and, when
                # asked, a quiet box; the idle start-up time is taken then, before the load.
                drain(db)
                quiet(args.quiet_wait)
                if rep == 0:
                    idle[name] = startup(cmd, args.startup_runs)
                print(f"rep {rep + 1}: {name} ...", file=sys.stderr)
                results[name].append(run_case(cmd, args.messages, args.parallel, start))
                start += args.messages
        for name in cases:
            runs = results[name]
            record["cases"][name] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "rates": [round(r["rate"], 1) for r in runs],
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p95_ms": statistics.median(r["p95_ms"] for r in runs),
                "rss_kb": statistics.median(r["rss_kb"] for r in runs),
                "rss_max_kb": max(r["rss_max_kb"] for r in runs),
                "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
                "failed": sum(r["failed"] for r in runs),
                "first_error": next((r["first_error"] for r in runs if r["first_error"]), ""),
                "startup_ms": idle[name],
            }
        # Correctness: nothing lost anywhere. Every case sent 3 warm-up messages, its
        # measured ones and its start-up runs; all four end at the sink.
        each = 3 + args.messages * args.reps + args.startup_runs
        got_sink = sink.wait_count(4 * each, timeout=120)
        checks = {
            "exit status 0 everywhere": all(c["failed"] == 0 for c in record["cases"].values()),
            "store rows (sendmail)": stored(db, "sendmail:"),
            "store rows (smtp)": stored(db, "smtp:"),
            "per case": each,
            "smtp-sink count": got_sink,
            "smtp-sink expected": 4 * each,
        }
        record["checks"] = checks
        record["ok"] = (checks["exit status 0 everywhere"]
                        and checks["store rows (sendmail)"] == each
                        and checks["store rows (smtp)"] == 2 * each
                        and got_sink == 4 * each)
    finally:
        for proc in (serve, sink):
            if proc is not None:
                proc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    record["load_end"] = loadavg()
    record["messages"], record["parallel"], record["reps"] = args.messages, args.parallel, args.reps
    (Path(tempfile.gettempdir()) / "sendmail-bench.json").write_text(json.dumps(record, indent=1))
    report = render(record)
    print(report)
    if args.out != "-":
        write_block(Path(args.out), report)
        print(f"written to {args.out}", file=sys.stderr)


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    m = re.search(pattern, out)
    return m.group(1) if m else "?"


def render(rec: dict[str, Any]) -> str:
    base = rec["cases"]["msmtp -> smtp-sink"]
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}"  # noqa: E731
    msmtp = _version(["msmtp", "--version"], r"version (\S+)")
    lines = [
        "## The sendmail command vs msmtp",
        "",
        f"Generated by `python bench/{NAME} --messages {rec['messages']}"
        f"{' --reps ' + str(rec['reps']) if rec['reps'] > 1 else ''}`; this block is rewritten "
        "by that script, the rest of the file is kept.",
        "",
        "```",
        f"date:      {rec['date']}",
        f"machine:   {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, msmtp {msmtp}",
        f"loadavg:   start {rec['load_start']}",
        f"           end   {rec['load_end']}",
        f"load:      {rec['messages']} messages per case, {rec['parallel']} processes at a "
        f"time, 2 KB, -t -i; {rec['reps']} repetition(s)",
        "```",
        "",
        "| sendmail command -> where | msg/s | × msmtp->sink | start-to-exit idle (ms) | "
        "× msmtp->sink | under load p50 / p95 (ms) | CPU per run (ms) | × msmtp->sink | "
        "peak RSS per run (MB) | × msmtp->sink |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in rec["cases"].items():
        rates = f" ({', '.join(fmt(r) for r in c['rates'])})" if len(c["rates"]) > 1 else ""
        lines.append(
            f"| {name} | **{fmt(c['rate'])}**{rates} | {c['rate'] / base['rate']:.2f}× | "
            f"{c['startup_ms']:.1f} | {c['startup_ms'] / base['startup_ms']:.1f}× | "
            f"{c['p50_ms']:.0f} / {c['p95_ms']:.0f} | {c['cpu_ms']:.0f} | "
            f"{c['cpu_ms'] / max(base['cpu_ms'], 0.1):.0f}× | {c['rss_kb'] / 1024:.1f} | "
            f"{c['rss_kb'] / base['rss_kb']:.1f}× |")
    ch = rec["checks"]
    cores = os.cpu_count() or 1
    lines += ["", "CPU, not the store or the network, bounds these rates: every run is a new "
              "process that starts an interpreter and imports its libraries. With "
              f"{cores} cores the ceiling is {cores} s of CPU / CPU per run: "
              + "; ".join(f"{n} {cores * 1000 / c['cpu_ms']:,.0f} msg/s"
                          for n, c in rec["cases"].items() if c["cpu_ms"] > 0) + "."]
    lines += [
        "",
        f"Checks: {'all passed' if rec['ok'] else 'FAILED'} — every invocation exited 0: "
        f"{ch['exit status 0 everywhere']}; store rows from `sendmail:` "
        f"{ch['store rows (sendmail)']} of {ch['per case']}, from `smtp:` "
        f"{ch['store rows (smtp)']} of {2 * ch['per case']}; smtp-sink "
        f"counted {ch['smtp-sink count']} of {ch['smtp-sink expected']} (msmtp's own plus "
        "everything Postroom delivered).",
        "",
    ]
    failed = {n: c["first_error"] for n, c in rec["cases"].items() if c["failed"]}
    for n, e in failed.items():
        lines.append(f"- {n}: first error: `{e}`")
    return "\n".join(lines) + "\n"


def write_block(path: Path, report: str) -> None:
    """Replace this script's block in the file (markers below the relay bench's generated
    part), or append it."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{report}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        if GENERATED_END not in text:
            sys.exit(f"{path} has no '{GENERATED_END}' line: the block goes below it")
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    main()
