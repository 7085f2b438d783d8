#!/usr/bin/env python3
"""`postroom serve`'s memory before and after the first use of each door (issue 19.4).

    sudo .venv/bin/python bench/memory_bench.py              # 3 repetitions
    sudo .venv/bin/python bench/memory_bench.py --reps 5 --src /tmp/other/src

Measured the way bench/relay_bench.py measures idle memory: VmRSS (and PSS) of the serve
process read from /proc, ``--settle`` seconds after the step (0.5 s after the SMTP port
answers for the first two rows). The steps, on one `postroom serve` (one SMTP connection
to smtp-sink, as in the relay bench):

1. first start on an empty data folder (database created and migrated, key, certificate);
   that server is stopped, an app and an admin account are added with the CLI;
2. idle: a second start on that folder, nothing sent;
3. one message handed in over SMTP, delivered to the sink;
4. one message through the HTTP API (`POST /api/v1/messages`), delivered;
5. the web admin: sign in and the dashboard; 6. the log; 7. the API message's page.

Also timed: the first admin page, which starts the web admin's own process, and the same
page once it runs; and that process's own RSS after the pages (it is not serve's, and it
exits after ``[admin] process_idle`` seconds without a request).

Each row also gives the number of modules the server holds (POSTROOM_DEBUG_MODULES,
written on SIGUSR1). A private Postfix instance (bench/postfix_instance.py) gives Postfix's
idle memory, all its processes summed, side by side. ``--src DIR`` runs the Postroom found
in DIR (a ``src`` folder of another checkout, put first on PYTHONPATH): to compare with
the code before a change. Needs root (Postfix, smtp-sink -u nobody). Every process started
here is tracked by PID and stopped in a finally block.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from postfix_instance import PostfixInstance, mem  # noqa: E402
from relay_bench import (  # noqa: E402
    HOST,
    SMTP_SINK,
    TARGETS,
    Proc,
    Sink,
    free_port,
    mb,
    postroom_cmd,
    say,
    wait_banner,
    write_config,
)

ADMIN = ("measurer", "tabby cat on the keyboard")
STEPS = [
    ("first", "first start on an empty folder (migrates, makes key and certificate)"),
    ("idle", "idle after a start (nothing sent yet)"),
    ("smtp", "after one message over SMTP, delivered"),
    ("api", "after one message through the HTTP API, delivered"),
    ("dashboard", "after signing in to the web admin and its dashboard"),
    ("log", "after the log page"),
    ("message", "after a message's page"),
]


class Serve:
    """One `postroom serve` on ``root`` (config written by relay_bench.write_config)."""

    def __init__(self, root: Path, sink_port: int, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = write_config(root, self.port, sink_port, split=False)
        found = re.search(r'http_listen = "[^:]+:(\d+)"', self.config.read_text())
        if found is None:
            raise RuntimeError("no http_listen in the bench's configuration")
        self.http = f"http://{HOST}:{found.group(1)}"
        self.dump = root / "modules.txt"
        self.proc: Proc | None = None

    def cli(self, *args: str, stdin: bytes | None = None) -> str:
        out = subprocess.run([*postroom_cmd(), *args, "--config", str(self.config)],
                             input=stdin, capture_output=True, env=self.env, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"postroom {args[0]} failed: {out.stderr.decode()[-500:]}")
        return out.stdout.decode()

    def start(self) -> None:
        self.proc = Proc("postroom-serve", [*postroom_cmd(), "serve", "--config",
                                            str(self.config)],
                         self.root / "serve.log", env={**self.env,
                                                       "POSTROOM_DEBUG_MODULES": str(self.dump)})
        wait_banner(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def sample(self, settle: float) -> dict[str, int]:
        """Memory ``settle`` seconds from now, and the number of modules held."""
        if self.proc is None or not self.proc.alive():
            raise RuntimeError(f"postroom serve is not running; see {self.root / 'serve.log'}")
        time.sleep(settle)
        out = mem(self.proc.pid)
        self.dump.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.dump.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        out["modules"] = len(self.dump.read_text().split()) if self.dump.exists() else -1
        return out


def http_client(base: str, key: str | None = None) -> Any:
    import httpx

    return httpx.Client(base_url=base, timeout=60, follow_redirects=False,
                        headers={"Authorization": f"Bearer {key}"} if key else None)


def admin_process_rss(srv: Serve) -> float:
    """VmRSS (kB) of serve's web admin process, 0 when it has none."""
    assert srv.proc is not None
    for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"admin_child" in cmd:
                return float(mem(int(child)).get("VmRSS", 0))
    return 0.0


def one_run(work: Path, sink: Sink, env: dict[str, str], settle: float) -> dict[str, Any]:
    srv = Serve(work, sink.port, env)
    rec: dict[str, Any] = {}
    try:
        srv.start()
        rec["first"] = srv.sample(0.5)
        srv.stop()
        key = re.search(r"Authorization: Bearer (\S+)", srv.cli("app", "add", "bench"))
        if key is None:
            raise RuntimeError("no API key in `postroom app add` output")
        srv.cli("admin", "add", ADMIN[0], "--role", "admin", "--password-stdin",
                stdin=f"{ADMIN[1]}\n".encode())
        srv.start()
        rec["idle"] = srv.sample(0.5)
        base = sink.count()
        with smtplib.SMTP(HOST, srv.port, timeout=30) as s:
            s.sendmail("a@example.com", ["b@example.org"], b"From: a@example.com\r\n"
                       b"To: b@example.org\r\nSubject: memory bench\r\n\r\nhello\r\n")
        if not sink.wait_count(base + 1, 60):
            raise RuntimeError("the SMTP message was not delivered")
        rec["smtp"] = srv.sample(settle)
        with http_client(srv.http, key.group(1)) as c:
            r = c.post("/api/v1/messages", json={"from": "a@example.com",
                                                 "to": ["b@example.org"],
                                                 "subject": "memory bench", "text": "hello"})
            if r.status_code != 202:
                raise RuntimeError(f"API send: {r.status_code} {r.text[:300]}")
            msg_id = r.json()["id"]
        if not sink.wait_count(base + 2, 60):
            raise RuntimeError("the API message was not delivered")
        rec["api"] = srv.sample(settle)
        with http_client(srv.http) as c:
            # The web admin's own process starts on its first request: that page's time,
            # then the same page's once it runs (postroom.ingress.admin_proxy).
            for step in ("cold", "warm"):
                began = time.perf_counter()
                if c.get("/admin/login").status_code != 200:
                    raise RuntimeError("/admin/login: not 200")
                rec.setdefault("latency", {})[step] = time.perf_counter() - began
            r = c.post("/admin/login", data={"name": ADMIN[0], "password": ADMIN[1]})
            if r.status_code != 303:
                raise RuntimeError(f"admin login: {r.status_code}")
            for step, path in (("dashboard", "/admin/"), ("log", "/admin/log"),
                               ("message", f"/admin/messages/{msg_id}")):
                r = c.get(path)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code}")
                rec[step] = srv.sample(settle)
            rec["latency"]["child_rss_kb"] = admin_process_rss(srv)
    finally:
        srv.stop()
    return rec


def report(records: list[dict[str, Any]], postfix: dict[str, int] | None,
           env: dict[str, Any]) -> str:
    lines = [f"`bench/memory_bench.py --reps {env['reps']}` ({env['when']}, source "
             f"{env['src']}, load average {env['load']}): median of {len(records)} runs "
             "(range in brackets).", "",
             "| `postroom serve` | RSS MB | PSS MB | modules |", "|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        text = mb(statistics.median(values))
        return text if len(values) == 1 else f"{text} [{mb(min(values))}-{mb(max(values))}]"

    for step, label in STEPS:
        rss = [r[step].get("VmRSS", 0) for r in records]
        pss = [r[step].get("Pss", 0) for r in records]
        mods = [r[step].get("modules", 0) for r in records]
        ok = statistics.median(rss) / 1024 <= TARGETS["idle_rss_mb"]
        mark = "" if step == "first" else (" ✅" if ok else " ❌")
        lines.append(f"| {label} | **{cell(rss)}**{mark} | {cell(pss)} | "
                     f"{int(statistics.median(mods))} |")
    waits = [r["latency"] for r in records if "latency" in r]
    if waits:
        lines.append(
            "| the web admin's process, after the pages (not serve's) | "
            f"{cell([w['child_rss_kb'] for w in waits])} | | |")
    if postfix:
        lines.append(f"| Postfix, all {postfix['procs']} processes, idle after start | "
                     f"{mb(postfix['rss_kb'])} | {mb(postfix['pss_kb'])} | |")
    if waits:
        lines += ["", "First admin page (`GET /admin/login`, starts the web admin's process): "
                  f"{statistics.median(w['cold'] for w in waits):.2f} s; the same page "
                  f"once it runs: {statistics.median(w['warm'] for w in waits) * 1000:.0f} ms "
                  "(medians)."]
    lines += ["", f"Target (issues 16, 19): ≤ {TARGETS['idle_rss_mb']:g} MB RSS idle, after "
              "each door has been used once (✅/❌ per row)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="runs (fresh folder each)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between a step and its reading")
    ap.add_argument("--src", default="", help="a src folder to run Postroom from instead")
    ap.add_argument("--no-postfix", action="store_true", help="skip Postfix's idle figure")
    ap.add_argument("--json", default="", help="also write the raw figures here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: smtp-sink -u nobody and the private Postfix instance need it")
    if not Path(SMTP_SINK).exists():
        sys.exit("needs Postfix's smtp-sink (apt-get install postfix)")
    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    if a.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [a.src, env.get("PYTHONPATH")]))
    work = Path(tempfile.mkdtemp(prefix="postroom-memory-", dir="/tmp"))
    os.chmod(work, 0o755)
    say(f"work dir {work}")
    sink = pf = None
    records: list[dict[str, Any]] = []
    postfix: dict[str, int] | None = None
    try:
        sink = Sink(free_port(), work / "sink.log")
        if not a.no_postfix:
            pf = PostfixInstance(work / "postfix", free_port(), sink.port)
            pf.start()
            time.sleep(1.0)
            postfix = pf.memory()
        for rep in range(a.reps):
            rec = one_run(work / f"run{rep}", sink, env, a.settle)
            records.append(rec)
            say(f"  run {rep}: " + ", ".join(f"{k} {mb(v['VmRSS'])}" for k, v in rec.items()
                                             if "VmRSS" in v))
    finally:
        if pf is not None:
            pf.stop()
        if sink is not None:
            sink.stop()
    meta = {"reps": a.reps, "when": time.strftime("%Y-%m-%d %H:%M"),
            "src": a.src or "this checkout",
            "load": Path("/proc/loadavg").read_text().split()[0]}
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "records": records,
                                            "postfix": postfix}, indent=1))
    print()
    print(report(records, postfix, meta))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
