"""HTTP API vs SMTP submission: how fast can an app hand a message over, side by side.

    sudo .venv/bin/python bench/http_bench.py                 # 5,000 messages per row
    sudo .venv/bin/python bench/http_bench.py --messages 1000 # quick

Topology (everything on 127.0.0.1, ports picked free at start)::

    10 client threads --HTTP POST /api/v1/messages--> postroom serve --+
    10 client threads --SMTP (smtplib)-------------->  postroom serve --+--> smtp-sink -c
    10 client threads --SMTP (smtplib)--> Postfix (private instance) --+
    10 client threads --HTTP POST--> postroom serve (worker = false) --+
                                     + postroom worker ----------------+

What an app would otherwise do is submit the message over SMTP to the local Postfix, with
smtplib (Django's SMTP backend does exactly that); that is the reference row. Every row
uses the same client pattern: 10 threads in this process, each with one kept-alive
connection (smtplib.SMTP reused with RSET / http.client.HTTPConnection, both standard
library; one more row uses postroom.client, which is httpx-based), taking messages from a
shared counter until N were accepted. The last row of each size runs the deliveries in a
`postroom worker` process beside `postroom serve` (``worker = false``, as relay_bench.py's
split variant), so that they do not share the serve process's interpreter with intake; its
server CPU is both processes'. Two messages, each run through every row: about 2 KB
and 50 KB, each text + HTML + a PDF attachment. The HTTP rows post it as JSON with the file
base64 in it (as an app sends it); the SMTP rows send the same message as MIME (composed
once with postroom.message.build from that JSON). ``--sizes`` and ``--rows`` pick some of
them while iterating (with ``--out -``).

Measured per row: accepted messages/s (N / wall time until the last 202/250), latency of
each hand-over (request sent -> 202 / final 250 after DATA) p50 and p99, CPU per message of
the server (Postroom: the serve process, all threads; Postfix: master + children) and of
the client threads, and the load average before and after. Correctness: every message
reaches smtp-sink (end-to-end count), and Postroom's database rows are all `sent`.

Also measured: `postroom serve`'s RSS 0.5 s after its ports answer (the HTTP listener is
on; FastAPI is imported on the first API request, so also after one), and the cost of the
API key check (a keyed hash, HMAC-SHA256, and a cached lookup) in this process.

Needs root (Postfix, smtp-sink -u nobody) and Postfix installed. Every process started here
is tracked by PID and stopped in a finally block.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.metadata as md
import json
import os
import random
import re
import resource
import shutil
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _report  # noqa: E402 - bench/_report.py: the docs/benchmarks.md block
from postfix_instance import PostfixInstance, mem, proc_cpu  # noqa: E402
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

REPO = HERE.parent
NAME = "http_bench.py"
BEGIN, END = _report.markers(NAME)
CLIENTS = 10
SENDER, RCPT = "bench@example.com", "rcpt@example.org"
# Two messages as an app sends them (text, HTML and a file, the file base64 in the JSON):
# about 2 KB and 50 KB, in the JSON body and in the MIME the SMTP rows send.
SIZES = {"2 KB": (520, 720, 400), "50 KB": (2000, 3000, 34_000)}  # text, HTML, file bytes


def _lines(words: str, size: int) -> str:
    """``size`` characters of lines wrapped at 72 between words, as a template renders."""
    return "\n".join(textwrap.wrap(words * (size // len(words) + 1), 72))[:size]


def payload(label: str) -> dict[str, Any]:
    """The JSON an app posts for the ``label`` message of SIZES (the same bytes each run)."""
    text_n, html_n, file_n = SIZES[label]
    words = "All work and no play makes Jack a dull boy. " * 4
    text = _lines(words, text_n)
    html = "<html><body>\n" + _lines("<p>" + words + "</p>", html_n - 29) + \
        "\n</body></html>"
    data = random.Random(file_n).randbytes(file_n)
    return {"from": f"Bench <{SENDER}>", "to": [RCPT], "subject": f"http bench {label}",
            "text": text, "html": html,
            "attachments": [{"filename": "invoice.pdf", "content_type": "application/pdf",
                             "content": base64.b64encode(data).decode()}]}


def mime(body: dict[str, Any]) -> bytes:
    """The same message as MIME, composed by postroom.message (what the SMTP rows send)."""
    from postroom.message import Attachment, Draft, build

    files = [Attachment(a["filename"], base64.b64decode(a["content"]), a["content_type"])
             for a in body["attachments"]]
    return build(Draft(from_=body["from"], to=body["to"], subject=body["subject"],
                       text=body["text"], html=body["html"], attachments=files)).raw


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class PostroomServe:
    """`postroom serve`; ``split``: with ``worker = false``, its deliveries made by a
    `postroom worker` process beside it (relay_bench.py's split variant)."""

    def __init__(self, root: Path, sink_port: int, split: bool = False) -> None:
        root.mkdir(parents=True)
        self.root, self.split = root, split
        self.smtp_port, self.http_port = free_port(), free_port()
        self.config = root / "postroom.toml"
        self.config.write_text(f"""\
[server]
data_dir = "data"
smtp_listen = "{HOST}:{self.smtp_port}"
http_listen = "{HOST}:{self.http_port}"
hostname = "postroom.bench.test"
worker = {"false" if split else "true"}

[delivery]
concurrency = 10
{"poll_interval = 0.05" if split else ""}

[[connections]]
name = "upstream"
transport = "smtp"
host = "{HOST}"
port = {sink_port}
security = "none"
""")
        self.proc: Proc | None = None
        self.worker: Proc | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run([*postroom_cmd(), *args, "--config", str(self.config)],
                             capture_output=True, text=True, timeout=120, check=True)
        return out.stdout

    def start(self, first: bool = False) -> None:
        if first:  # the very first start creates the key and certificate (and loads
            self.start()  # cryptography's X.509 code); measure a normal start after it
            self.wait_http()
            self.stop()
        self.proc = Proc("postroom-serve", [*postroom_cmd(), "serve", "--config",
                                            str(self.config)], self.root / "serve.log")
        wait_banner(self.smtp_port)
        if self.split and self.worker is None:
            self.worker = Proc("postroom-worker", [*postroom_cmd(), "worker", "--config",
                                                   str(self.config)], self.root / "worker.log")

    def wait_http(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://{HOST}:{self.http_port}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def rss_kb(self) -> int:
        assert self.proc is not None
        return mem(self.proc.pid).get("VmRSS", 0)

    def cpu(self) -> float:
        assert self.proc is not None
        worker = proc_cpu(self.worker.pid) if self.worker is not None else 0.0
        return proc_cpu(self.proc.pid, children=True) + worker

    def statuses(self) -> dict[str, int]:
        con = sqlite3.connect(f"file:{self.root / 'data' / 'postroom.db'}?mode=ro", uri=True,
                              timeout=30)
        try:
            return dict(con.execute("SELECT status, count(*) FROM messages GROUP BY status"))
        finally:
            con.close()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


# -- the clients ---------------------------------------------------------------------------
def _http_worker(port: int, key: str, idem: bool, message: dict[str, Any]) -> Any:
    """http.client (standard library, like smtplib): one kept-alive connection."""
    body = json.dumps(message).encode()

    def make() -> Any:
        c = http.client.HTTPConnection(HOST, port, timeout=30)  # sets TCP_NODELAY
        def one() -> None:
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            if idem:  # a new message each time: the key is looked up, then stored
                headers["Idempotency-Key"] = uuid.uuid4().hex
            c.request("POST", "/api/v1/messages", body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            if r.status != 202:
                raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")

        return one, c.close

    return make


def _client_lib_worker(url: str, key: str, message: dict[str, Any]) -> Any:
    """postroom.client.Client (httpx), what the Mailer's remote mode uses."""
    from postroom.client import Client

    def make() -> Any:
        c = Client(url, key)
        return (lambda: c.send(message)), c.close

    return make


def _smtp_worker(port: int, raw: bytes) -> Any:
    def make() -> Any:
        s = smtplib.SMTP(HOST, port, timeout=30)
        s.ehlo("client.bench.test")

        def one() -> None:
            refused = s.sendmail(SENDER, [RCPT], raw)
            if refused:
                raise RuntimeError(f"refused: {refused}")

        return one, s.quit

    return make


def drive(make: Any, n: int) -> dict[str, Any]:
    """N hand-overs from CLIENTS threads, each on its own connection; latencies in ms."""
    lock = threading.Lock()
    left = [n]
    lat: list[list[float]] = [[] for _ in range(CLIENTS)]
    errors: list[str] = []
    ready = threading.Barrier(CLIENTS + 1)

    def run(i: int) -> None:
        try:
            one, close = make()
        except Exception as err:
            errors.append(repr(err))
            ready.wait()
            return
        ready.wait()
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        break
                    left[0] -= 1
                t = time.perf_counter()
                one()
                lat[i].append((time.perf_counter() - t) * 1000)
        except Exception as err:
            errors.append(repr(err)[:300])
        finally:
            close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    ready.wait()
    c0, t0 = cpu_self(), time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    flat = [x for per in lat for x in per]
    return {"wall_s": wall, "done": len(flat), "client_cpu_s": cpu_self() - c0,
            "p50_ms": pct(flat, 50), "p99_ms": pct(flat, 99), "errors": errors[:5]}


def measure(label: str, make: Any, n: int, warm: int, sink: Sink, cpu: Any,
            quiet: float) -> dict[str, Any]:
    say = print
    base = sink.count()
    drive(make, warm)
    sink.wait_count(base + warm, 120)
    busy = wait_quiet(quiet)
    load0 = loadavg()
    base = sink.count()
    cpu0 = cpu()
    res = drive(make, n)
    accepted_cpu = cpu() - cpu0
    t0 = time.perf_counter()
    delivered = sink.wait_count(base + n, 300)
    res.update(label=label, msgs=n, rate=res["done"] / res["wall_s"],
               server_cpu_us=accepted_cpu / max(1, res["done"]) * 1e6,
               client_cpu_us=res["client_cpu_s"] / max(1, res["done"]) * 1e6,
               delivered=delivered, drain_s=time.perf_counter() - t0, busy_before=busy,
               load_before=load0, load_after=loadavg())
    say(f"  {label}: {res['rate']:,.0f} msg/s, p50 {res['p50_ms']:.2f} ms, "
        f"p99 {res['p99_ms']:.2f} ms, server {res['server_cpu_us']:,.0f} µs/msg, "
        f"load {load0} -> {res['load_after']}" + (f" ERRORS {res['errors']}"
                                                   if res["errors"] else ""))
    return res


def auth_cost(pr: PostroomServe, key: str) -> dict[str, float]:
    """The API key check in this process against the bench database, with the instance's
    key: the first check reads the app's row, later ones hit the 1 s policy cache (HMAC-SHA256
    of the secret each time)."""
    from postroom.apps import Apps
    from postroom.secrets import load_or_create_key
    from postroom.store.db import make_engine

    engine = make_engine(f"sqlite:///{pr.root / 'data' / 'postroom.db'}")
    try:
        apps = Apps(engine, load_or_create_key(pr.root / "data" / "secret.key"))
        t = time.perf_counter()
        assert apps.verify_api_key(key)
        first = (time.perf_counter() - t) * 1000
        times = []
        for _ in range(2000):
            t = time.perf_counter()
            apps.verify_api_key(key)
            times.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        apps.verify_api_key(key.rpartition(".")[0] + ".wrong")
        wrong = (time.perf_counter() - t) * 1000
    finally:
        engine.dispose()
    return {"first_ms": first, "cached_us": statistics.median(times), "wrong_ms": wrong}


# -- report --------------------------------------------------------------------------------
def report(env: dict[str, Any], rows: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    sizes = extra.get("sizes", {})
    shown = ", ".join(f"{label}: {j:,} B of JSON, {m:,} B of MIME"
                      for label, (j, m) in sizes.items())
    L = [BEGIN, "", "## HTTP API: hand-over rate and latency vs SMTP submission", "",
         f"Generated by `python bench/{NAME} --messages {env['messages']}` (see its "
         "docstring). Each row: 10 client threads in one Python process, one kept-alive "
         "connection each (smtplib, http.client: both standard library; one row of each size "
         "uses Postroom's own httpx-based client; the last one delivers from a `postroom "
         "worker` process beside `postroom serve`, whose server CPU counts both). Two "
         "messages, each text + HTML + a PDF attachment, posted as JSON (the file base64 in "
         "it, as an app sends it) and "
         f"sent over SMTP as the same message in MIME ({shown}); every message is stored "
         "durably (fsync) before its 202 / 250. `×Postfix` divides by the Postfix row of the "
         "same size (smtplib to a private Postfix, what an app does without Postroom; for "
         "latency and CPU lower is better). Client CPU: the bench process's, all threads.",
         "", "```",
         f"date:      {env['date']}   git {env['git']}, src/postroom {env['src']}",
         f"versions:  {env['versions']}",
         f"machine:   {env['cpus']} CPUs; load average before {env['load_start']}, after "
         f"{env['load_end']} (1/5/15 min; the box is shared)", "```", "",
         "| message | server, door | accepted msg/s | ×Postfix | p50 ms | p99 ms | ×Postfix p99 "
         "| server CPU µs/msg | client CPU µs/msg | all delivered | load before → after |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = r.get("size", "2 KB")
        ref = next((x for x in rows if x.get("size", "2 KB") == size
                    and x["label"].startswith("Postfix")), None)
        rate = f"{r['rate'] / ref['rate']:.2f}×" if ref else "–"
        p99 = f"{r['p99_ms'] / ref['p99_ms']:.2f}×" if ref else "–"
        L.append(
            f"| {size} | {r['label']} | **{r['rate']:,.0f}** | {rate} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {p99} | "
            f"{r['server_cpu_us']:,.0f} | {r['client_cpu_us']:,.0f} | "
            f"{'yes' if r['delivered'] and not r['errors'] else 'NO ' + str(r['errors'])} | "
            f"{r['load_before']} → {r['load_after']} |")
    a = extra["auth"]
    L += ["",
          f"`postroom serve` RSS with the HTTP listener on: {extra['rss_idle_kb'] / 1024:.1f} "
          "MB 0.5 s after its SMTP port answers (target ≤ 60 MB; httptools and the listener's "
          "connection code are imported on the first HTTP connection, the API's modules on "
          f"the first API request); "
          f"{extra['rss_health_kb'] / 1024:.1f} MB after a /healthz; "
          f"{extra['rss_api_kb'] / 1024:.1f} MB after the first API request; "
          f"{extra['rss_end_kb'] / 1024:.1f} MB after the runs. Database after the runs: "
          f"{extra['statuses']}; with `postroom worker` apart: "
          f"{extra.get('split_statuses')}.", "",
          f"API key check (in-process, same database): first {a['first_ms']:.1f} ms (reads the "
          f"app's row), then {a['cached_us']:.0f} µs (HMAC-SHA256 and the 1 s policy cache); "
          f"a wrong secret costs {a['wrong_ms']:.2f} ms: a flood of bad keys costs the server "
          "no more than good ones (the front then delays that address's answers).", "", END]
    return "\n".join(L) + "\n"


def write_block(text: str, out: Path) -> None:
    _report.write_block(NAME, text, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="per row")
    ap.add_argument("--warm", type=int, default=300, help="warm-up messages per row")
    ap.add_argument("--quiet-wait", dest="quiet", type=float, default=10.0,
                    help="wait up to this many seconds for the box to be <20%% busy per row")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown file for the report block ('-' = print only)")
    ap.add_argument("--from-json", default="",
                    help="only re-render the report from the results.json of an earlier run")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                    help="the messages to run (default: all)")
    ap.add_argument("--rows", nargs="+", default=[],
                    help="only the rows whose label holds one of these words (iterating; "
                    "the Postfix row is the reference of ×Postfix)")
    a = ap.parse_args()
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        text = report(saved["env"], saved["rows"], saved["extra"])
        print(text)
        if a.out != "-":
            write_block(text, Path(a.out))
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root: the private Postfix instance and smtp-sink -u need it")
    if not shutil.which("postfix") or not Path(SMTP_SINK).exists():
        sys.exit("needs Postfix (postfix, smtp-sink): apt-get install postfix")
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    os.chmod(work, 0o755)  # Postfix's own user must reach its folder inside
    print(f"work dir {work}")
    ver = versions()
    ver.update({m: md.version(m) for m in ("fastapi", "uvicorn", "httpx")})
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "messages": a.messages,
           "load_start": loadavg(), "cpus": os.cpu_count(), "src": src_hash(),
           "git": ver.pop("git"), "versions": ", ".join(f"{k} {v}" for k, v in ver.items())}
    sink = Sink(free_port(), work / "sink.log")
    pf = PostfixInstance(work / "postfix", free_port(), sink.port)
    pr = PostroomServe(work / "postroom", sink.port)
    ps = PostroomServe(work / "postroom-split", sink.port, split=True)
    rows: list[dict[str, Any]] = []
    message_sizes: dict[str, tuple[int, int]] = {}
    extra: dict[str, Any] = {"sizes": message_sizes}
    try:
        pf.start()
        pr.start(first=True)
        time.sleep(0.5)
        extra["rss_idle_kb"] = pr.rss_kb()  # nothing has connected to the HTTP port yet
        pr.wait_http()
        time.sleep(0.5)
        extra["rss_health_kb"] = pr.rss_kb()
        key = re.search(r"Bearer (\S+)", pr.cli("app", "add", "bench")).group(1)  # type: ignore[union-attr]
        api = f"http://{HOST}:{pr.http_port}"
        httpx.get(f"{api}/api/v1/messages", headers={"Authorization": f"Bearer {key}"},
                  timeout=30).raise_for_status()
        time.sleep(0.5)
        extra["rss_api_kb"] = pr.rss_kb()
        ps.start(first=True)
        ps.wait_http()
        split_key = re.search(r"Bearer (\S+)", ps.cli("app", "add", "bench")).group(1)  # type: ignore[union-attr]
        for size in a.sizes:
            message = payload(size)
            raw = mime(message)
            message_sizes[size] = (len(json.dumps(message)), len(raw))
            plan = [
                ("Postfix, SMTP (smtplib)", _smtp_worker(pf.port, raw), pf.cpu),
                ("postroom serve, SMTP (smtplib)", _smtp_worker(pr.smtp_port, raw), pr.cpu),
                ("postroom serve, HTTP POST /messages (http.client)",
                 _http_worker(pr.http_port, key, False, message), pr.cpu),
                ("postroom serve, HTTP + Idempotency-Key (http.client)",
                 _http_worker(pr.http_port, key, True, message), pr.cpu),
                ("postroom serve, HTTP via postroom.client (httpx)",
                 _client_lib_worker(api, key, message), pr.cpu),
                ("postroom serve + postroom worker, HTTP POST /messages (http.client)",
                 _http_worker(ps.http_port, split_key, False, message), ps.cpu),
            ]
            for label, make, cpu in plan:
                if a.rows and not any(w.lower() in label.lower() for w in a.rows):
                    continue
                print(f"{size}:")
                rows.append(measure(label, make, a.messages, a.warm, sink, cpu, a.quiet)
                            | {"size": size})
        deadline = time.monotonic() + 120
        while (st := pr.statuses()).get("sent", 0) < sum(st.values()) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        while (split := ps.statuses()).get("sent", 0) < sum(split.values()) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        extra["statuses"] = st
        extra["split_statuses"] = split
        extra["rss_end_kb"] = pr.rss_kb()
        extra["auth"] = auth_cost(pr, key)
    finally:
        ps.stop()
        pr.stop()
        pf.stop()
        sink.stop()
    env["load_end"] = loadavg()
    (work / "results.json").write_text(json.dumps({"env": env, "rows": rows, "extra": extra},
                                                  indent=1))
    text = report(env, rows, extra)
    print(text)
    if a.out != "-":
        write_block(text, Path(a.out))
    shutil.rmtree(work / "postfix", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
