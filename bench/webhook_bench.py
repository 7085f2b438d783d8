"""Webhook ingestion: delivery events per second into `postroom serve` on SQLite.

    .venv/bin/python bench/webhook_bench.py                # 20,000 events per row
    .venv/bin/python bench/webhook_bench.py --events 4000  # quick
    ... --provider mailgun --batch 1 / --provider sendgrid    # a real provider's payloads
    ... --out -                                                       # print, do not write
    ... --src /tmp/before/src      # the server from another src folder (same-run before/after)
    ... --spy /tmp/hooks.txt       # py-spy (GIL holder, raw stacks) on the server, first row

Issue 14's target: at least 2,000 events/s on SQLite. One `postroom serve` process (its own,
SQLite in a fresh data folder, no worker) with one connection of the test provider
``hooktest`` (tests/webhook_fake.py: an HMAC-SHA256 signature with a timestamp, a JSON list
of events, the shape of Svix / SendGrid / Mailgun payloads). Before the run the database
gets 5,000 sent messages, each with an attempt carrying a provider id; every event names
one of them, so each is attached, and one event in ten is a hard bounce (a suppression
list entry). Clients: 16 kept-alive HTTP connections from this process (a small asyncio
client writing each request prepared in advance and reading the answer by its
Content-Length: it costs a fraction of the server's CPU per request, where 16 threads of
http.client cost more than the server and, on this 2-core box, took the core the server
needed), posting signed batches until all events were answered 200.

``--provider mailgun`` / ``sendgrid`` post a real provider's documented payloads and
signatures instead (connection ``transport = "mailgun"`` / ``"sendgrid"``): Mailgun one
event per request, HMAC-SHA256 of timestamp + token inside the JSON body; SendGrid a JSON
array, ECDSA P-256 over timestamp + body (a key pair made here, the public half as the
connection's webhook key). Bodies are built and signed before the clock starts.

Rows: events per request 1, 10 and 100. Measured per row: events/s (events / wall time
until the last answer), requests/s, the server's CPU per event (/proc, all threads), and
checked: every event recorded once and attached (delivery_events rows), then the same
batches sent again are all duplicates.

``--src DIR`` runs the server from DIR (the ``src`` folder of an older copy) instead of
this checkout's, so that before and after a change are measured on the same box in the same
hour; the database is prepared by this checkout (same schema). ``--spy FILE`` records the
server's GIL holder with py-spy during the first row's posts (bench/worker_bench.spy_on).

Every process started here is tracked by PID and stopped in a finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The server child runs from --src when given (passed down in this variable).
SRC_ENV = "WEBHOOK_BENCH_SRC"
sys.path[:0] = [os.environ.get(SRC_ENV) or str(REPO / "src"), str(REPO / "tests"), str(HERE)]

from _report import write_block  # noqa: E402
from postfix_instance import proc_cpu  # noqa: E402
from serve_proc import free_port, wait_port  # noqa: E402
from webhook_fake import KEY, KIND, REGISTRY_ENTRY, signed  # noqa: E402

MESSAGES = 5000
THREADS = 16  # providers post in parallel (Mailgun: one event per request)
NAME = "webhook_bench"


def serve(config: str) -> None:
    """The child: `postroom serve` with the test provider registered."""
    import asyncio

    from postroom import server, settings, transports

    transports.REGISTRY[KIND] = REGISTRY_ENTRY
    asyncio.run(server.serve(settings.load(config)))


def prepare(root: Path, http_port: int, provider: str) -> Path:
    from sqlalchemy import insert

    from postroom.store.db import make_engine, migrate
    from postroom.store.schema import attempts, messages

    data = root / "data"
    data.mkdir(mode=0o700)
    conn = PROVIDERS[provider].connection
    cfg = root / "postroom.toml"
    cfg.write_text(f"""
[server]
data_dir = "{data}"
smtp_listen = "127.0.0.1:{free_port()}"
http_listen = "127.0.0.1:{http_port}"
worker = false

[[connections]]
name = "hooks"
{conn}
webhook_key_env = "BENCH_WEBHOOK_KEY"
""")
    engine = make_engine(f"sqlite:///{data / 'postroom.db'}")
    migrate(engine)
    now = time.time()
    rows = [{"id": f"{i:032x}", "created_at": now, "updated_at": now, "status": "sent",
             "next_attempt_at": now, "expires_at": now + 86400, "attempt_count": 1,
             "sender": "shop@shop.example", "recipients": [f"r{i}@example.net"],
             "rcpt_status": {}, "source": "bench", "message_id": f"<m{i}@shop.example>",
             "subject": "s", "from_header": "shop@shop.example",
             "to_header": f"r{i}@example.net", "size": 100, "raw": b"x", "via": "hooks"}
            for i in range(MESSAGES)]
    tries = [{"message_id": r["id"], "connection": "hooks", "started_at": now,
              "ended_at": now, "outcome": "sent", "permanent": False, "recipients": {},
              "transcript": "", "provider_id": f"pm-{i}"} for i, r in enumerate(rows)]
    with engine.begin() as conn:
        conn.execute(insert(messages), rows)
        conn.execute(insert(attempts), tries)
    engine.dispose()
    return cfg


Request = tuple[bytes, dict[str, str]]  # a signed body and its headers


@dataclass(frozen=True)
class Provider:
    """How the bench posts as one provider: its connection's TOML lines, the webhook key
    the server gets, one event of the provider's shape (``n``: its number, ``i``: the
    message, ``bounce``: a hard bounce, else a delivery), and a signed request of events."""

    connection: str
    key: str
    event: Callable[[str, int, int, bool], dict[str, Any]]
    request: Callable[[list[dict[str, Any]]], Request]
    batches: bool = True  # False: one event per request (Mailgun)


def _hooktest_event(run: str, n: int, i: int, bounce: bool) -> dict[str, Any]:
    return {"id": f"{run}-{n}", "type": "bounce" if bounce else "delivered",
            "message": f"pm-{i}", "recipient": f"r{i}@example.net", "time": time.time(),
            "hard": True if bounce else None,
            "reason": "550 5.1.1 unknown user" if bounce else "250 ok"}


def _hooktest_request(events: list[dict[str, Any]]) -> Request:
    body = json.dumps(events).encode()
    return body, signed(body)


MAILGUN_KEY = "key-mailgun-bench-0123456789"


def _mailgun_event(run: str, n: int, i: int, bounce: bool) -> dict[str, Any]:
    # Mailgun "Events": a permanent failure or a delivery; the message named by the
    # Message-ID Mailgun gave it (its API's "id"), which is the attempt's provider id.
    e: dict[str, Any] = {"id": f"{run}-{n}", "event": "failed" if bounce else "delivered",
                         "timestamp": time.time(), "recipient": f"r{i}@example.net",
                         "message": {"headers": {"message-id": f"pm-{i}"}},
                         "delivery-status": {"code": 550 if bounce else 250,
                                             "message": "unknown user" if bounce else "OK"}}
    if bounce:
        e.update(severity="permanent", reason="bounce")
    return e


def _mailgun_request(events: list[dict[str, Any]]) -> Request:
    (event,) = events  # Mailgun posts one event per request
    stamp, token = str(int(time.time())), os.urandom(25).hex()
    sig = hmac.new(MAILGUN_KEY.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    body = json.dumps({"signature": {"timestamp": stamp, "token": token, "signature": sig},
                       "event-data": event}).encode()
    return body, {"Content-Type": "application/json"}


def _sendgrid_keys() -> tuple[Any, str]:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


SENDGRID_PRIVATE, SENDGRID_PUBLIC = _sendgrid_keys()


def _sendgrid_event(run: str, n: int, i: int, bounce: bool) -> dict[str, Any]:
    # SendGrid "Event Webhook reference": sg_message_id is the X-Message-Id of the send
    # answer plus a suffix after a dot.
    e: dict[str, Any] = {"email": f"r{i}@example.net", "timestamp": int(time.time()),
                         "event": "bounce" if bounce else "delivered",
                         "sg_event_id": f"{run}-{n}", "sg_message_id": f"pm-{i}.filter0001"}
    if bounce:
        e.update(type="bounce", reason="550 5.1.1 unknown user", status="5.1.1")
    else:
        e["response"] = "250 OK"
    return e


def _sendgrid_request(events: list[dict[str, Any]]) -> Request:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    body, stamp = json.dumps(events).encode(), str(int(time.time()))
    sig = SENDGRID_PRIVATE.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {"Content-Type": "application/json",
                  "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
                  "X-Twilio-Email-Event-Webhook-Timestamp": stamp}


PROVIDERS = {
    "hooktest": Provider(f'transport = "{KIND}"', KEY, _hooktest_event, _hooktest_request),
    "mailgun": Provider('transport = "mailgun"\ndomain = "mg.shop.example"', MAILGUN_KEY,
                        _mailgun_event, _mailgun_request, batches=False),
    "sendgrid": Provider('transport = "sendgrid"', SENDGRID_PUBLIC, _sendgrid_event,
                         _sendgrid_request),
}


def batches(total: int, size: int, run: str, provider: str) -> list[Request]:
    """Every request of a row, built and signed now (before the clock starts)."""
    p = PROVIDERS[provider]
    out = []
    for start in range(0, total, size):
        out.append(p.request([p.event(run, n, n % MESSAGES, n % 10 == 0)
                              for n in range(start, min(total, start + size))]))
    return out


def _wire(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    """One request as it goes on the wire (built before the clock starts)."""
    head = ["POST /webhooks/hooks HTTP/1.1", f"Host: 127.0.0.1:{port}",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Client(asyncio.Protocol):
    """One kept-alive connection posting requests one at a time (as a provider does),
    reading each answer by its Content-Length: a client in a few lines of asyncio, so that
    the bench's own CPU per request stays far below the server's on this shared box."""

    def __init__(self, todo: Iterator[bytes], answers: list[dict[str, Any]],
                 errors: list[str], done: asyncio.Future[None]) -> None:
        self.todo, self.answers, self.errors, self.done = todo, answers, errors, done
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.next()

    def next(self) -> None:
        assert self.transport is not None
        request = next(self.todo, None)
        if request is None:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
        if not head.startswith("HTTP/1.1 200"):
            self.errors.append(f"{head.splitlines()[0]} {body[:200]!r}")
            self.todo = iter(())
        else:
            self.answers.append(json.loads(body))
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def post_all(port: int, bodies: list[Request],
             threads: int) -> tuple[float, list[dict[str, Any]]]:
    """Post every body over ``threads`` kept-alive connections; wall time and the answers."""
    wire = [_wire(port, body, headers) for body, headers in bodies]
    answers: list[dict[str, Any]] = []
    errors: list[str] = []

    async def run() -> float:
        loop = asyncio.get_running_loop()
        todo = iter(wire)  # shared: each connection takes the next request when free
        dones = [loop.create_future() for _ in range(threads)]
        t0 = time.perf_counter()
        for done in dones:
            await loop.create_connection(
                lambda d=done: _Client(todo, answers, errors, d), "127.0.0.1", port)
        await asyncio.wait_for(asyncio.gather(*dones), 600)
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    if errors or len(answers) != len(wire):
        raise RuntimeError(f"requests refused or unanswered ({len(answers)} of {len(wire)} "
                           f"answered): {errors[:3]}")
    return wall, answers


def run_row(port: int, pid: int, total: int, size: int, threads: int,
            provider: str, spy: Path | None = None) -> dict[str, Any]:
    bodies = batches(total, size, f"b{size}", provider)
    recorder = None
    if spy is not None:
        from worker_bench import spy_on

        recorder = spy_on(pid, spy)
    cpu0, own0 = proc_cpu(pid), time.process_time()
    wall, answers = post_all(port, bodies, threads)
    cpu, own = proc_cpu(pid) - cpu0, time.process_time() - own0
    if recorder is not None:
        recorder.send_signal(2)
        recorder.wait(60)
    accepted = sum(a["accepted"] for a in answers)
    attached = sum(a["attached"] for a in answers)
    _, again = post_all(port, bodies, threads)  # replayed: every event a duplicate
    return {"batch": size, "events": total, "requests": len(bodies), "wall_s": wall,
            "events_per_s": total / wall, "requests_per_s": len(bodies) / wall,
            "server_cpu_ms_per_event": 1000 * cpu / total,
            "client_cpu_ms_per_request": 1000 * own / len(bodies), "accepted": accepted,
            "attached": attached, "replay_duplicates": sum(a["duplicates"] for a in again)}


SIGNED = {"hooktest": "HMAC-signed batches of the test provider",
          "mailgun": "Mailgun's payloads, one event per request, HMAC-signed in the body",
          "sendgrid": "SendGrid's event arrays, ECDSA-signed"}


def report(rows: list[dict[str, Any]], threads: int,
           load: tuple[float, float, float], provider: str = "hooktest") -> str:
    name = block_name(provider)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    lines = [begin, "## Webhook ingestion (bench/webhook_bench.py"
             + ("" if provider == "hooktest" else f" --provider {provider}") + ")", "",
             f"`postroom serve` on SQLite, {threads} clients with kept-alive connections, "
             f"{SIGNED[provider]}; target >= 2,000 events/s. Load "
             f"average after the run: {load[0]:.1f} (2 cores).", "",
             "| events per request | events/s | requests/s | server CPU per event | "
             "recorded / attached | replayed: duplicates |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['events_per_s']:,.0f} | {r['requests_per_s']:,.0f} "
                     f"| {r['server_cpu_ms_per_event']:.3f} ms | {r['accepted']:,} / "
                     f"{r['attached']:,} | {r['replay_duplicates']:,} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def block_name(provider: str) -> str:
    return NAME if provider == "hooktest" else f"{NAME}-{provider}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batch", default="1,10,100")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="hooktest")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--src", help="run the server from this src folder")
    ap.add_argument("--spy", type=Path, help="py-spy raw stacks of the first row, to here")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    root = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    port = free_port()
    cfg = prepare(root, port, args.provider)
    env = {**os.environ, "BENCH_WEBHOOK_KEY": PROVIDERS[args.provider].key}
    if args.src:
        env[SRC_ENV] = str(Path(args.src).resolve())
    sizes = [int(b) for b in args.batch.split(",")]
    if not PROVIDERS[args.provider].batches and sizes != [1]:
        sys.exit(f"{args.provider} posts one event per request: use --batch 1")
    with open(root / "serve.log", "wb") as errlog:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=errlog)
    try:
        wait_port(port, timeout=60)
        rows = [run_row(port, proc.pid, args.events, b, args.threads, args.provider,
                        args.spy if i == 0 else None) for i, b in enumerate(sizes)]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    text = report(rows, args.threads, os.getloadavg(), args.provider)
    print(text)
    print(json.dumps(rows, indent=2))
    if args.out != "-":
        write_block(block_name(args.provider), text, Path(args.out))
    print(f"work dir: {root}")


if __name__ == "__main__":
    main()
