"""What one hostile SMTP client can cost a real `postroom serve` (issue 11, points 5 and 7).

Each test asserts the refusal the hostile client gets and that a legitimate client is still
served. Hostile clients connect from 127.0.0.2 (or .3, .4): loopback addresses outside the
default trusted_networks, so they are treated as remote. The legitimate client is this
host's app on 127.0.0.1 (trusted: it sends without AUTH). No upstream is configured: a
message is "served" when Postroom answers 250 and has stored it.

Timing and memory assertions are generous ratios against the same run's baseline.
"""

from __future__ import annotations

import logging
import re
import resource
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_proc import Postroom, wait_port
from smtp_raw import Raw, auth_plain

from postroom.ingress.guard import FailureLimiter, SessionCaps
from postroom.server import RepeatFilter

LEGIT = "127.0.0.1"
HOSTILE = "127.0.0.2"
TIMEOUT = 15.0  # every socket in this module
TOO_MANY = "Too many connections from your address, try again later"
BASE_DELAY = 0.2
MAX_DELAY = 1.6


# -- clients ---------------------------------------------------------------------------------
def remote_session(port: int, source: str) -> Raw:
    """Greeted, EHLO'd and on TLS: where AUTH is allowed off trusted_networks."""
    c = Raw(port, source, greet=False)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO hostile.example")[0] == 250
    c.starttls()
    assert c.cmd("EHLO hostile.example")[0] == 250
    return c


def legit_send(port: int) -> float:
    """One message from this host's app, on a new connection; returns the seconds it took."""
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(LEGIT, 0)) as s:
        refused = s.sendmail("app@example.org", ["someone@example.test"],
                             b"Subject: hi\r\n\r\nhello\r\n")
    assert refused == {}
    return time.perf_counter() - start


def healthz(p: Postroom) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/healthz", timeout=TIMEOUT) as r:
        return int(r.status)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def baseline_latency(port: int, n: int = 10) -> float:
    legit_send(port)  # the first send pays for imports and the first commit
    return statistics.median(legit_send(port) for _ in range(n))


# -- point 5: AUTH flood ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_pr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postroom, str]]:
    with Postroom(tmp_path_factory.mktemp("hostile-auth"),
                 server=f"auth_failure_max_delay = {MAX_DELAY}\n") as p:
        yield p, p.add_app("flooded")


def test_auth_flood_leaves_legit_sends_fast_and_memory_flat(
    auth_pr: tuple[Postroom, str],
) -> None:
    """40 sessions failing AUTH in a loop: legitimate sends stay within 20x their unloaded
    latency (or 1 s), the server's memory stays near its baseline, and every hostile
    session gets 535 then 421 after max_auth_failures."""
    p, _ = auth_pr
    assert p.proc is not None
    base = baseline_latency(p.smtp_port)
    rss0 = rss_kib(p.proc.pid)
    stop = threading.Event()
    replies: list[int] = []
    errors: list[BaseException] = []

    def flood() -> None:
        deadline = time.monotonic() + 60  # bounded even if stop is never set
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                c = remote_session(p.smtp_port, HOSTILE)
                try:
                    for _ in range(3):  # max_auth_failures
                        replies.append(c.cmd(auth_plain("flooded", "guess"))[0])
                    replies.append(c.reply()[0])  # unasked: the session is closed
                except (EOFError, OSError):
                    pass
                finally:
                    c.close()
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(40)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)  # let the flood reach its growing delays
        loaded = [legit_send(p.smtp_port) for _ in range(10)]
        rss1 = rss_kib(p.proc.pid)
    finally:
        stop.set()
        for t in threads:
            t.join(MAX_DELAY * 3 + TIMEOUT)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    under_attack = statistics.median(loaded)
    print(f"legit send: unloaded {base * 1000:.1f} ms, under AUTH flood "
          f"{under_attack * 1000:.1f} ms; RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB; "
          f"{len(replies)} AUTH replies")
    assert under_attack < max(1.0, 20 * base), (base, loaded)
    assert rss1 < rss0 * 1.5 + 20 * 1024, (rss0, rss1)
    assert 535 in replies and 421 in replies and not set(replies) - {535, 421}, set(replies)


def test_failed_auth_delay_grows_across_sessions(auth_pr: tuple[Postroom, str]) -> None:
    """Each failure from one address doubles the wait for the next 535, even on a new
    connection, up to auth_failure_max_delay; another address starts at the base delay,
    and the right secret is answered at once and forgives the address."""
    p, secret = auth_pr
    source = "127.0.0.3"  # an address of its own: the flood test's failures are 127.0.0.2's
    waits = []
    for _ in range(5):
        c = remote_session(p.smtp_port, source)
        try:
            start = time.monotonic()
            code, _ = c.cmd(auth_plain("flooded", "wrong"))
            waits.append(time.monotonic() - start)
            assert code == 535
        finally:
            c.close()
    print("waits for 535 in successive sessions:", [f"{w:.2f}" for w in waits])
    expected = [min(MAX_DELAY, BASE_DELAY * 2 ** i) for i in range(5)]  # .2 .4 .8 1.6 1.6
    for got, want in zip(waits, expected, strict=True):
        assert want - 0.05 <= got < want + 1.0, (waits, expected)

    c = remote_session(p.smtp_port, "127.0.0.4")  # a clean address: the base delay
    try:
        start = time.monotonic()
        assert c.cmd(auth_plain("flooded", "wrong"))[0] == 535
        assert time.monotonic() - start < MAX_DELAY - 0.2
    finally:
        c.close()

    c = remote_session(p.smtp_port, source)  # the right secret is not delayed
    try:
        start = time.monotonic()
        assert c.cmd(auth_plain("flooded", secret))[0] == 235
        assert time.monotonic() - start < BASE_DELAY
        assert c.cmd("MAIL FROM:<app@example.org>")[0] == 250
    finally:
        c.close()
    c = remote_session(p.smtp_port, source)  # and the address starts again from the base
    try:
        start = time.monotonic()
        assert c.cmd(auth_plain("flooded", "wrong"))[0] == 535
        assert time.monotonic() - start < 2 * BASE_DELAY + 0.3
    finally:
        c.close()
    legit_send(p.smtp_port)


# -- point 7: connection exhaustion ----------------------------------------------------------
@pytest.fixture(scope="module")
def caps_pr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postroom]:
    # default caps: 500 / 50, shared by the SMTP and SMTPS listeners
    with Postroom(tmp_path_factory.mktemp("hostile-caps"), smtps=True) as p:
        yield p


def open_idle(port: int, source: str, n: int) -> tuple[list[Raw], list[str]]:
    """``n`` connections from ``source``; returns the ones greeted and EHLO'd (left idle)
    and the replies of those refused."""
    kept: list[Raw] = []
    refused: list[str] = []
    for _ in range(n):
        c = Raw(port, source, greet=False)
        code, text = c.reply()
        if code == 220:
            assert c.cmd("EHLO idle.example")[0] == 250
            kept.append(c)
        else:
            refused.append(f"{code} {text}")
            assert c.closed_by_server()
            c.close()
    return kept, refused


def test_idle_connections_over_the_per_address_cap_get_421(caps_pr: Postroom) -> None:
    """300 idle sessions (EHLO, then nothing) from one address: 50 are kept, the other 250
    get 421 and are closed at once; SMTP and /healthz still serve everyone else."""
    p = caps_pr
    base = baseline_latency(p.smtp_port, n=5)
    kept, refused = open_idle(p.smtp_port, HOSTILE, 300)
    try:
        assert len(kept) == 50, len(kept)
        assert len(refused) == 250
        assert all(r == f"421 4.7.0 {TOO_MANY}" for r in refused), set(refused)
        loaded = statistics.median(legit_send(p.smtp_port) for _ in range(5))
        assert loaded < max(1.0, 20 * base), (base, loaded)
        assert healthz(p) == 200
        # the cap is the address's, whichever listener it comes to: over TLS too
        assert p.smtps_port is not None
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = Raw(p.smtps_port, HOSTILE, greet=False)
        tls.sock = ctx.wrap_socket(tls.sock)
        tls.rfile = tls.sock.makefile("rb")
        try:
            assert tls.reply() == (421, f"4.7.0 {TOO_MANY}")
            assert tls.closed_by_server()
        finally:
            tls.close()
        # another remote address has places of its own
        other = Raw(p.smtp_port, "127.0.0.3", greet=False)
        try:
            assert other.reply()[0] == 220
        finally:
            other.close()
    finally:
        for c in kept:
            c.close()
    assert "Error calling" not in p.log.read_text()  # nothing of aiosmtpd's ran on them
    # places are given back when sessions end
    deadline = time.monotonic() + 10
    while True:
        c = Raw(p.smtp_port, HOSTILE, greet=False)
        try:
            if c.reply()[0] == 220:
                break
        finally:
            c.close()
        assert time.monotonic() < deadline, "places were not given back"
        time.sleep(0.1)


def test_total_cap_keeps_a_reserve_for_trusted_clients(tmp_path: Path) -> None:
    """With smtp_max_sessions = 40 (per address 20), outsiders from several addresses get
    36 places in all; the last 4 are this host's (trusted_networks)."""
    with Postroom(tmp_path, server="smtp_max_sessions = 40\nsmtp_max_sessions_per_ip = 20\n") as p:
        held: list[Raw] = []
        try:
            refused: list[str] = []
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                kept, ref = open_idle(p.smtp_port, source, 20)
                held += kept
                refused += ref
            assert len(held) == 36, len(held)
            assert refused and all(TOO_MANY in r for r in refused)
            legit_send(p.smtp_port)  # the reserve
            assert healthz(p) == 200
        finally:
            for c in held:
                c.close()


def test_noop_loop_is_cut_off(caps_pr: Postroom) -> None:
    """NOOP restarts the idle timer: 100 are answered, the 101st gets 421 and the session
    is closed (aiosmtpd's command_call_limit). Even from a trusted address."""
    p = caps_pr
    c = Raw(p.smtp_port, LEGIT, greet=False)
    try:
        assert c.reply()[0] == 220
        for _ in range(100):
            assert c.cmd("NOOP")[0] == 250
        code, text = c.cmd("NOOP")
        assert (code, text) == (421, "4.7.0 NOOP sent too many times")
        assert c.closed_by_server()
    finally:
        c.close()
    legit_send(p.smtp_port)


def test_unauthenticated_session_is_closed_after_its_deadline(tmp_path: Path) -> None:
    """smtp_auth_deadline = 2: a remote client that keeps a session busy with NOOP but
    never authenticates is closed with 421 after 2 s; one that authenticated, and a trusted
    one, are not."""
    with Postroom(tmp_path, server="smtp_auth_deadline = 2\n") as p:
        secret = p.add_app("late")
        idler = Raw(p.smtp_port, HOSTILE, greet=False)
        start = time.monotonic()
        authed = remote_session(p.smtp_port, "127.0.0.3")
        trusted = Raw(p.smtp_port, LEGIT, greet=False)
        try:
            assert idler.reply()[0] == 220
            assert trusted.reply()[0] == 220
            assert authed.cmd(auth_plain("late", secret))[0] == 235
            last: tuple[int, str] = (0, "")
            for _ in range(40):  # at most 8 s
                last = idler.cmd("NOOP")
                if last[0] != 250:
                    break
                time.sleep(0.2)
            closed_after = time.monotonic() - start
            assert last == (421, "4.7.0 Authenticate within 2 seconds of connecting; closing")
            assert idler.closed_by_server()
            assert 1.9 <= closed_after < 6, closed_after
            time.sleep(max(0.0, 2.5 - (time.monotonic() - start)))
            assert authed.cmd("NOOP")[0] == 250
            assert trusted.cmd("NOOP")[0] == 250
            assert authed.cmd("MAIL FROM:<app@example.org>")[0] == 250
        finally:
            for c in (idler, authed, trusted):
                c.close()
        legit_send(p.smtp_port)


# -- descriptors and the log -----------------------------------------------------------------
def start_with_nofile(p: Postroom, soft: int, hard: int) -> None:
    """`postroom serve` as Postroom.start runs it, under RLIMIT_NOFILE (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    p.proc = subprocess.Popen(
        [sys.executable, "-m", "postroom.cli", "serve", "--config", str(p.config)],
        stdout=p.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=p.env, start_new_session=True, preexec_fn=limit,
    )
    try:
        wait_port(p.smtp_port, timeout=30)
    except TimeoutError as err:
        p.stop()
        raise RuntimeError(f"postroom serve did not start:\n{p.log.read_text()}") from err


def test_open_files_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    p = Postroom(tmp_path)
    try:
        start_with_nofile(p, 256, 4096)
        assert p.proc is not None
        limits = Path(f"/proc/{p.proc.pid}/limits").read_text()
        row = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
        assert row is not None and row.groups() == ("4096", "4096"), limits
        legit_send(p.smtp_port)
    finally:
        p.stop()


def test_accept_failures_do_not_flood_the_log(tmp_path: Path) -> None:
    """Under a 64-descriptor limit, hundreds of connections make accept() fail with EMFILE
    for seconds: the log stays small (the repeated asyncio line is written at most 20
    times per 10 s), the start-up warning names the limit, and once the clients leave, a
    legitimate send goes through."""
    p = Postroom(tmp_path)
    held: list[socket.socket] = []
    try:
        start_with_nofile(p, 64, 64)
        size0 = p.log.stat().st_size
        sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        for i in range(400):  # connections wait in the listen backlog once accept() fails
            try:
                s = socket.create_connection(("127.0.0.1", p.smtp_port), timeout=2,
                                             source_address=(sources[i % 4], 0))
            except OSError:
                break  # the backlog is full: enough
            held.append(s)
        time.sleep(4)  # accept() keeps failing, once a second per retry
        text = p.log.read_text(errors="replace")
        floods = text.count("socket.accept() out of system resource")
        grown = p.log.stat().st_size - size0
        print(f"{len(held)} connections held; {floods} accept() failure lines, log grew "
              f"{grown} bytes")
        assert 1 <= floods <= 20, floods
        assert grown < 200_000, grown
        assert "open-file limit is 64" in text
    finally:
        for s in held:
            s.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                legit_send(p.smtp_port)
                break
            except (OSError, smtplib.SMTPException):
                assert time.monotonic() < deadline, "no legitimate send after the flood"
                time.sleep(0.5)
    finally:
        p.stop()


def test_repeat_filter_writes_a_summary_after_the_interval() -> None:
    now = [0.0]
    seen: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    sink = Sink()
    sink.addFilter(RepeatFilter(sink.handle, burst=3, interval=10, clock=lambda: now[0]))
    logger = logging.getLogger("postroom.ingress.test-repeat")  # a listener's logger
    logger.propagate = False
    logger.addHandler(sink)
    delivery = logging.getLogger("postroom.queue.test-repeat")  # one line per message: kept
    delivery.propagate = False
    delivery.addHandler(sink)
    try:
        for i in range(100):
            delivery.warning("message %d status=deferred", i)
        assert len(seen) == 100
        seen.clear()
        for i in range(1000):
            logger.error("accept failed on fd %d\nsocket: %r", i, object())
        logger.error("something else")
        assert len(seen) == 4 and seen[-1] == "something else"
        now[0] = 11.0
        logger.error("accept failed on fd %d\nsocket: %r", 1000, None)
        assert seen[4] == "suppressed 997 similar lines in 11 s: accept failed on fd %d"
        assert seen[5].startswith("accept failed on fd 1000")
    finally:
        logger.removeHandler(sink)
        delivery.removeHandler(sink)


def test_failure_limiter_grows_forgets_and_stays_bounded() -> None:
    now = [0.0]
    f = FailureLimiter(base_delay=1, max_delay=8, window=100, max_peers=3, clock=lambda: now[0])
    assert f.delay("192.0.2.1") == 0
    for want in (1, 2, 4, 8, 8):
        f.failed("192.0.2.1")
        assert f.delay("::ffff:192.0.2.1") == want  # IPv4-mapped is the same peer
    f.failed("2001:db8::1")
    assert f.delay("2001:db8::ffff") == 1  # one IPv6 /64 is one peer
    now[0] = 101.0
    assert f.delay("192.0.2.1") == 0  # forgotten after the window
    for i in range(10):
        f.failed(f"198.51.100.{i}")
    assert len(f) == 3  # the oldest are evicted
    f.succeeded("198.51.100.9")
    assert f.delay("198.51.100.9") == 0


def test_session_caps_per_peer_total_and_reserve() -> None:
    c = SessionCaps(per_peer=2, total=5, reserve=1)
    assert [c.try_open("192.0.2.1") for _ in range(3)] == [True, True, False]
    assert c.try_open("2001:db8::1") and c.try_open("2001:db8::2")
    assert not c.try_open("2001:db8::3")  # same /64
    assert not c.try_open("198.51.100.1")  # 4 open: the last place is the reserve
    assert c.try_open("127.0.0.1", exempt=True)
    assert not c.try_open("127.0.0.1", exempt=True)  # the total holds for everyone
    c.close("192.0.2.1")
    c.close("203.0.113.9")  # never opened: ignored
    assert c.open == 4 and c.count("192.0.2.1") == 1
