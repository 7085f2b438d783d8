#!/usr/bin/env python3
"""One `postroom worker` delivering to a provider's HTTPS API vs to an SMTP sink, same run.

    sudo .venv/bin/python bench/https_bench.py                  # 3,000 msgs, 3 reps
    sudo .venv/bin/python bench/https_bench.py --messages 1000 --reps 1   # quick
    ... --profile            # + one unmeasured HTTPS run under py-spy (GIL time by function)
    ... --targets smtp,postmark,postmark@base --base-src DIR   # DIR/postroom: "before"

Issue 14's target: HTTPS >= 0.8x SMTP in msg/s, with <= 1.25x the worker's CPU per message.

Each run: a fresh SQLite store (WAL, synchronous = FULL) gets N pre-enqueued messages of one
size (2 KB or 50 KB, text/plain, one recipient; bench/worker_bench.py's messages and
enqueue, queue paused), then one `postroom worker` (default ``[delivery]``, as in
worker_bench: concurrency 100) is started, the queue resumed, and the worker delivers to

* **SMTP**: `smtp-sink -c` (Postfix's, C), one `transport = "smtp"` connection, ``security
  = "none"``, its default ``pool_size`` of reused sessions;
* **HTTPS**: a local stand-in for a provider's API (``api_base`` pointing at it,
  ``ca_file`` its private CA, the API key from an env variable), TLS 1.3, HTTP/1.1
  keep-alive, every request checked against the provider's documented shape (method,
  endpoint, auth header, JSON with the fields a send needs; one that is not is answered
  422 and fails the run) and answered with the provider's documented success, a new id
  each. Three providers, for the two kinds of API: **Postmark** (``POST /email``: the
  message mapped into JSON fields, so Postroom parses the MIME; answer ``{"To",
  "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}``), **SendGrid** (``POST
  /v3/mail/send``: the same mapping, into nested objects; answer 202, no body, the id in
  ``X-Message-Id``) and **SparkPost** (``POST /api/v1/transmissions``: the raw MIME inside
  JSON, no parsing; answer ``{"results": {"id", "total_accepted_recipients": 1,
  "total_rejected_recipients": 0}}``). The stand-in runs in a process of its own
  (`--sink`, a thread per connection, blocking TLS sockets: the handshake and record layer
  in OpenSSL) and its CPU is measured apart, so one can see that it is not the bottleneck.
  Deliveries go through Postroom's lean client (postroom/httpwire.py); ``--targets
  postmark-httpx,sparkpost-httpx`` sends the same through httpx, as when a proxy is set
  (``HTTPS_PROXY`` with ``NO_PROXY`` naming the sink: httpx connects directly).

The rate is N / (time every message is recorded as sent - the first arrival at the sink),
as in worker_bench.py: the worker's start and poll interval are not counted, recording the
results is. CPU per message is that of the worker process only (all threads, /proc), from
the resume to the end; the sink's and the whole box's (/proc/stat) beside it. Checked:
every message arrived once, every row is ``sent``, and (HTTPS) every attempt row keeps the
provider's id (``attempts.provider_id``). Runs alternate between the targets per size
and repetition; the report gives medians and each HTTPS target's ratios to SMTP.

The report block goes to docs/benchmarks.md between its BEGIN/END markers and is printed;
raw results in <workdir>/results.json. Needs root (smtp-sink -u nobody) and Postfix's
smtp-sink. Every process started here is stopped by PID in a finally block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests")]
import _report  # noqa: E402 - bench/_report.py: the docs/benchmarks.md block
import worker_bench  # noqa: E402 - its messages, enqueue, pause switch and meters
from postfix_instance import proc_cpu  # noqa: E402
from relay_bench import (  # noqa: E402
    HOST,
    Proc,
    Sink,
    free_port,
    postroom_cmd,
    src_hash,
    versions,
    wait_quiet,
)
from worker_bench import (  # noqa: E402
    Meter,
    enqueue_postroom,
    set_paused,
    summarize_profile,
    wait_log,
    wait_recorded,
    watch_sink,
)

NAME = "https_bench.py"
BEGIN, END = _report.markers(NAME)
SIZES = (2048, 51200)
TARGETS = ("smtp", "postmark", "sendgrid", "sparkpost")
WHAT = {"smtp": "SMTP (smtp-sink)", "postmark": "HTTPS, Postmark (MIME mapped to JSON)",
        "sendgrid": "HTTPS, SendGrid (MIME mapped to JSON objects)",
        "sparkpost": "HTTPS, SparkPost (raw MIME in JSON)",
        "postmark-httpx": "HTTPS, Postmark, through httpx",
        "sparkpost-httpx": "HTTPS, SparkPost, through httpx"}
# "<provider>-httpx": the same provider through httpx rather than postroom/httpwire.py, as
# deliveries go when a proxy is set: HTTPS_PROXY set (an unused port) and NO_PROXY naming the
# sink's address, so httpx connects directly.
HTTPX_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}
# "<target>@base": the same target with the worker importing Postroom from --base-src (e.g.
# `git archive HEAD src | tar -x -C DIR`, then DIR/src): before and after a change, in one run.
WHAT.update({f"{t}@base": f"{w}, before (--base-src)" for t, w in list(WHAT.items())})
BASE_SRC: str | None = None
TOKEN_ENV, TOKEN = "BENCH_POSTMARK_TOKEN", "bench-server-token"
TARGET_RATE, TARGET_CPU = 0.8, 1.25  # HTTPS / SMTP: msg/s at least, CPU per message at most
_COUNTERS = struct.Struct("<QQQ")  # requests answered, TLS connections accepted, refused


# --------------------------------------------------------------------------- the HTTPS sink
def sink_main(port: int, cert: str, key: str, counters: str) -> None:
    """The HTTPS stand-in (this script with ``--sink``): checks every request against the
    shape the provider its path is for documents, answers it with that provider's
    documented success (or a 422), and counts requests, connections and refusals in
    ``counters``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with open(counters, "r+b") as f:
        shared = mmap.mmap(f.fileno(), _COUNTERS.size)
    lock = threading.Lock()
    state = [0, 0, 0]

    def bump(i: int) -> int:
        with lock:
            state[i] += 1
            _COUNTERS.pack_into(shared, 0, *state)
            return state[0]

    def wrong(method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> str:
        """What in the request is not as the provider documents it ("" when it all is):
        method, endpoint, auth header, JSON content type and the fields a send needs."""
        sparkpost = path == b"/api/v1/transmissions"
        sendgrid = path == b"/v3/mail/send"
        if method != b"POST" or path not in (b"/api/v1/transmissions", b"/email",
                                             b"/v3/mail/send"):
            return f"{method!r} {path!r}: not a send endpoint"
        auth = b"authorization" if sparkpost or sendgrid else b"x-postmark-server-token"
        token = (b"Bearer " if sendgrid else b"") + TOKEN.encode()
        if headers.get(auth) != token:
            return f"no {auth.decode()}: {token.decode()}"
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            return "not application/json"
        try:
            data = json.loads(body)
        except ValueError as err:
            return f"not JSON: {err}"
        if sparkpost:  # Transmissions: recipients [{address: {email}}], content.email_rfc822
            ok = (isinstance(data.get("recipients"), list) and data["recipients"]
                  and all(isinstance(r.get("address", {}).get("email"), str)
                          for r in data["recipients"])
                  and isinstance(data.get("content", {}).get("email_rfc822"), str))
        elif sendgrid:  # Mail Send: personalizations[].to[].email, from.email, subject,
            # content[] of {type, value}
            people = data.get("personalizations")
            ok = (isinstance(people, list) and people
                  and all(isinstance(p.get("to"), list) and p["to"]
                          and all(isinstance(t.get("email"), str) for t in p["to"])
                          for p in people)
                  and isinstance(data.get("from", {}).get("email"), str)
                  and isinstance(data.get("subject"), str)
                  and isinstance(data.get("content"), list) and data["content"]
                  and all(isinstance(c.get("type"), str) and isinstance(c.get("value"), str)
                          for c in data["content"]))
        else:  # Email API: From, To, Subject, TextBody or HtmlBody, MessageStream
            ok = (all(isinstance(data.get(k), str) for k in ("From", "To", "Subject",
                                                              "MessageStream"))
                  and isinstance(data.get("TextBody", data.get("HtmlBody")), str))
        return "" if ok else "fields missing or of the wrong type"

    def answer(path: bytes, n: int) -> bytes:
        if path == b"/v3/mail/send":  # SendGrid "Mail Send": 202, no body, the id in a header
            return (b"HTTP/1.1 202 Accepted\r\nX-Message-Id: " + f"bench{n}".encode()
                    + b"\r\nContent-Length: 0\r\n\r\n")
        if path.startswith(b"/api/v1/transmissions"):  # SparkPost "Transmissions: create"
            data: dict[str, Any] = {"results": {"id": str(n), "total_accepted_recipients": 1,
                                                "total_rejected_recipients": 0}}
        else:  # Postmark "Email API": POST /email
            data = {"To": "rcpt@example.org", "SubmittedAt": "2026-01-01T00:00:00Z",
                    "MessageID": str(uuid.UUID(int=n)), "ErrorCode": 0, "Message": "OK"}
        body = json.dumps(data).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    def serve(raw: socket.socket) -> None:
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        bump(1)
        buf = bytearray()
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    data = conn.recv(262144)
                    if not data:
                        return
                    buf += data
                lines = bytes(buf[:end]).split(b"\r\n")
                method, _, rest = lines[0].partition(b" ")
                path = rest.partition(b" ")[0]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                need = end + 4 + int(headers.get(b"content-length", 0))
                while len(buf) < need:
                    data = conn.recv(262144)
                    if not data:
                        return
                    buf += data
                why = wrong(method, path, headers, bytes(buf[end + 4:need]))
                del buf[:need]
                if why:  # answered as the provider would: 422, and counted
                    bump(2)
                    print(f"refused: {why}", file=sys.stderr, flush=True)
                    body = json.dumps({"ErrorCode": 300, "Message": why}).encode()
                    conn.sendall(b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    continue
                # One write for head and body (one TLS record): no second segment for
                # Nagle's algorithm to hold back.
                conn.sendall(answer(path, bump(0)))
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    lsock = socket.create_server((HOST, port), backlog=256)
    while True:
        raw, _ = lsock.accept()
        threading.Thread(target=serve, args=(raw,), daemon=True).start()


class HttpsSink:
    """The sink process, seen from the harness: ``count()`` as Sink's (worker_bench's
    watch_sink polls it), ``connections()`` for how many TLS sessions the worker opened."""

    def __init__(self, work: Path) -> None:
        from diag_helpers import make_ca, make_cert

        ca = make_ca(work / "ca", "Postroom bench CA")
        cert, key = make_cert(ca, work / "ca", [HOST])
        self.ca_file = str(ca.path)
        self.port = free_port()
        self.url = f"https://{HOST}:{self.port}"
        path = work / "https-sink.counters"
        path.write_bytes(bytes(_COUNTERS.size))
        with path.open("r+b") as f:
            self._shared = mmap.mmap(f.fileno(), _COUNTERS.size)
        self.proc = Proc("https-sink", [sys.executable, __file__, "--sink", str(self.port),
                                        str(cert), str(key), str(path)],
                         work / "https-sink.log")
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1):
                return
            time.sleep(0.05)
        raise RuntimeError("the HTTPS sink did not start: " +
                           (work / "https-sink.log").read_text()[-2000:])

    def count(self) -> int:
        return int(_COUNTERS.unpack_from(self._shared, 0)[0])

    def connections(self) -> int:
        return int(_COUNTERS.unpack_from(self._shared, 0)[1])

    def refused(self) -> int:
        """Requests not as the provider documents them (answered 422, not counted above)."""
        return int(_COUNTERS.unpack_from(self._shared, 0)[2])

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------- one run
def config(root: Path, url: str, target: str, smtp: Sink, https: HttpsSink) -> Path:
    """The worker's config: the same but for its one connection."""
    if target.removesuffix("@base") == "smtp":
        conn = (f'transport = "smtp"\nhost = "{HOST}"\nport = {smtp.port}\n'
                'security = "none"\n')
    else:
        conn = (f'transport = "{target.removesuffix("@base").removesuffix("-httpx")}"\n'
                f'api_base = "{https.url}"\n'
                f'ca_file = "{https.ca_file}"\napi_key_env = "{TOKEN_ENV}"\n')
    cfg = root / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\ndatabase = "{url}"\n'
                   'hostname = "postroom.bench.test"\n\n[delivery]\nlease_seconds = 60\n\n'
                   f'[[connections]]\nname = "out"\n{conn}')
    return cfg


def provider_ids(url: str) -> int:
    """Distinct provider ids the attempt rows kept."""
    from sqlalchemy import func, select

    from postroom.store.db import make_engine
    from postroom.store.schema import attempts

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count(attempts.c.provider_id.distinct())))
                       .scalar_one())
    finally:
        engine.dispose()


def run_one(work: Path, label: str, target: str, size: int, n: int, smtp: Sink,
            https: HttpsSink, quiet: float, profile: Path | None = None) -> dict[str, Any]:
    root = work / label
    root.mkdir(parents=True)
    url = f"sqlite:///{root / 'queue.db'}"
    worker_bench.SIZE = size  # worker_bench.raw_message's size, read when it is called
    rec: dict[str, Any] = {"label": label, "target": target, "size": size, "msgs": n,
                           "enqueue_s": enqueue_postroom(url, n)}
    sink: Sink | HttpsSink = smtp if target.removesuffix("@base") == "smtp" else https
    env = {**os.environ, TOKEN_ENV: TOKEN,
           **(HTTPX_ENV if target.removesuffix("@base").endswith("-httpx") else {})}
    if target.endswith("@base"):
        if BASE_SRC is None:
            raise SystemExit(f"{target}: give --base-src")
        env["PYTHONPATH"] = BASE_SRC
    proc = Proc("worker", [*postroom_cmd(), "worker", "--config",
                           str(config(root, url, target, smtp, https))],
                root / "worker.log", env=env, cwd=root)
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_log(root / "worker.log", "delivering from", proc)
        if profile is not None:
            spy = worker_bench.spy_on(proc.pid, profile)
        rec["busy_before"] = wait_quiet(quiet)
        meter = Meter([proc.pid], None)
        base, conns0, sink_cpu0 = sink.count(), getattr(sink, "connections", int)(), \
            proc_cpu(sink.pid)
        refused0 = getattr(sink, "refused", int)()
        meter.start()
        set_paused(url, False)
        first, last, got = watch_sink(sink, base, n, timeout=max(120, n / 20),
                                      alive=proc.alive)
        done = wait_recorded(url, n) if last is not None else None
        rec.update(meter.stop())
        rec["sink_cpu"] = proc_cpu(sink.pid) - sink_cpu0
        rec["connections"] = getattr(sink, "connections", int)() - conns0
        rec["refused"] = getattr(sink, "refused", int)() - refused0
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        time.sleep(0.3)
        rec["delivered"] = got
        rec["statuses"] = worker_bench.postroom_counts(url)
        rec["provider_ids"] = (provider_ids(url) if target.removesuffix("@base") != "smtp"
                               else None)
        rec["span"] = (done - first) if first is not None and done is not None else None
        rec["ok"] = (last is not None and got == n and sink.count() - base == n
                     and rec["statuses"] == {"sent": n}
                     and rec["provider_ids"] in (None, n) and rec["refused"] == 0)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(10)
        proc.stop()
    shutil.rmtree(root / "data", ignore_errors=True)
    with contextlib.suppress(OSError):
        for f in root.glob("queue.db*"):
            f.unlink()
    return rec


# --------------------------------------------------------------------------- report
def rate(r: dict[str, Any]) -> float:
    return r["msgs"] / r["span"] if r.get("span") else float("nan")


def per_msg(r: dict[str, Any], key: str) -> float:
    return r[key] / r["msgs"] * 1e6


def med(recs: list[dict[str, Any]], fn: Any) -> tuple[float, float, float]:
    values = [fn(r) for r in recs]
    return statistics.median(values), min(values), max(values)


def row(size: int, t: str, rs: list[dict[str, Any]]) -> str:
    m = med(rs, rate)
    c = med(rs, lambda r: per_msg(r, "cpu"))
    sink = med(rs, lambda r: per_msg(r, "sink_cpu"))[0]
    box = med(rs, lambda r: per_msg(r, "box_cpu"))[0]
    conns = ("–" if t.removesuffix("@base") == "smtp"
             else f"{statistics.median(r['connections'] for r in rs):.0f}")
    ok = "ok" if all(r["ok"] for r in rs) else "FAILED: " + "; ".join(
        f"{r['delivered']} arrived, {r['statuses']}, ids {r['provider_ids']}, "
        f"{r.get('refused', 0)} refused by the sink"
        for r in rs if not r["ok"])
    return (f"| {size // 1024} KB | {WHAT.get(t, t)} | {m[0]:,.0f} [{m[1]:,.0f}–{m[2]:,.0f}] "
            f"| {c[0]:,.0f} [{c[1]:,.0f}–{c[2]:,.0f}] | {sink:,.0f} | {box:,.0f} | {conns} "
            f"| {ok} |")


def report(env: dict[str, Any], recs: list[dict[str, Any]],
           prof: dict[str, Any] | None) -> str:
    L = [BEGIN, "## One worker: HTTPS provider APIs vs SMTP (bench/https_bench.py)", "",
         f"{env['date']}, source {env['src']} ({env['versions'].get('git', '?')}), "
         f"{env['n']:,} messages per run, medians of {env['reps']} runs [range]; load average "
         f"at the start {env['load']} on 2 cores shared with other sessions' work: the "
         "ratios, measured in the same run with the targets' runs alternating, are what "
         "counts.", "",
         "| size | target | msg/s | worker CPU µs/msg | sink CPU µs/msg | box CPU µs/msg | "
         "sink connections | check |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for size in SIZES:
        by = {t: [r for r in recs if r["size"] == size and r["target"] == t]
              for t in WHAT}
        L += [row(size, t, rs) for t, rs in by.items() if rs]
        if not by["smtp"]:
            continue
        smtp_rate = med(by["smtp"], rate)[0]
        smtp_cpu = med(by["smtp"], lambda r: per_msg(r, "cpu"))[0]
        for t in list(WHAT)[1:]:
            if not by[t]:
                continue
            rr = med(by[t], rate)[0] / smtp_rate
            cr = med(by[t], lambda r: per_msg(r, "cpu"))[0] / smtp_cpu
            verdicts.append(
                f"{size // 1024} KB {t}: msg/s {rr:.2f}× (**"
                f"{'met' if rr >= TARGET_RATE else 'missed'}**), worker CPU per message "
                f"{cr:.2f}× (**{'met' if cr <= TARGET_CPU else 'missed'}**)")
    L += ["", f"HTTPS / SMTP (target ≥ {TARGET_RATE}× msg/s, ≤ {TARGET_CPU}× CPU per "
          "message): " + "; ".join(verdicts) + "."]
    if prof is not None and "error" not in prof:
        L += ["", f"Where the worker's time goes with {WHAT.get(prof['target'])} (py-spy "
              f"`--gil`, an extra {prof.get('size', 2048) // 1024} KB run of {prof['msgs']:,} "
              "messages, not measured above): "
              f"{prof['gil_us_per_msg']:,.0f} µs of GIL time per message.", "",
              "| GIL µs/msg incl. | function |", "|---|---|"]
        L += [f"| {v:,.0f} | `{f}` |" for f, v in prof["inclusive"][:16]]
    d = worker_bench.DeliverySettings()
    L += ["", f"Settings: `postroom worker`, default `[delivery]` (concurrency {d.concurrency},"
          f" claim_batch {d.claim_batch}), SQLite WAL, synchronous = FULL; each connection's "
          "default `pool_size` (SMTP: sessions; HTTPS: kept-alive connections). The HTTPS "
          "sink is Python (a thread per connection, TLS in OpenSSL), smtp-sink is C: their "
          "CPU is not the worker's and is shown apart. Postroom "
          f"{env['versions'].get('postroom', '?')}, Python {env['versions'].get('python')}, "
          f"SQLite {env['versions'].get('sqlite')}.", "", END]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sink", nargs=4, metavar=("PORT", "CERT", "KEY", "COUNTERS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=3000, help="per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--targets", default=",".join(TARGETS), help="smtp and the HTTPS providers")
    ap.add_argument("--quiet-wait", dest="quiet", type=float, default=5.0,
                    help="wait up to S seconds for the box to be <20%% busy before each run")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-target", metavar="TARGET",
                    help="the target --profile runs (default: the first HTTPS one)")
    ap.add_argument("--base-src", metavar="DIR",
                    help="Postroom's src/ of a version to compare: targets '<target>@base'")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown file for the report block ('-' = print only)")
    ap.add_argument("--from-json", metavar="RESULTS", help="only render a saved results.json")
    args = ap.parse_args()
    if args.sink:
        sink_main(int(args.sink[0]), *args.sink[1:])
        return 0
    global BASE_SRC
    BASE_SRC = args.base_src
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        text = report(data["env"], data["runs"], data.get("profile"))
    else:
        text = measure(args)
    print(text)
    if args.out != "-":
        _report.write_block(NAME, text, Path(args.out))
    return 0


def measure(args: argparse.Namespace) -> str:
    n = args.messages
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="https-bench-"))
    os.chmod(work, 0o755)
    print(f"work dir {work}; load average {os.getloadavg()}", flush=True)
    env = {"n": n, "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M"),
           "src": src_hash(), "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
           "versions": versions()}
    smtp = Sink(free_port(), work / "smtp-sink.log")
    https: HttpsSink | None = None
    recs: list[dict[str, Any]] = []
    prof = None
    try:
        https = HttpsSink(work)
        for rep in range(args.reps):
            for size in sizes:
                # Rotate which goes first, so none always meets the box's same phase.
                shift = rep % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    r = run_one(work, f"{target}-{size}-{rep}", target, size, n, smtp, https,
                                args.quiet)
                    recs.append(r)
                    print(f"   {r['label']}: {rate(r):,.0f} msg/s, worker "
                          f"{per_msg(r, 'cpu'):,.0f} µs/msg, sink "
                          f"{per_msg(r, 'sink_cpu'):,.0f}, box {per_msg(r, 'box_cpu'):,.0f},"
                          f" conns {r['connections']}, ok={r['ok']} (load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
        if args.profile:
            raw = work / "profile-https.txt"
            target = args.profile_target or next((t for t in targets if t != "smtp"),
                                                 "postmark")
            r = run_one(work, "profile", target, sizes[0], n, smtp, https, args.quiet,
                        profile=raw)
            prof = {"msgs": n, "size": sizes[0], "target": target,
                    **summarize_profile(raw, n)}
            prof["rate_under_spy"] = rate(r)
    finally:
        smtp.stop()
        if https is not None:
            https.stop()
    (work / "results.json").write_text(json.dumps(
        {"env": env, "runs": recs, "profile": prof}, indent=1, default=str))
    print(f"results: {work / 'results.json'}", flush=True)
    return report(env, recs, prof)


if __name__ == "__main__":
    sys.exit(main())
