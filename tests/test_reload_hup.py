"""Issue 17, reload without loss: SIGHUP and `postroom reload` re-read postroom.toml in a
running `postroom serve`; `postroom config check` and `config show`; errors that name a key
name the file and line.

One real `postroom serve` (a subprocess) is shared by the module, delivering to two counting
aiosmtpd sinks (tests/real_servers.Sink) on 127.0.0.1; the tests run in file order and each
leaves the configuration valid. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from real_servers import Sink, status_counts, wait_log
from serve_proc import Postroom, smtp_connection

from postroom import config_source, hup
from postroom.bootstrap import ensure_certificate
from postroom.exceptions import ConfigError
from postroom.settings import load

WAIT = 60.0  # generous: the box is shared


class Stack:
    def __init__(self, pr: Postroom, a: Sink, b: Sink) -> None:
        self.pr, self.a, self.b = pr, a, b
        self.base = pr.config.read_text()

    def write(self, extra: str) -> None:
        """The file as the fixture wrote it, plus ``extra`` (connections, routes...)."""
        self.pr.config.write_text(self.base + extra)

    @property
    def data(self) -> Path:
        return self.pr.root / "data"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    a, b = Sink().start(), Sink().start()
    pr = Postroom(tmp_path_factory.mktemp("hup"), connections=smtp_connection(a.port, "a"),
                  env={"POSTROOM_DELIVERY__CLAIM_BATCH": "50"})
    try:
        pr.start()
        wait_log(pr, "accepting mail on", WAIT)
        yield Stack(pr, a, b)
    finally:
        pr.stop()
        a.stop()
        b.stop()


def _message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"] = "app@example.org", "someone@example.net"
    msg["Subject"] = f"hup {n}"
    msg["Message-ID"] = f"<hup-{n}@example.org>"
    msg.set_content(f"message {n}\n")
    return msg


def _result_after(data: Path, seq: int) -> hup.Result:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        result = hup.read_result(data)
        if result is not None and result.seq > seq:
            return result
        time.sleep(0.05)
    raise AssertionError("the server wrote no reload result")


def test_reload_under_load_switches_to_the_new_connection(stack: Stack) -> None:
    pr = stack.pr
    accepted: list[tuple[str, bool]] = []  # (message id, accepted after the reload answered)
    reloaded = threading.Event()
    total = 120

    def stream() -> None:
        with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=WAIT) as client:
            for n in range(total):
                after = reloaded.is_set()  # read before sending: "after" is certain
                client.send_message(_message(n))
                accepted.append((f"<hup-{n}@example.org>", after))
                if n == 40:
                    stack.write(smtp_connection(stack.b.port, "b")
                                + '[[routes]]\nname = "all"\nchain = ["b"]\n')
                    out = pr.cli("reload")
                    assert out.returncode == 0, out.stderr
                    text = out.stdout.decode()
                    assert "connections.b (added)" in text and "routes" in text, text
                    reloaded.set()

    client = threading.Thread(target=stream)
    client.start()
    client.join(WAIT * 2)
    assert not client.is_alive() and len(accepted) == total
    got = stack.a.count() + stack.b.count()
    deadline = time.monotonic() + WAIT
    while got < total and time.monotonic() < deadline:
        time.sleep(0.1)
        got = stack.a.count() + stack.b.count()
    delivered = stack.a.per_message_id() + stack.b.per_message_id()
    assert set(delivered) == {mid for mid, _ in accepted}  # nothing lost
    assert max(delivered.values()) == 1  # nothing twice
    assert sum(status_counts(f"sqlite:///{pr.db}").values()) == total  # one row each
    on_b = set(stack.b.per_message_id())
    assert all(mid in on_b for mid, after in accepted if after)  # the new connection
    assert any(after for _, after in accepted)


def test_invalid_file_is_refused_and_the_old_one_kept(stack: Stack) -> None:
    pr = stack.pr
    good = pr.config.read_text()
    pr.config.write_text(good.replace(f"port = {stack.b.port}", "port = 99999"))
    line = next(i for i, t in enumerate(pr.config.read_text().splitlines(), 1)
                if t == "port = 99999")
    # the command refuses before signalling: exit 2, the file and line
    out = pr.cli("reload")
    assert out.returncode == 2
    assert f"postroom.toml:{line}: connections[1].port" in out.stderr.decode()
    # a bare SIGHUP: the server refuses, says why in its answer and its log, keeps going
    seq = (hup.read_result(stack.data) or hup.Result(0, True)).seq
    assert pr.proc is not None
    os.kill(pr.proc.pid, signal.SIGHUP)
    result = _result_after(stack.data, seq)
    assert not result.ok and f"postroom.toml:{line}: connections[1].port" in result.error
    wait_log(pr, "configuration reload refused", WAIT)
    before = stack.b.count()
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=WAIT) as client:
        client.send_message(_message(1000))
    assert stack.b.wait_count(before + 1, WAIT) == before + 1  # still connection b
    pr.config.write_text(good)


def _peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.starttls(context=ctx)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_certificate_swapped_for_new_sessions_only(stack: Stack) -> None:
    pr = stack.pr
    old_der = _peer_cert(pr.smtp_port)
    cert, key = pr.root / "new-cert.pem", pr.root / "new-key.pem"
    ensure_certificate(cert, key, "swapped.test")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=WAIT) as in_flight:
        in_flight.starttls(context=ctx)
        good = pr.config.read_text()
        pr.config.write_text(good.replace(
            "[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', 1))
        out = pr.cli("reload")
        assert out.returncode == 0, out.stderr
        assert "server.tls_cert" in out.stdout.decode()
        new_der = _peer_cert(pr.smtp_port)
        assert new_der != old_der
        sock = in_flight.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.getpeercert(binary_form=True) == old_der
        in_flight.send_message(_message(2000))  # the session made before goes on
    # a key that does not match its certificate refuses the whole reload
    other_key = pr.root / "other-key.pem"
    ensure_certificate(pr.root / "other-cert.pem", other_key, "other.test")
    swapped = pr.config.read_text()
    pr.config.write_text(swapped.replace(str(key), str(other_key)))
    out = pr.cli("reload")
    assert out.returncode == 1 and "server.tls_cert/tls_key" in out.stderr.decode()
    assert _peer_cert(pr.smtp_port) == new_der
    pr.config.write_text(swapped)


def test_config_check_and_show(stack: Stack) -> None:
    pr = stack.pr
    candidate = pr.root / "elsewhere" / "candidate.toml"  # compared with --config's server
    candidate.parent.mkdir()
    candidate.write_text(pr.config.read_text().replace(
        f'smtp_listen = "127.0.0.1:{pr.smtp_port}"', 'smtp_listen = "127.0.0.1:1"')
        + '[policy]\nbcc = ["archive@example.org"]\n')
    out = pr.cli("config", "check", str(candidate))
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr
    assert "server.smtp_listen" in text and "(needs a restart)" in text
    assert "policy.bcc" in text and "running server (pid" in text
    candidate.write_text(candidate.read_text() + "\n[delivery]\nconcurrency = 0\n")
    out = pr.cli("config", "check", str(candidate))
    assert out.returncode == 2
    assert "candidate.toml:" in out.stderr.decode()  # a duplicate table: TOML's own line
    candidate.write_text('[server]\nsmtp_listen = "127.0.0.1:1"\n\n[delivery]\n'
                         'concurrency = 0\n')
    out = pr.cli("config", "check", str(candidate))
    assert out.returncode == 2
    assert "candidate.toml:5: delivery.concurrency" in out.stderr.decode()
    # show: a file line, an environment variable, the database, a default; secrets masked
    from postroom.audit import Actor
    from postroom.runtime import Instance

    inst = Instance(load(pr.config))
    try:
        inst.config.put_connection({"name": "stored", "transport": "smtp", "host": "h.test"},
                                   secret="db-secret", actor=Actor.cli(), settings=inst.settings)
    finally:
        inst.close()
    pr.config.write_text(pr.config.read_text()
                         + smtp_connection(stack.b.port, "c", 'password = "s3cret-value"')
                         + smtp_connection(stack.b.port, "d", 'password_env = "MY_VAR"'))
    out = pr.cli("config", "show", "--json")
    assert out.returncode == 0, out.stderr
    assert b"s3cret" not in out.stdout and b"db-secret" not in out.stdout
    items = {i["key"]: i for i in json.loads(out.stdout)}
    assert items["connections.c.password"]["value"] == "********"
    assert items["connections.d.password_env"]["value"] == "MY_VAR"
    lines = pr.config.read_text().splitlines()
    assert items["server.smtp_listen"]["source"] == (
        f"{pr.config}:{1 + next(i for i, t in enumerate(lines) if t.startswith('smtp_listen'))}")
    password_line = 1 + lines.index('password = "s3cret-value"')
    assert items["connections.c.password"]["source"] == f"{pr.config}:{password_line}"
    assert items["delivery.claim_batch"]["source"] == "environment POSTROOM_DELIVERY__CLAIM_BATCH"
    assert items["connections.stored.host"]["source"] == "database"
    assert items["delivery.breaker_cooldown"]["source"] == "default"
    # the server takes the new file connections and keeps the stored one; a key read only
    # at start is reported, not applied
    pr.config.write_text(pr.config.read_text().replace('hostname = "postroom.test"',
                                                       'hostname = "renamed.test"'))
    out = pr.cli("reload")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "connections.c (added)" in text and "needs a restart: server.hostname" in text
    snapshot = json.loads((stack.data / "effective-config.json").read_text())
    keys = {k for k, _, _ in snapshot["items"]}
    assert {"connections.c.host", "connections.stored.host"} <= keys
    assert b"s3cret" not in (stack.data / "effective-config.json").read_bytes()


def test_worker_reloads_on_sighup(stack: Stack) -> None:
    pr = stack.pr
    worker = Postroom(pr.root / "worker", env=pr.env)  # its stop(): TERM, then KILL
    worker.config = pr.config  # the server's file and database
    worker.start("worker")
    assert worker.proc is not None
    try:
        _wait_text(worker.log, "delivering from", worker.proc)
        pr.config.write_text(pr.config.read_text() + '[retention]\nkeep_rows_days = 7\n')
        worker.proc.send_signal(signal.SIGHUP)
        _wait_text(worker.log, "changed retention.keep_rows_days", worker.proc)
        assert worker.proc.poll() is None  # SIGHUP did not end it
    finally:
        worker.stop()


def _wait_text(path: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text(errors='replace')}")


def test_stale_pid_file_is_not_a_server(tmp_path: Path) -> None:
    (tmp_path / hup.PIDFILE).write_text(f"{os.getpid()}\n")  # nobody holds its lock
    assert hup.running_pid(tmp_path) is None
    held = hup.hold_pidfile(tmp_path)
    assert held is not None
    try:
        assert hup.running_pid(tmp_path) == os.getpid()
    finally:
        held.close()


def test_key_lines_follow_arrays_of_tables() -> None:
    text = ('# top\n[server]\nsmtp_listen = "x"\nlist = [\n  "a",\n  "b = c",\n]\n'
            'notes = """\n[fake]\nport = 1\n"""\n'
            '[[connections]]\nname = "a"\n\n[[connections]]\nname = "b"\n'
            'policy = { from = "x", to = ["y"] }\nport = 2\n'
            '[connections.oauth]\nclient_id = "z"\n[[routes]]\nchain = ["a"]\n')
    lines = config_source.key_lines(text)
    assert lines[("server", "smtp_listen")] == 3
    assert lines[("server", "notes")] == 8
    assert ("fake",) not in lines and ("server", "port") not in lines
    assert lines[("connections", 1, "name")] == 16
    assert lines[("connections", 1, "policy", "from")] == 17
    assert lines[("connections", 1, "port")] == 18
    assert lines[("connections", 1, "oauth", "client_id")] == 20
    assert config_source.line_of(text, ("connections", 0, "port")) == 12  # its header
    assert config_source.line_of(text, ("routes", 0, "chain")) == 22


def test_load_errors_name_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\nsmtp_listen = "nope"\n\n[[connections]]\nname = "a"\n'
                   'transport = "smtp"\nhost = "h"\n\n[[routes]]\nchain = ["zz"]\n')
    with pytest.raises(ConfigError) as err:
        load(cfg, environ={})
    assert f"{cfg}:2: server.smtp_listen" in err.value.message
    cfg.write_text(cfg.read_text().replace('"nope"', '"127.0.0.1:1"'))
    with pytest.raises(ConfigError) as err:
        load(cfg, environ={})
    assert f"{cfg}:10: routes[0].chain names 'zz'" in err.value.message
    with pytest.raises(ConfigError) as err:
        load(cfg, environ={"POSTROOM_SERVER__SMTP_LISTEN": "bad"})
    assert "environment POSTROOM_SERVER__SMTP_LISTEN: server.smtp_listen" in err.value.message


def test_masking_hides_secrets_in_values_and_urls() -> None:
    assert config_source.masked("api_key", "k-123") == config_source.MASK
    assert config_source.masked("password_env", "MY_VAR") == "MY_VAR"
    assert config_source.masked("database", "postgresql://pr:pw@db/x") == (
        f"postgresql://pr:{config_source.MASK}@db/x")
    assert config_source.masked("channels", ["slack://a/b/c"]) == [
        f"slack://{config_source.MASK}"]
    assert config_source.masked("headers", {"X-Token": "t", "X-Tag": "v"}) == {
        "X-Token": config_source.MASK, "X-Tag": "v"}
