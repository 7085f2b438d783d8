#!/usr/bin/env python3
"""CPU cost of each step of Postroom's per-message path, measured in-process.

    .venv/bin/python bench/listener_costs.py [--n 2000]

Complements relay_bench.py: that one says how fast the whole relay is, this one says where
a message's CPU goes, with the code as it is now, one step at a time, on one thread (so no
GIL contention, no scheduler noise). The message is what smtp-source sends (4 header lines,
80-character body lines). Steps:

  listener  aiosmtpd's per-connection set-up (PostroomSMTP(...)), address parsing for
            MAIL and RCPT (SMTP._getaddr), the DATA checks (bare_newline, summarize)
  data      one transaction's DATA over loopback, 2 KB and 50 KB, read in blocks
            (ingress.smtpdata, what `serve` does) and line by line (aiosmtpd's own reader);
            client and server in this one thread, so the CPU is both sides
  store     the enqueue transaction (message_row + INSERT + COMMIT with synchronous=FULL),
            one message per transaction and 10 per transaction (group commit)
  worker    claim (10 at a time), the finish transaction (UPDATE + INSERT attempt)
  deliver   the SMTP transport's send to an smtp-sink over a reused session (needs
            smtp-sink; skipped if it is not installed)

Each figure is the median of 5 rounds of ``--n`` iterations; `CPU µs` is this thread's CPU
time (time.thread_time), `wall µs` includes waiting (fsync). Nothing here listens on a
network port except the temporary smtp-sink on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def message(size: int) -> bytes:
    head = (b"From: <a@example.com>\r\nTo: <b@example.org>\r\n"
            b"Date: Sat, 21 Nov 2026 05:31:31 +0000 (UTC)\r\n"
            b"Message-Id: <2f2b.0003.005a@client.test>\r\n\r\n")
    body, i = b"", 0
    while len(body) < size:
        i += 1
        body += (str(i).encode() + b"X" * 80)[:80] + b"\r\n"
    return head + body


def timeit(fn: Callable[[], Any], n: int, rounds: int = 5) -> tuple[float, float]:
    """Median (CPU µs, wall µs) per call over ``rounds`` rounds of ``n`` calls."""
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            fn()
        cpu.append((time.thread_time() - c0) / n * 1e6)
        wall.append((time.perf_counter() - w0) / n * 1e6)
    return statistics.median(cpu), statistics.median(wall)


async def data_phase(settings: Any, raw: bytes, blocks: bool, n: int) -> float:
    """CPU µs (this thread: client and server) per transaction of ``raw`` over one kept
    connection to a PostroomSMTP whose handler takes the data and stores nothing."""
    from aiosmtpd.smtp import SMTP

    from postroom.ingress import smtpd
    from postroom.ingress.accept import Intake

    class Taker(smtpd.Handler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok"

    cls: Any = smtpd.PostroomSMTP
    if not blocks:
        cls = type("LineByLine", (smtpd.PostroomSMTP,), {"smtp_DATA": SMTP.smtp_DATA})
    handler = Taker(None, None, smtpd.Policy(settings.server),  # type: ignore[arg-type]
                    Intake(settings.server, ()))
    template = cls(handler, implicit_tls=False, data_size_limit=10 * len(raw),
                   decode_data=False, hostname="bench.test", authenticator=handler.authenticator)
    server = await asyncio.get_running_loop().create_server(
        lambda: cls.like(template), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.sockets[0].getsockname()[1])
    await reader.readline()
    writer.write(b"EHLO c.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    stuffed = raw.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    envelope = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"

    async def one() -> None:
        writer.write(envelope)
        for _ in range(3):
            await reader.readline()
        writer.write(stuffed)
        await reader.readline()

    for _ in range(20):
        await one()
    c0 = time.thread_time()
    for _ in range(n):
        await one()
    cpu = (time.thread_time() - c0) / n * 1e6
    writer.close()
    server.close()
    return cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="iterations per round")
    a = ap.parse_args()
    n = a.n

    from postroom import settings as settings_mod
    from postroom.envelope import Envelope, summarize
    from postroom.ingress import smtpd
    from postroom.ingress.accept import Intake, bare_newline
    from postroom.runtime import Instance

    work = Path(tempfile.mkdtemp(prefix="postroom-costs-"))
    sink = None
    rows: list[tuple[str, str, float, float]] = []

    def add(group: str, what: str, fn: Callable[[], Any], iters: int = n) -> None:
        try:
            c, w = timeit(fn, iters)
        except Exception as err:  # the code moved under us: say so, keep going
            print(f"  {what}: n/a ({err!r})", file=sys.stderr)
            return
        rows.append((group, what, c, w))
        print(f"  {group:<8} {what:<62} CPU {c:8.1f} µs  wall {w:8.1f} µs", flush=True)

    try:
        sink_port = free_port()
        smtp_sink = shutil.which("smtp-sink")
        if smtp_sink:
            cmd = [smtp_sink, *(["-u", "nobody"] if os.geteuid() == 0 else []),
                   f"127.0.0.1:{sink_port}", "256"]
            sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        cfg = work / "postroom.toml"
        cfg.write_text(f"""[server]
data_dir = "data"
smtp_listen = "127.0.0.1:{free_port()}"
hostname = "postroom.bench.test"
[delivery]
concurrency = 10
[[connections]]
name = "upstream"
transport = "smtp"
host = "127.0.0.1"
port = {sink_port}
security = "none"
""")
        settings = settings_mod.load(cfg)
        inst = Instance(settings)
        queue = inst.queue
        msg2k, msg50k = message(2048), message(51200)

        # -- listener (on an event loop, as in `postroom serve`) -------------------------
        async def listener_steps() -> None:
            handler = smtpd.Handler(queue, inst.apps, smtpd.Policy(settings.server),
                                    Intake.of(settings, inst.apps))
            tls = None

            def make() -> Any:
                return smtpd.PostroomSMTP(
                    handler, implicit_tls=False, data_size_limit=settings.server.max_message_size,
                    enable_SMTPUTF8=True, decode_data=False, hostname=settings.server.hostname,
                    ident="Postroom ESMTP", tls_context=tls, authenticator=handler.authenticator,
                    auth_require_tls=True, command_call_limit=None)

            proto = make()
            if hasattr(smtpd.PostroomSMTP, "like"):  # what `serve` does per connection now
                add("listener", "per connection: PostroomSMTP.like(template)",
                    lambda: smtpd.PostroomSMTP.like(proto), max(200, n // 5))
            add("listener", "aiosmtpd: PostroomSMTP(...) constructor", make, max(200, n // 5))
            add("listener", "SMTP._getaddr('<a@example.com>') (MAIL, RCPT: x2)",
                lambda: proto._getaddr("<a@example.com>"))

        asyncio.run(listener_steps())
        add("listener", "bare_newline(2 KB)", lambda: bare_newline(msg2k))
        add("listener", "summarize(2 KB) (headers -> Message-ID, Subject, From, To)",
            lambda: summarize(msg2k))
        add("listener", "bare_newline(50 KB)", lambda: bare_newline(msg50k))
        for size, raw in (("2 KB", msg2k), ("50 KB", msg50k)):
            for label, blocks in (("in blocks", True), ("line by line (aiosmtpd)", False)):
                c = asyncio.run(data_phase(settings, raw, blocks, max(100, n // 4)))
                rows.append(("data", f"DATA {size}, {label}", c, c))
                print(f"  {'data':<8} {'DATA ' + size + ', ' + label:<62} CPU {c:8.1f} µs",
                      flush=True)

        # -- store ------------------------------------------------------------------------
        def env(raw: bytes = msg2k) -> Envelope:
            return Envelope("a@example.com", ["b@example.org"], raw, source="smtp:trusted")

        # The queue's internals change as Postroom is optimised: adapt to the version here.
        from postroom.queue import commit as qcommit

        per_env = next(iter(inspect.signature(queue._enqueue_op).parameters)) == "env"
        run_ops = getattr(qcommit, "run_writes", None)

        q: Any = queue  # either API version

        def ops_for(envs: list[Any]) -> list[Any]:
            return [q._enqueue_op(e) for e in envs] if per_env else [q._enqueue_op(envs)]

        def execute(conn: Any, ops: list[Any]) -> Any:
            return run_ops(conn, ops) if run_ops else [op(conn) for op in ops]

        def enqueue(k: int, raw: bytes = msg2k) -> Callable[[], Any]:
            def go() -> Any:
                ops = ops_for([env(raw) for _ in range(k)])
                with inst.engine.begin() as conn:
                    return execute(conn, ops)
            return go

        def build_only() -> Any:
            return ops_for([env()])

        add("store", "message_row + statement build (no database)", build_only)
        add("store", "enqueue 1 msg/transaction, 2 KB (INSERT + COMMIT, FULL)", enqueue(1),
            max(200, n // 4))
        c10 = timeit(enqueue(10), max(50, n // 20))
        rows.append(("store", "enqueue 10 msgs/transaction, 2 KB, per message", c10[0] / 10,
                     c10[1] / 10))
        print(f"  {'store':<8} {'enqueue 10 msgs/transaction, 2 KB, per message':<62} CPU "
              f"{c10[0] / 10:8.1f} µs  wall {c10[1] / 10:8.1f} µs", flush=True)
        add("store", "enqueue 1 msg/transaction, 50 KB", enqueue(1, msg50k), max(100, n // 10))

        # -- worker: claim + finish --------------------------------------------------------
        from postroom.queue.worker import decide
        from postroom.transports.base import RecipientResult

        owner = "costs:1"
        spent = {"claim": [0.0, 0.0], "finish": [0.0, 0.0], "finish10": [0.0, 0.0]}
        count = {"claim": 0, "msgs": 0}

        def attempt_row(d: Any) -> dict[str, Any]:
            return {"connection": "upstream", "started_at": time.time(),
                    "ended_at": time.time(), "outcome": d.outcome, "reply_code": 250,
                    "reply_text": "2.0.0 Ok: queued", "error_code": None, "permanent": False,
                    "recipients": {"b@example.org": {"code": 250, "reply": "ok",
                                                     "state": "sent"}},
                    "transcript": "S: 220 sink ESMTP\nC: MAIL FROM:<a@example.com>\n" * 4}

        def claim_finish(batched: bool) -> Any:
            c0, w0 = time.thread_time(), time.perf_counter()
            with inst.engine.begin() as conn:
                claimed = queue._claim_op(owner, 10, 600)(conn)
            c1, w1 = time.thread_time(), time.perf_counter()
            spent["claim"][0] += c1 - c0
            spent["claim"][1] += w1 - w0
            count["claim"] += 1
            ops = []
            for m in claimed:
                d = decide(m, {r: RecipientResult(250, "2.0.0 Ok") for r in m.pending},
                           time.time(), settings.delivery)
                ops.append(queue._finish_op(m, status=d.status,
                                            next_attempt_at=d.next_attempt_at,
                                            last_error=None, attempts=[attempt_row(d)]))
            if batched:  # as the group committer does when finishes arrive together
                with inst.engine.begin() as conn:
                    execute(conn, ops)
            else:
                for op in ops:
                    with inst.engine.begin() as conn:
                        execute(conn, [op])
            key = "finish10" if batched else "finish"
            spent[key][0] += time.thread_time() - c1
            spent[key][1] += time.perf_counter() - w1
            count["msgs"] += len(claimed)
            return len(claimed)

        def reset() -> None:
            for key in spent:
                spent[key] = [0.0, 0.0]
            count.update(claim=0, msgs=0)

        def queued_now() -> int:
            return int(queue.log.counts().get("queued", 0))

        # the claim's cost depends on how many messages wait: first a short queue (what the
        # enqueue steps above left behind is marked delivered)...
        from sqlalchemy import text

        with inst.engine.begin() as conn:
            conn.execute(text("UPDATE messages SET status = 'sent' WHERE status = 'queued'"))
        while queued_now() < 200:
            enqueue(10)()
        reset()
        small = queued_now()
        for _ in range(10):
            claim_finish(False)
        m_ = max(1, count["msgs"])
        rows.append(("worker", f"claim 10 (per message; {small - m_}-{small} rows queued)",
                     spent["claim"][0] / m_ * 1e6, spent["claim"][1] / m_ * 1e6))
        print(f"  {'worker':<8} {rows[-1][1]:<62} CPU {rows[-1][2]:8.1f} µs  wall "
              f"{rows[-1][3]:8.1f} µs", flush=True)
        # ...then a backlog, as when acceptance runs ahead of delivery
        k = max(20, n // 20)
        for _ in range(k * 10 + 10):
            enqueue(10)()
        queued = queued_now()
        for batched in (False, True):
            reset()
            for _ in range(k * 5):
                claim_finish(batched)
            m_ = max(1, count["msgs"])
            if not batched:
                rows.append(("worker", f"claim 10 (per message; ~{queued:,} rows queued)",
                             spent["claim"][0] / m_ * 1e6, spent["claim"][1] / m_ * 1e6))
                rows.append(("worker", "finish, 1 per transaction (UPDATE + INSERT attempt)",
                             spent["finish"][0] / m_ * 1e6, spent["finish"][1] / m_ * 1e6))
            else:
                rows.append(("worker", "finish, 10 per transaction, per message",
                             spent["finish10"][0] / m_ * 1e6, spent["finish10"][1] / m_ * 1e6))
            for g, w, c, wall in rows[-(1 if batched else 2):]:
                print(f"  {g:<8} {w:<62} CPU {c:8.1f} µs  wall {wall:8.1f} µs", flush=True)

        # -- deliver -----------------------------------------------------------------------
        if sink is not None:
            transports = inst.transports()
            t = next(iter(transports.values()))
            e = env()
            loop = asyncio.new_event_loop()  # the transport runs on an event loop
            try:
                add("deliver", "SMTP transport send (event loop, pipelined, reused session, "
                    "2 KB; includes one loop turn per call)",
                    lambda: loop.run_until_complete(t.send(e)), max(200, n // 4))
                loop.run_until_complete(t.aclose())
            finally:
                loop.close()
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| step | what | CPU µs | wall µs |")
    print("|---|---|---|---|")
    for g, w, c, wall in rows:
        print(f"| {g} | {w} | {c:,.0f} | {wall:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
