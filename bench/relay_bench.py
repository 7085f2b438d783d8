#!/usr/bin/env python3
"""Postroom vs Postfix as a relay, side by side on this machine, in one run.

    sudo .venv/bin/python bench/relay_bench.py              # full run (20,000 msgs/case)
    sudo .venv/bin/python bench/relay_bench.py --scale 0.1  # quick run

Topology (everything on 127.0.0.1, ports picked free at start)::

    smtp-source --> Postfix (private instance, `postfix -c DIR`) --+
    smtp-source --> postroom serve (worker inside)  ---------------+--> smtp-sink -c (counts)
    smtp-source --> postroom serve (worker = false) + postroom worker
    smtp-source --> postroom serve (worker inside), the email log's indexes dropped

For every case (2 KB / 50 KB messages x new connection per message / reused connections,
10 parallel sessions) each server gets the same smtp-source run, one after the other. A fresh
Postroom (new data folder with an empty database) is started for every case; Postfix is one
instance for the whole run whose queue is empty between cases. Measured per run:

* acceptance rate: messages / time until smtp-source exits (every message got its 250,
  i.e. was fsync'ed to the queue);
* end-to-end rate: messages / time until smtp-sink has counted all of them;
* CPU per message: the server's processes (Postfix: master + live + reaped children;
  Postroom: the serve process, plus the worker process in the split variant, all threads),
  and the whole box (/proc/stat, includes smtp-source, smtp-sink, kernel and this harness);
* memory: Postroom's RSS right after start (nothing sent yet) and its peak (VmHWM); sampled
  sums of RSS and PSS over all processes of each server during the load.

The last variant (``postroom-noidx``, not run by default: ``--servers
postroom,postroom-noidx``) starts on a copy of the same migrated database from which
bench/_logindex.py dropped migration 0008's indexes and triggers (the email log's text
index, pending and rollup triggers, filter indexes); serve sees the head revision and
migrates nothing. The report's "Postroom with/without log indexes" lines divide the default
variant's rates by it, per case (issue 13: >= 0.9x).

Correctness checks: smtp-source exit status, smtp-sink count == messages sent (no loss, no
duplicates), Postfix queue empty afterwards, every row of Postroom's `messages` table is
`sent`. Results: a markdown report written to docs/benchmarks.md (hand-written text below
the "END GENERATED" marker in that file is kept) and printed; raw JSON in the work dir.

Needs root (Postfix, smtp-sink -u nobody), postfix installed, `postroom` in this Python's
environment. Every process started here is tracked by PID and stopped in a finally block;
the system Postfix (/etc/postfix) is never touched.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from postfix_instance import CLK, PostfixInstance, mem, proc_cpu  # noqa: E402

REPO = HERE.parent
HOST = "127.0.0.1"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SESSIONS = 10
CASES = [  # (size bytes, reuse connections)
    (2048, False),
    (2048, True),
    (51200, False),
    (51200, True),
]
SERVERS = ("postfix", "postroom", "postroom-noidx", "split")
DEFAULT_SERVERS = ("postfix", "postroom", "split")
NOIDX = "postroom-noidx"  # postroom serve on a database without the email log's indexes
LABEL = {
    "postfix": "Postfix",
    "postroom": "postroom serve",
    NOIDX: "postroom serve, log indexes off",
    "split": "postroom serve + worker",
}
# Issue 16's: accepted and end-to-end rates at least these times Postfix's, server CPU per
# message at most this times Postfix's, in every case.
TARGETS = {"accept": 2.0, "e2e": 1.5, "cpu": 0.6, "idle_rss_mb": 60.0, "log_indexes": 0.9}
GEN_END = "<!-- END GENERATED: text below this line is kept when the bench rewrites the file -->"


# ------------------------------------------------------------------------------ helpers
def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"nothing answers on {HOST}:{port} after {timeout:.0f}s")


def src_hash() -> str:
    """Short hash of Postroom's source (src/postroom/**/*.py): the code each run started
    with, so a report can tell when the source changed in the middle of a run."""
    h = hashlib.sha256()
    for f in sorted((REPO / "src" / "postroom").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def box_busy() -> float:
    """Busy CPU-seconds of the whole machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:9]))
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """The box is shared: wait (at most ``max_wait`` s) until it is less than ``threshold``
    busy over one second, so a run does not start on top of someone else's burst. Returns
    the busy fraction of the last second waited."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = box_busy()
        time.sleep(1.0)
        frac = (box_busy() - b0) / (os.cpu_count() or 1)
        if frac < threshold or time.monotonic() > deadline:
            return frac


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread of a process (/proc/PID/task/TID/stat)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                v = f.read()
            v = v[v.rindex(")") + 2 :]
            fields = v.split()
            out[int(t)] = (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, ValueError, IndexError):
            pass
    return out


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def probe_ms() -> float:
    """CPU-speed probe (sha256 of 8 MiB + a 200k-iteration loop), best of 3, in ms.
    Higher = the box was slower at that moment (shared machine)."""
    buf = b"x" * (8 << 20)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        hashlib.sha256(buf).digest()
        x = 0
        for i in range(200_000):
            x += i
        best = min(best, time.perf_counter() - t)
    return best * 1000


def source_cmd(port: int, n: int, size: int, reuse: bool) -> list[str]:
    return [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(n), "-l", str(size),
            "-f", "a@example.com", "-t", "b@example.org", "-M", "client.test"] + \
           (["-d"] if reuse else []) + [f"{HOST}:{port}"]


def case_name(size: int, reuse: bool) -> str:
    return f"{round(size / 1024)} KB, {'reused conns (-d)' if reuse else 'new conn per msg'}"


class Proc:
    """A server process started (and later stopped) by PID."""

    def __init__(self, name: str, cmd: list[str], log: Path, **kw: Any) -> None:
        self.name, self.cmd = name, cmd
        self.log = log.open("ab")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait(timeout=10)
        self.log.close()


class Sink(Proc):
    """smtp-sink -c: its running counters (mesg=N) are parsed from its output."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.logpath = port, log
        super().__init__("smtp-sink", [SMTP_SINK, "-u", "nobody", "-c", f"{HOST}:{port}",
                                       "1024"], log)
        wait_banner(port)

    def count(self) -> int:
        with self.logpath.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 256))
            m = re.findall(rb"mesg=(\d+)", f.read())
        return int(m[-1]) if m else 0

    def wait_count(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= target:
                return True
            time.sleep(0.005)
        return False


class MemSampler(threading.Thread):
    """Samples a memory function every ``every`` seconds; keeps the maxima."""

    def __init__(self, fn: Any, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.fn, self.every = fn, every
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                for k, v in self.fn().items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
                self.samples += 1
            except Exception:
                pass
            self._halt.wait(self.every)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join(5)
        return self.peak


def run_source(cmd: list[str], timeout: float) -> tuple[int, float, float, str]:
    """Run smtp-source, bounded; returns (rc, wall s, its CPU s, stderr tail)."""
    c0, t0 = children_cpu(), time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        _, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        rc = -9
    return rc, time.perf_counter() - t0, children_cpu() - c0, err.decode(errors="replace")[-300:]


# --------------------------------------------------------------------------- Postroom
def postroom_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "postroom"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "postroom.cli"]


def write_config(root: Path, smtp_port: int, sink_port: int, split: bool) -> Path:
    cfg = root / "postroom.toml"
    cfg.write_text(f"""\
[server]
data_dir = "data"
smtp_listen = "{HOST}:{smtp_port}"
http_listen = "{HOST}:{free_port()}"
hostname = "postroom.bench.test"
worker = {"false" if split else "true"}

[delivery]
concurrency = 10
{"poll_interval = 0.05" if split else "# poll_interval: default (the listener wakes the worker)"}

[[connections]]
name = "upstream"
transport = "smtp"
host = "{HOST}"
port = {sink_port}
security = "none"
""")
    return cfg


class Postroom:
    """`postroom serve` (and, split, `postroom worker`) on a fresh copy of a data folder;
    with ``log_indexes`` false, the copy's database loses the email log's indexes first."""

    def __init__(self, root: Path, template: Path | None, sink_port: int, split: bool,
                 log_indexes: bool = True) -> None:
        self.root, self.split = root, split
        root.mkdir(parents=True, exist_ok=True)
        if template is not None:
            shutil.copytree(template, root / "data")
        if not log_indexes:
            if template is None:
                raise ValueError("log_indexes=False needs a template: a migrated database")
            drop_indexes(self.db)
        self.port = free_port()
        self.config = write_config(root, self.port, sink_port, split)
        self.procs: list[Proc] = []

    @property
    def db(self) -> Path:
        return self.root / "data" / "postroom.db"

    def start(self) -> None:
        cmd = postroom_cmd()
        serve = Proc("postroom-serve", [*cmd, "serve", "--config", str(self.config)],
                     self.root / "serve.log")
        self.procs.append(serve)
        wait_banner(self.port)
        if self.split:
            self.procs.append(Proc("postroom-worker",
                                   [*cmd, "worker", "--config", str(self.config)],
                                   self.root / "worker.log"))
            time.sleep(0.3)  # let it import and open the database
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited at start; see {p.log.name}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid, children=True) for p in self.procs if p.alive())

    def memory(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.procs:
            m = mem(p.pid)
            out["rss_kb"] = out.get("rss_kb", 0) + m.get("VmRSS", 0)
            out["pss_kb"] = out.get("pss_kb", 0) + m.get("Pss", 0)
            out["hwm_kb"] = out.get("hwm_kb", 0) + m.get("VmHWM", 0)
            out[f"{p.name}_rss_kb"] = m.get("VmRSS", 0)
            out[f"{p.name}_pss_kb"] = m.get("Pss", 0)
        return out

    def statuses(self) -> dict[str, int]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return dict(con.execute("SELECT status, count(*) FROM messages GROUP BY status"))
        finally:
            con.close()

    def wait_all_sent(self, expected: int, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        st: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                st = self.statuses()
            except sqlite3.Error:
                st = {}
            if st.get("sent", 0) >= expected:
                break
            time.sleep(0.1)
        return st


def drop_indexes(db: Path) -> None:
    """Drop the email log's indexes and triggers in the SQLite database ``db`` (already at
    the head revision: the template's), closing every connection before serve opens it."""
    from _logindex import drop_log_indexes

    from postroom.store.db import make_engine

    engine = make_engine(f"sqlite:///{db}")
    try:
        drop_log_indexes(engine)
    finally:
        engine.dispose()


def make_template(work: Path, sink_port: int) -> tuple[Path, dict[str, int]]:
    """Start postroom once on an empty folder (creates database, key, certificate), note its
    first-start memory, stop it. Each case then starts on a copy of this folder."""
    pr = Postroom(work / "template", None, sink_port, split=False)
    pr.start()
    time.sleep(0.5)
    first = pr.memory()
    pr.stop()
    data = work / "template" / "data"
    for f in data.glob("postroom.db-*"):  # -wal / -shm: checkpointed on clean close
        f.unlink()
    return data, first


# ------------------------------------------------------------------------------ a run
def measure(kind: str, srv: Any, sink: Sink, size: int, reuse: bool, n: int,
            warm: int, port: int, timeout: float, quiet: float) -> dict[str, Any]:
    rec: dict[str, Any] = dict(server=kind, case=case_name(size, reuse), size=size,
                               reuse=reuse, msgs=n, sessions=SESSIONS)
    errors: list[str] = []
    if warm:  # same size; spawns Postfix processes / opens Postroom's upstream sessions
        base = sink.count()
        rc, *_ = run_source(source_cmd(port, warm, size, reuse), timeout)
        if rc != 0 or not sink.wait_count(base + warm, 120):
            errors.append(f"warm-up failed (rc={rc})")
        if kind == "postfix":
            srv.wait_empty(60)
        else:
            srv.wait_all_sent(warm, 60)
        time.sleep(0.3)
    rec["busy_before"] = wait_quiet(quiet)
    rec["probe_ms"] = probe_ms()
    main_pid = srv.procs[0].pid if kind != "postfix" else None
    th0 = thread_cpu(main_pid) if main_pid else {}
    sampler = MemSampler(srv.memory)
    sampler.start()
    cmd = source_cmd(port, n, size, reuse)
    base = sink.count()
    box0, srv0, sink0 = box_busy(), srv.cpu(), proc_cpu(sink.pid)
    t0 = time.perf_counter()
    rc, t_acc, client_cpu, err = run_source(cmd, timeout)
    if main_pid:
        th1 = thread_cpu(main_pid)
        # the serve process during acceptance: its main thread (asyncio event loop: aiosmtpd
        # and the handler) and its other threads (SQLite writer, smtplib pool)
        rec["serve_loop_cores"] = (th1.get(main_pid, 0) - th0.get(main_pid, 0)) / t_acc
        rec["serve_other_cores"] = sum(v - th0.get(t, 0) for t, v in th1.items()
                                       if t != main_pid) / t_acc
    ok = sink.wait_count(base + n, timeout)
    t_e2e = time.perf_counter() - t0
    box1, srv1, sink1 = box_busy(), srv.cpu(), proc_cpu(sink.pid)
    rec["mem_peak"] = sampler.stop()
    rec.update(cmd=" ".join(cmd), rc=rc, accept_s=t_acc, accept_rate=n / t_acc, e2e_s=t_e2e,
               e2e_rate=n / t_e2e, client_cpu_s=client_cpu, server_cpu_s=srv1 - srv0,
               sink_cpu_s=sink1 - sink0, box_cpu_s=box1 - box0)
    if rc != 0:
        errors.append(f"smtp-source rc={rc}: {err.strip()}")
    if not ok:
        errors.append(f"sink got {sink.count() - base}/{n} within {timeout:.0f}s")
    # correctness: the queue drains, nothing lost, nothing duplicated
    if kind == "postfix":
        rec["queue_empty"] = srv.wait_empty(60)
        if not rec["queue_empty"]:
            errors.append(f"postfix queue not empty: {srv.queued()} files")
    else:
        st = srv.wait_all_sent(warm + n, 120)
        rec["db_status"] = st
        rec["db_all_sent"] = st.get("sent", 0) == warm + n and sum(st.values()) == warm + n
        if not rec["db_all_sent"]:
            errors.append(f"database rows {st}, expected {warm + n} sent")
        rec["mem_end"] = srv.memory()
    time.sleep(0.3)
    rec["delivered"] = sink.count() - base
    rec["delivered_ok"] = rec["delivered"] == n
    if ok and not rec["delivered_ok"]:
        errors.append(f"sink counted {rec['delivered']} for {n} sent (duplicates?)")
    rec["errors"] = errors
    return rec


def run_postroom(kind: str, work: Path, template: Path, sink: Sink, size: int, reuse: bool,
                 n: int, warm: int, timeout: float, keep: bool, tag: str,
                 quiet: float) -> dict[str, Any]:
    root = work / f"{kind}-{tag}"
    pr = Postroom(root, template, sink.port, split=(kind == "split"),
                  log_indexes=(kind != NOIDX))
    code = src_hash()
    try:
        pr.start()
        time.sleep(0.5)
        idle = pr.memory()
        rec = measure(kind, pr, sink, size, reuse, n, warm, pr.port, timeout, quiet)
        rec["mem_idle"] = idle
        rec["pids"] = [p.pid for p in pr.procs]
        rec["src"] = code
    finally:
        pr.stop()
    if not keep:
        shutil.rmtree(root / "data", ignore_errors=True)
    return rec


def profile_postroom(kind: str, work: Path, template: Path, sink: Sink, n: int,
                     out_dir: Path, timeout: float, fmt: str = "raw",
                     size: int = 2048) -> list[dict[str, Any]]:
    """An extra, unmeasured run (``size`` bytes, new connection per message) with py-spy attached to
    each Postroom process (`postroom serve`, and `postroom worker` in the split variant).
    ``raw``: collapsed stacks of the thread holding the GIL (py-spy --gil), summarised by
    thread, area and function; ``flamegraph``: an SVG of all (non-idle) threads."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return [{"error": "py-spy not found (pip install py-spy)"}]
    out_dir.mkdir(parents=True, exist_ok=True)
    root = work / f"profile-{kind}-{fmt}"
    pr = Postroom(root, template, sink.port, split=(kind == "split"))
    rate = 100
    names = ["serve", "worker"]
    results: list[dict[str, Any]] = []
    try:
        wait_quiet(20)
        pr.start()
        spies = []
        for name, proc in zip(names, pr.procs, strict=False):
            path = out_dir / f"{kind}-{name}-{size // 1024}kb.{'txt' if fmt == 'raw' else 'svg'}"
            results.append({"kind": kind, "process": name, "path": str(path), "rate": rate})
            cmd = [pyspy, "record", "--pid", str(proc.pid), "--rate", str(rate), "--threads",
                   "--format", fmt, "--output", str(path), "--duration", str(int(timeout))]
            if fmt == "raw":
                cmd.append("--gil")
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(1.0)
        base = sink.count()
        cpu0 = pr.cpu()
        t0 = time.perf_counter()
        rc, t_acc, _, _ = run_source(source_cmd(pr.port, n, size, False), timeout)
        t1 = time.perf_counter()
        cpu1 = pr.cpu()
        sink.wait_count(base + n, timeout)
        t2 = time.perf_counter()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        for res in results:
            res.update(rc=rc, accept_rate=n / t_acc, seconds=t2 - t0 + 1.0,
                       serve_cores=(cpu1 - cpu0) / (t1 - t0))
    finally:
        pr.stop()
        shutil.rmtree(root / "data", ignore_errors=True)
    if fmt == "raw":
        for res in results:
            res.update(summarize_profile(Path(res["path"])))
            if "samples" in res:
                res["gil_busy"] = res["samples"] / (rate * res["seconds"])
    return results


# Where a GIL sample is charged: the innermost frame whose file matches (leaf -> root).
AREAS = [
    ("sqlalchemy/", "SQLAlchemy (build, compile, execute statements; result rows)"),
    ("sqlite3/", "sqlite3 module"),
    ("smtplib.py", "smtplib (delivery to the upstream)"),
    ("postroom/transports/", "postroom SMTP transport"),
    ("email/", "email header parsing (summarize)"),
    ("aiosmtpd/", "aiosmtpd (SMTP protocol)"),
    ("asyncio/", "asyncio (event loop, transports, streams)"),
    ("postroom/", "postroom (handler, queue, worker)"),
    ("json/", "json (JSON columns)"),
    ("concurrent/futures/", "thread pools (hand-off)"),
    ("threading.py", "thread pools (hand-off)"),
    ("queue.py", "thread pools (hand-off)"),
    ("logging/", "logging"),
]
WRAPPERS = ("threading.py", "concurrent/futures/thread.py", "asyncio/runners.py",
            "typer/", "click/", "postroom/cli.py", "<module>", "asyncio/base_events.py",
            "asyncio/events.py")


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample counts per function, per thread and per area, from py-spy's
    collapsed stacks (``thread;frame;frame... count``)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return {"error": f"no profile written at {raw}"}
    for line in lines:
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        frames = stack.split(";")
        funcs = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]  # drop line numbers
        if not funcs:
            continue
        total += c
        tname = re.sub(r"^thread \(0x[0-9a-fA-F]+\): |^thread \(\d+\): ", "", frames[0])
        tname = re.sub(r"_\d+$", "_N", tname.strip('"'))
        threads[tname] += c
        self_c[funcs[-1]] += c
        for f in set(funcs):
            if not any(w in f for w in WRAPPERS):
                incl[f] += c
        for f in reversed(funcs):
            area = next((a for key, a in AREAS if key in f), None)
            if area:
                areas[area] += c
                break
        else:
            areas["other: " + funcs[-1]] += c
    return {
        "samples": total,
        "threads": threads.most_common(),
        "areas": areas.most_common(),
        "self": self_c.most_common(top),
        "inclusive": incl.most_common(top + 15),
    }


def print_profile(p: dict[str, Any], markdown: bool = False) -> str:
    tot = p["samples"]

    def pct(c: int) -> str:
        return f"{c * 100 / tot:.1f}"

    who = ("`postroom serve` (listener + worker in one process)" if p["kind"] == "postroom"
           else "`postroom serve` with `worker = false` (the listener alone)"
           if p.get("process") == "serve" else "`postroom worker` (the deliveries, split variant)")
    out = []
    if markdown:
        out += [f"### Profile: {who}", "",
                f"py-spy {p['rate']} Hz, only the thread holding the GIL (`--gil`), 2 KB "
                f"messages, new connection per message; an extra run, not measured. "
                f"Accepted {p['accept_rate']:,.0f} msg/s while sampled; Postroom's processes "
                f"used {p['serve_cores']:.2f} cores (serve, plus `postroom worker` when split); "
                f"{tot:,} samples with a thread holding the GIL. "
                f"Collapsed stacks: `{p['path']}`.", "",
                "GIL time by thread: " + ", ".join(f"{t} {pct(c)}%" for t, c in p["threads"]),
                "", "| GIL % | area (innermost matching frame) |", "|---|---|"]
        out += [f"| {pct(c)} | {a} |" for a, c in p["areas"][:12]]
        out += ["", "| GIL % incl. | function (inclusive, thread/loop wrappers left out) |",
                "|---|---|"]
        out += [f"| {pct(c)} | `{f}` |" for f, c in p["inclusive"][:25]]
        out += ["", "| GIL % self | function (self) |", "|---|---|"]
        out += [f"| {pct(c)} | `{f}` |" for f, c in p["self"][:15]]
        return "\n".join(out)
    out.append(f"  {who}: {p['accept_rate']:,.0f} msg/s, {p['serve_cores']:.2f} cores, "
               f"{tot} GIL samples -> {p['path']}")
    out.append("  by thread: " + ", ".join(f"{t} {pct(c)}%" for t, c in p["threads"]))
    out += [f"    area {pct(c):>5}%  {a}" for a, c in p["areas"][:12]]
    out += [f"    incl {pct(c):>5}%  {f}" for f, c in p["inclusive"][:30]]
    out += [f"    self {pct(c):>5}%  {f}" for f, c in p["self"][:20]]
    return "\n".join(out)


# --------------------------------------------------------------------------- reporting
def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def versions() -> dict[str, str]:
    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    pf = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                        text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "-"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        git += " + uncommitted changes in src/"
    return {"postroom": v("postroom"), "python": platform.python_version(),
            "aiosmtpd": v("aiosmtpd"), "sqlalchemy": v("sqlalchemy"),
            "sqlite": sqlite3.sqlite_version, "postfix": pf or "-",
            "kernel": platform.release(), "git": git}


def environment(scale: float, reps: int, n: int, servers: list[str]) -> dict[str, Any]:
    model = "-"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memtotal = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memtotal = int(line.split()[1]) // 1024
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(), "cpu_model": model, "mem_mib": memtotal,
            "loadavg_start": Path("/proc/loadavg").read_text().strip(), "scale": scale,
            "reps": reps, "msgs": n, "versions": versions(),
            "command": "python bench/relay_bench.py" + (f" --scale {scale:g}" if scale != 1
                                                       else "") +
                       (f" --reps {reps}" if reps != 1 else "") +
                       (f" --servers {','.join(servers)}"
                        if tuple(servers) != DEFAULT_SERVERS else "")}


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[(r["case"], r["server"])].append(r)
    out = {}
    for key, rs in by.items():
        n = rs[0]["msgs"]
        a: dict[str, Any] = {
            "n": len(rs), "msgs": n,
            "accept": med([r["accept_rate"] for r in rs]),
            "accept_range": (min(r["accept_rate"] for r in rs), max(r["accept_rate"] for r in rs)),
            "e2e": med([r["e2e_rate"] for r in rs]),
            "e2e_range": (min(r["e2e_rate"] for r in rs), max(r["e2e_rate"] for r in rs)),
            "srv_us": med([r["server_cpu_s"] / n * 1e6 for r in rs]),
            "box_us": med([r["box_cpu_s"] / n * 1e6 for r in rs]),
            "box_pct": med([r["box_cpu_s"] / (r["e2e_s"] * (os.cpu_count() or 1)) * 100
                            for r in rs]),
            "srv_cores": med([r["server_cpu_s"] / r["e2e_s"] for r in rs]),
            "rss_peak": max(r["mem_peak"].get("rss_kb", 0) for r in rs),
            "pss_peak": max(r["mem_peak"].get("pss_kb", 0) for r in rs),
            "errors": [e for r in rs for e in r["errors"]],
            "probe": med([r["probe_ms"] for r in rs]),
        }
        if key[1] != "postfix":
            a["rss_idle"] = med([r["mem_idle"]["rss_kb"] for r in rs])
            a["pss_idle"] = med([r["mem_idle"]["pss_kb"] for r in rs])
            a["hwm"] = max(r["mem_end"].get("hwm_kb", 0) for r in rs)
        out[key] = a
    return out


def log_index_lines(agg: dict[tuple[str, str], dict[str, Any]], cases: list[str],
                    w: Callable[[str], object]) -> None:
    """Postroom's rates with the email log's indexes divided by those without, per case
    (issue 13's target); nothing when the run had no ``postroom-noidx`` variant."""
    pairs = [(c, agg[(c, "postroom")], agg[(c, NOIDX)]) for c in cases
             if (c, "postroom") in agg and (c, NOIDX) in agg]
    if not pairs:
        return
    goal = TARGETS["log_indexes"]
    w("## Postroom with/without log indexes")
    w("")
    w(f"`{LABEL['postroom']}` divided by `{LABEL[NOIDX]}` (the same serve on a database "
      "without migration 0008's email-log indexes and triggers, bench/_logindex.py), "
      f"medians; target ≥ {goal:g}× (issue 13).")
    w("")
    for c, on, off in pairs:
        ra, re_ = on["accept"] / off["accept"], on["e2e"] / off["e2e"]
        w(f"- Postroom with/without log indexes, {c}: accepted {ra:.2f}× "
          f"{'✅' if ra >= goal else '❌'} ({fmt_rate(on['accept'])} / "
          f"{fmt_rate(off['accept'])} msg/s), end-to-end {re_:.2f}× "
          f"{'✅' if re_ >= goal else '❌'} ({fmt_rate(on['e2e'])} / {fmt_rate(off['e2e'])} "
          "msg/s)")
    w("")


def report(env: dict[str, Any], records: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    agg = aggregate(records)
    cases = list(dict.fromkeys(r["case"] for r in records))
    servers = [s for s in SERVERS if any(r["server"] == s for r in records)]
    v = env["versions"]
    L: list[str] = []
    w = L.append
    w("# Benchmarks: Postroom vs Postfix as a relay")
    w("")
    w(f"Generated by `{env['command']}` (see `bench/README.md`). Do not edit above the "
      "END GENERATED marker: the bench rewrites it.")
    w("")
    w("## Environment")
    w("")
    w("```")
    w(f"date:        {env['date']}   wall: {env.get('wall_s', 0):.0f} s")
    w(f"machine:     {env['cpus']} x {env['cpu_model']}, {env['mem_mib']} MiB, "
      f"kernel {v['kernel']}")
    w(f"versions:    postroom {v['postroom']}, Python {v['python']}, aiosmtpd {v['aiosmtpd']}, "
      f"SQLAlchemy {v['sqlalchemy']}, SQLite {v['sqlite']}, Postfix {v['postfix']}")
    w(f"source:      git {v['git']}; src/postroom hash {', '.join(env.get('src_hashes', []))}")
    w(f"loadavg:     start {env['loadavg_start']}")
    w(f"             end   {env.get('loadavg_end', '-')}")
    w(f"cpu probe:   {env.get('probe_range', '-')} (ms; higher = box slower at that moment)")
    w(f"scale:       {env['scale']:g} ({env['msgs']:,} messages per run), repetitions: "
      f"{env['reps']}, {SESSIONS} smtp-source sessions")
    w("```")
    w("")
    if len(env.get("src_hashes", [])) > 1:
        w("**Warning: Postroom's source changed during this run** (hashes above, in run "
          "order; each run's is in results.json): the rows below do not all measure the "
          "same code. Re-run on a quiet tree.")
        w("")
    w("## Results")
    w("")
    w("Rates in messages/s (median of the repetitions; range in brackets when more than one). "
      "`×Postfix` = Postroom's figure divided by Postfix's in the same case (for rates higher "
      "is better, for CPU and memory lower is better). `server CPU` = the server's own "
      "processes; `box CPU` = the whole machine from /proc/stat (client, sink, kernel and "
      "harness included), per message. `cores` = server CPU-seconds per wall second.")
    w("")
    w("| case | server | accepted msg/s | ×Postfix | end-to-end msg/s | ×Postfix | "
      "server CPU µs/msg | ×Postfix | box CPU µs/msg (busy) | cores | peak RSS / PSS MB | "
      "checks |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        pf = agg.get((c, "postfix"))
        for s in servers:
            a = agg.get((c, s))
            if a is None:
                continue

            def rng(key: str, a: dict[str, Any] = a) -> str:
                lo, hi = a[key + "_range"]
                return f" ({fmt_rate(lo)}–{fmt_rate(hi)})" if a["n"] > 1 else ""

            def ratio(key: str, a: dict[str, Any] = a, pf: Any = pf, s: str = s) -> str:
                if s == "postfix" or not pf or not pf[key]:
                    return ""
                return f"{a[key] / pf[key]:.2f}×"

            checks = "ok" if not a["errors"] else "FAIL: " + "; ".join(a["errors"])[:200]
            w(f"| {c} | {LABEL[s]} | **{fmt_rate(a['accept'])}**{rng('accept')} | "
              f"{ratio('accept')} | **{fmt_rate(a['e2e'])}**{rng('e2e')} | {ratio('e2e')} | "
              f"{a['srv_us']:,.0f} | {ratio('srv_us')} | {a['box_us']:,.0f} "
              f"({a['box_pct']:.0f}%) | {a['srv_cores']:.2f} | {mb(a['rss_peak'])} / "
              f"{mb(a['pss_peak'])} | {checks} |")
    w("")
    w("Where the CPU goes, µs per message (median): the server's processes, the load "
      "generator, the sink, and the rest of the box (kernel work not charged to a process: "
      "softirq for loopback TCP, jbd2/kworker writing back and fsyncing, plus this harness "
      "and other tenants of the shared box; `busy before` = how busy the box was in the "
      "second before the run). `serve threads` = cores used by `postroom serve` during "
      "acceptance: its main thread (the asyncio event loop: aiosmtpd, handler, worker loop) "
      "+ all its other threads (SQLite writer, smtplib delivery pool).")
    w("")
    w("| case | server | server | smtp-source | smtp-sink | rest of box | box total | "
      "busy before | serve threads (loop + others) |")
    w("|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        for s in servers:
            rs = [r for r in records if r["case"] == c and r["server"] == s]
            if not rs:
                continue
            n_ = rs[0]["msgs"]
            def f(k: str, rs: list[dict[str, Any]] = rs, n_: int = n_) -> float:
                return med([r[k] / n_ * 1e6 for r in rs])

            rest = med([(r["box_cpu_s"] - r["server_cpu_s"] - r["client_cpu_s"]
                         - r["sink_cpu_s"]) / n_ * 1e6 for r in rs])
            th = ""
            if "serve_loop_cores" in rs[0]:
                th = (f"{med([r['serve_loop_cores'] for r in rs]):.2f} + "
                      f"{med([r['serve_other_cores'] for r in rs]):.2f}")
            busy = max(r.get("busy_before", 0) for r in rs) * 100
            w(f"| {c} | {LABEL[s]} | {f('server_cpu_s'):,.0f} | {f('client_cpu_s'):,.0f} | "
              f"{f('sink_cpu_s'):,.0f} | {rest:,.0f} | {f('box_cpu_s'):,.0f} | {busy:.0f}% | "
              f"{th} |")
    w("")
    w("## Against the targets")
    w("")
    w(f"Targets: acceptance ≥ {TARGETS['accept']:g}× Postfix, end-to-end ≥ "
      f"{TARGETS['e2e']:g}× Postfix, server CPU per message ≤ {TARGETS['cpu']:g}× Postfix's "
      f"(every case), idle RSS ≤ {TARGETS['idle_rss_mb']:g} MB.")
    w("")
    w("| case | server | acceptance ×Postfix | end-to-end ×Postfix | server CPU ×Postfix |")
    w("|---|---|---|---|---|")
    verdict: dict[str, list[bool]] = defaultdict(list)
    for c in cases:
        pf = agg.get((c, "postfix"))
        for s in servers:
            a = agg.get((c, s))
            if s == "postfix" or a is None or pf is None:
                continue
            ra, re_ = a["accept"] / pf["accept"], a["e2e"] / pf["e2e"]
            rc = a["srv_us"] / pf["srv_us"]
            oka, oke = ra >= TARGETS["accept"], re_ >= TARGETS["e2e"]
            okc = rc <= TARGETS["cpu"]
            verdict[s + " accept"].append(oka)
            verdict[s + " e2e"].append(oke)
            verdict[s + " cpu"].append(okc)
            w(f"| {c} | {LABEL[s]} | {ra:.2f}× {'✅' if oka else '❌'} | "
              f"{re_:.2f}× {'✅' if oke else '❌'} | {rc:.2f}× {'✅' if okc else '❌'} |")
    w("")
    log_index_lines(agg, cases, w)
    w("## Memory")
    w("")
    w("| what | RSS MB | PSS MB |")
    w("|---|---|---|")
    fs = extra.get("first_start")
    if fs:
        w(f"| postroom serve, first start on an empty folder (creates database, key, "
          f"certificate) | {mb(fs['rss_kb'])} | {mb(fs['pss_kb'])} |")
    idle_rows = [
        ("postroom", "postroom-serve", "postroom serve (worker inside)"),
        ("split", "postroom-serve", "postroom serve (`worker = false`)"),
        ("split", "postroom-worker", "postroom worker"),
    ]
    for s, proc, label in idle_rows:
        rss_l = [r["mem_idle"].get(f"{proc}_rss_kb", 0) for r in records if r["server"] == s]
        pss_l = [r["mem_idle"].get(f"{proc}_pss_kb", 0) for r in records if r["server"] == s]
        if rss_l:
            r_med = med(rss_l)
            ok = r_med / 1024 <= TARGETS["idle_rss_mb"]
            w(f"| {label}, idle right after start (median of {len(rss_l)} starts) "
              f"| **{mb(r_med)}** {'✅' if ok else '❌'} (target ≤ "
              f"{TARGETS['idle_rss_mb']:g}) | {mb(med(pss_l))} |")
            verdict[s + " idle"].append(ok)
    for s in ("postroom", "split"):
        hw = [a["hwm"] for (c, ss), a in agg.items() if ss == s]
        pk = [(a["rss_peak"], a["pss_peak"]) for (c, ss), a in agg.items() if ss == s]
        if hw:
            w(f"| {LABEL[s]}, peak under load (VmHWM, max over cases; sampled peak PSS) | "
              f"{mb(max(hw))} | {mb(max(p for _, p in pk))} |")
    pfi = extra.get("postfix_idle")
    if pfi:
        w(f"| Postfix, all {pfi['procs']} processes, idle after start | {mb(pfi['rss_kb'])} | "
          f"{mb(pfi['pss_kb'])} |")
    pfk = [(a["rss_peak"], a["pss_peak"]) for (c, s), a in agg.items() if s == "postfix"]
    if pfk:
        w(f"| Postfix, all processes, sampled peak under load (max over cases) | "
          f"{mb(max(r for r, _ in pfk))} | {mb(max(p for _, p in pfk))} |")
    w("")
    w("RSS counts shared libraries in every process that maps them, so Postfix's RSS sum "
      "over-states it; PSS splits shared pages between the processes and is the honest total.")
    w("")
    w("## Verdict")
    w("")
    for s in ("postroom", "split"):
        if not verdict.get(s + " accept"):
            continue
        parts = []
        for key, label in (("accept", f"acceptance ≥ {TARGETS['accept']:g}×"),
                           ("e2e", f"end-to-end ≥ {TARGETS['e2e']:g}×"),
                           ("cpu", f"server CPU ≤ {TARGETS['cpu']:g}×"),
                           ("idle", f"idle RSS ≤ {TARGETS['idle_rss_mb']:g} MB")):
            vals = verdict.get(f"{s} {key}", [])
            if vals:
                parts.append(f"{label}: {'met' if all(vals) else 'MISSED'} "
                             f"({sum(vals)}/{len(vals)})")
        w(f"- **{LABEL[s]}**: " + "; ".join(parts))
    w("")
    w("## Correctness checks")
    w("")
    bad = [r for r in records if r["errors"]]
    w(f"{len(records)} measured runs. Every run: smtp-source exited 0; smtp-sink counted "
      "exactly the messages sent (no loss, no duplicates); Postfix's queue was empty "
      "afterwards; every row of Postroom's `messages` table was `sent` "
      f"(warm-up messages included). Failures: {len(bad) or 'none'}.")
    for r in bad:
        w(f"- {LABEL[r['server']]} {r['case']}: {'; '.join(r['errors'])}")
    w("")
    for p in extra.get("profiles", []):
        if "samples" in p:
            w(print_profile(p, markdown=True))
            w("")
    if extra.get("costs"):
        w("### Per-step CPU cost (`bench/listener_costs.py`, one thread, no contention)")
        w("")
        w("Measured in-process on the current code, one step at a time, median of 5 rounds. "
          "`wall` includes waiting for fsync.")
        w("")
        w("\n".join(extra["costs"]))
        w("")
    svgs = [p["path"] for p in extra.get("profiles", []) if p["path"].endswith(".svg")]
    if svgs:
        w(f"Flame graph (all non-idle threads): `{svgs[0]}` (in the work dir, not kept in "
          "the repository).")
        w("")
    w("## Method")
    w("")
    w(f"- One `smtp-sink -c` upstream counts every message; `smtp-source -s {SESSIONS} -m N "
      "-l SIZE [-d]` is the load (no pipelining; `-d` = each session reuses its connection). "
      "Each server gets the same run, one server at a time; cases and servers alternate.")
    w("- Postfix: a private instance (`postfix -c WORKDIR/postfix/conf`, see "
      "`bench/postfix_instance.py`): listens on 127.0.0.1 only, `relayhost = "
      "[127.0.0.1]:<sink>`, `mynetworks = 127.0.0.0/8`, durable queue (fsync before 250), "
      "logging through postlogd to a file, chroot off, concurrency limit 20. Warmed up once "
      "with 200 messages, and with a few per run.")
    w("- Postroom: `postroom serve` with one connection (`transport = \"smtp\"`, `security = "
      "\"none\"`, upstream = the sink) and `[delivery] concurrency = 10`; SQLite WAL, "
      "synchronous = FULL (the default). A fresh data folder per run (empty database); "
      "idle memory is taken 0.5 s after the port answers, before anything is sent. The split "
      "variant runs `[server] worker = false` plus `postroom worker` (`poll_interval = 0.05`) "
      "on the same database, so the listener and the deliveries can use both cores.")
    if any(r["server"] == NOIDX for r in records):
        w(f"- `{LABEL[NOIDX]}`: the default variant on a copy of the same migrated template "
          "database from which the email log's indexes and triggers (migration 0008) were "
          "dropped before serve started.")
    w("- Warm-up before each measured run: a few messages of the same case (not counted in "
      "the rates, counted in the database check).")
    w("- The box is shared and noisy (Postfix alone varies by up "
      "to ±35% between repetitions); use `--reps 3` for firmer numbers.")
    w("")
    w(GEN_END)
    return "\n".join(L) + "\n"


def write_report(text: str, out: Path) -> None:
    kept = ""
    if out.exists():
        old = out.read_text()
        if GEN_END in old:
            kept = old.split(GEN_END, 1)[1].lstrip("\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + ("\n" + kept if kept else ""))


# --------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the 20,000 messages per run (0.1 for a quick run)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of every run")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="comma-separated subset of: " + ", ".join(SERVERS) + f" (default: "
                         f"{','.join(DEFAULT_SERVERS)}; {NOIDX} = postroom serve without the "
                         "email log's indexes, for the with/without ratio)")
    ap.add_argument("--cases", default="",
                    help="comma-separated subset of case numbers 1-4 (2K new, 2K -d, 50K new, "
                         "50K -d)")
    ap.add_argument("--profile-size", type=int, default=2048,
                    help="message size of the --profile runs, in bytes (default 2048)")
    ap.add_argument("--profile", action="store_true",
                    help="also run postroom serve once under py-spy (new connections)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown report ('-' = print only)")
    ap.add_argument("--workdir", default="", help="default: a new folder under /tmp")
    ap.add_argument("--quiet-wait", dest="quiet", type=float, default=10.0,
                    help="before each run, wait up to this many seconds for the (shared) box "
                         "to be less than 20%% busy")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (databases, logs)")
    ap.add_argument("--from-json", default="",
                    help="only re-render the report from a results.json of an earlier run")
    a = ap.parse_args()
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        text = report(saved["env"], saved["records"], saved["extra"])
        print(text)
        if a.out != "-":
            write_report(text, Path(a.out))
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root: the private Postfix instance and smtp-sink -u need it")
    for tool in (SMTP_SOURCE, SMTP_SINK, shutil.which("postfix")):
        if not tool or not Path(tool).exists():
            sys.exit("needs Postfix's postfix, smtp-source and smtp-sink (apt-get install "
                     "postfix)")
    servers = [s for s in a.servers.split(",") if s]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        sys.exit(f"--servers: unknown {', '.join(unknown)}; pick from {', '.join(SERVERS)}")
    if "postfix" not in servers:
        say("note: without postfix there is nothing to compare against (no ratios)")
    cases = [CASES[int(i) - 1] for i in a.cases.split(",") if i] or CASES
    n = max(20, int(20000 * a.scale))
    warm = min(100, max(10, n // 50))
    timeout = max(180.0, n / 20)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="postroom-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    env = environment(a.scale, a.reps, n, servers)
    say(f"work dir {work}; {n:,} messages per run; servers {servers}; "
        f"loadavg {env['loadavg_start']}")
    t_start = time.time()
    records: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    sink = pf = None
    try:
        sink = Sink(free_port(), work / "sink.log")
        say(f"smtp-sink pid {sink.pid} on {HOST}:{sink.port}")
        if "postfix" in servers:
            pf = PostfixInstance(work / "postfix", free_port(), sink.port)
            pf.start()
            time.sleep(1.0)
            extra["postfix_idle"] = pf.memory()
            base = sink.count()
            run_source(source_cmd(pf.port, 200, 2048, False), timeout)
            sink.wait_count(base + 200, 120)
            pf.wait_empty(60)
            say(f"postfix master pid {pf.master_pid()} on {HOST}:{pf.port} (warmed up)")
        template, first = make_template(work, sink.port)
        extra["first_start"] = first
        say(f"postroom first start: RSS {mb(first['rss_kb'])} MB")
        for rep in range(a.reps):
            for size, reuse in cases:
                for kind in servers:
                    tag = f"{size // 1024}k{'-d' if reuse else ''}-r{rep}"
                    if kind == "postfix":
                        assert pf is not None
                        rec = measure("postfix", pf, sink, size, reuse, n, warm, pf.port,
                                      timeout, a.quiet)
                    else:
                        rec = run_postroom(kind, work, template, sink, size, reuse, n, warm,
                                           timeout, a.keep, tag, a.quiet)
                    rec["rep"] = rep
                    records.append(rec)
                    say(f"  [{rep}] {rec['case']:<30} {LABEL[kind]:<24} accepted "
                        f"{rec['accept_rate']:7,.0f}/s  end-to-end {rec['e2e_rate']:7,.0f}/s  "
                        f"server CPU {rec['server_cpu_s'] / n * 1e6:6,.0f} µs/msg  box "
                        f"{rec['box_cpu_s'] / n * 1e6:6,.0f} µs/msg"
                        + (f"  ERRORS: {rec['errors']}" if rec["errors"] else ""))
                    time.sleep(0.5)
        if a.profile:
            pn = min(n, 5000)
            extra["profiles"] = []
            for kind, fmt in (("postroom", "raw"), ("split", "raw"), ("postroom", "flamegraph")):
                say(f"profiling {LABEL[kind]} ({fmt}, {pn} messages; extra run, not measured)")
                for p in profile_postroom(kind, work, template, sink, pn,
                                          work / "profile-out", timeout, fmt,
                                          a.profile_size):
                    extra["profiles"].append(p)
                    if "samples" in p:
                        say(print_profile(p))
                    elif "error" in p:
                        say(f"  profile failed: {p['error']}")
                    else:
                        say(f"  flame graph: {p['path']}")
            say("per-step costs (bench/listener_costs.py)...")
            r = subprocess.run([sys.executable, str(HERE / "listener_costs.py"), "--n", "1000"],
                               capture_output=True, text=True, timeout=600)
            extra["costs"] = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
            say("\n".join(extra["costs"]) or r.stderr[-2000:])
    finally:
        if pf is not None:
            pf.stop()
        if sink is not None:
            sink.stop()
    env["wall_s"] = time.time() - t_start
    env["src_hashes"] = list(dict.fromkeys(r["src"] for r in records if "src" in r))
    env["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    probes = [r["probe_ms"] for r in records]
    if probes:
        env["probe_range"] = (f"min {min(probes):.1f} / median {med(probes):.1f} / "
                              f"max {max(probes):.1f}")
    (work / "results.json").write_text(json.dumps(
        {"env": env, "records": records, "extra": extra}, indent=1, default=str))
    text = report(env, records, extra)
    print()
    print(text)
    if a.out != "-":
        write_report(text, Path(a.out))
        say(f"wrote {a.out}; raw results in {work / 'results.json'}")
    if not a.keep:
        for d in work.iterdir():
            if d.is_dir() and d.name not in ("postfix", "profile-out"):
                shutil.rmtree(d, ignore_errors=True)
    failed = any(r["errors"] for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
