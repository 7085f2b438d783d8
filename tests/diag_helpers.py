"""Local servers for the diagnostics tests (test_probe.py, test_advice.py).

- ``blackhole()``: a port whose SYNs are silently dropped (a listener whose accept queue is
  full: Linux then discards new SYNs, exactly what a DROP firewall rule looks like to a
  client; no root, no iptables needed).
- ``Scripted``: a raw SMTP-ish server that says exactly what a test tells it, including
  things no real server library will (a 421 greeting, silence, a reset, garbage).
- ``provider()``: an aiosmtpd server replying with a provider's documented texts.
- ``make_ca`` / ``make_cert``: certificates (expired, for other names...) for TLS tests.

Everything binds 127.0.0.1 on ports the OS picks, runs in a daemon thread, and stops when the
context manager exits; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on (free a moment ago): connecting gets a reset."""
    return free_port()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that silently drops connection attempts (see the module docstring)."""
    srv = socket.socket()
    filler: socket.socket | None = None
    try:
        srv.bind((HOST, 0))
        srv.listen(0)
        port = int(srv.getsockname()[1])
        filler = socket.create_connection((HOST, port), timeout=5)  # fills the queue
        with socket.socket() as probe_sock:  # check: the next SYN must go unanswered
            probe_sock.settimeout(0.3)
            try:
                probe_sock.connect((HOST, port))
            except TimeoutError:
                pass
            else:
                raise AssertionError("the backlog trick did not drop the SYN on this kernel")
        yield port
    finally:
        if filler is not None:
            filler.close()
        srv.close()


# -- a scripted server ----------------------------------------------------------------------------
SILENT = "<silent>"  # say nothing from now on (keep the connection open)
CLOSE = "<close>"  # close the connection
RESET = "<reset>"  # close with an RST (SO_LINGER 0)


@dataclass
class Scripted:
    """Replies by command verb ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS",
    "DOT" for the end of the message data, "*" for anything else). A reply is a string (lines
    separated by "\\n", sent with CRLF) or SILENT/CLOSE/RESET. ``greeting`` may be one too."""

    greeting: str = "220 scripted.test ESMTP"
    replies: dict[str, str] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None  # implicit TLS with this server context
    port: int = 0
    commands: list[str] = field(default_factory=list)

    DEFAULTS: ClassVar[dict[str, str]] = {
        "EHLO": "250-scripted.test\n250-PIPELINING\n250-SIZE 1000000\n250 8BITMIME",
        "HELO": "250 scripted.test", "MAIL": "250 2.1.0 Ok", "RCPT": "250 2.1.5 Ok",
        "DATA": "354 End data with <CR><LF>.<CR><LF>", "DOT": "250 2.0.0 Ok: queued",
        "RSET": "250 2.0.0 Ok", "QUIT": "221 2.0.0 Bye", "NOOP": "250 2.0.0 Ok",
        "*": "502 5.5.2 Error: command not recognized",
    }

    async def _say(self, writer: asyncio.StreamWriter, reply: str) -> bool:
        """False when the connection is to end (the handler stops)."""
        if reply == SILENT:
            await asyncio.sleep(3600)
            return False
        if reply == CLOSE:
            writer.close()
            return False
        if reply == RESET:
            sock = writer.get_extra_info("socket")
            linger_zero = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
            writer.transport.abort()
            return False
        writer.write("".join(f"{line}\r\n" for line in reply.split("\n")).encode())
        await writer.drain()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not await self._say(writer, self.greeting):
                return
            in_data = False
            for _ in range(1000):
                line = await reader.readline()
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if in_data:
                    if text != ".":
                        continue
                    in_data, verb = False, "DOT"
                else:
                    verb = text.split(" ", 1)[0].upper()
                    self.commands.append(text)
                reply = self.replies.get(verb) or self.DEFAULTS.get(verb) or self.DEFAULTS["*"]
                if not await self._say(writer, reply):
                    return
                if verb == "DATA" and reply.startswith("354"):
                    in_data = True
                if verb == "QUIT":
                    writer.close()
                    return
        except (ConnectionError, asyncio.CancelledError):
            return

    @contextlib.contextmanager
    def running(self) -> Iterator[Scripted]:
        loop = asyncio.new_event_loop()
        server: list[Any] = []

        async def start() -> None:
            srv = await asyncio.start_server(self._handle, HOST, 0, ssl=self.tls)
            self.port = int(srv.sockets[0].getsockname()[1])
            server.append(srv)

        thread = threading.Thread(target=loop.run_forever, daemon=True, name="scripted-smtp")
        thread.start()
        asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            yield self
        finally:
            async def stop() -> None:
                server[0].close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


# -- an aiosmtpd "provider" ---------------------------------------------------------------------
@dataclass
class ProviderHandler:
    """Replies with fixed texts: auth (failure text for any AUTH), mail, rcpt, data."""

    auth: str | None = None
    mail: str | None = None
    rcpt: str | None = None
    data: str | None = None

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.mail:
            return self.mail
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt:
            return self.rcpt
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return self.data or "250 2.0.0 OK queued"

    def authenticator(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if self.auth:
            return AuthResult(success=False, handled=False, message=self.auth)
        return AuthResult(success=True)


@contextlib.contextmanager
def provider(handler: ProviderHandler, *, tls: ssl.SSLContext | None = None,
             **smtp: Any) -> Iterator[int]:
    """An aiosmtpd server with ``handler``; yields its port. AUTH is offered without TLS
    unless ``tls`` is given (then only after STARTTLS)."""
    port = free_port()
    params: dict[str, Any] = {"authenticator": handler.authenticator,
                              "auth_require_tls": tls is not None}
    if tls is not None:
        params.update(tls_context=tls, require_starttls=True)
    params.update(smtp)
    ctl = Controller(handler, hostname=HOST, port=port, ready_timeout=10, **params)
    ctl.start()
    try:
        yield port
    finally:
        ctl.stop()


# -- certificates ----------------------------------------------------------------------------
@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path


def make_ca(folder: Path, name: str = "Diagnostics Test CA") -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key, path)


def make_cert(ca: CA, folder: Path, names: list[str], *, days: tuple[int, int] = (-1, 30),
              stem: str = "server") -> tuple[Path, Path]:
    """A server certificate signed by ``ca`` for DNS names and IP addresses ``names``, valid
    from now+days[0] to now+days[1] (negative: in the past). Returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@contextlib.contextmanager
def https_server(handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext
                 ) -> Iterator[ThreadingHTTPServer]:
    """An HTTPS server on 127.0.0.1 (port 0) answering with ``handler`` in threads, for
    the lifetime of the block (the fakes of the internet's HTTPS services)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _echoing(fd: int) -> bool:
    import termios

    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


def pty_run(argv: list[str], env: dict[str, str], answers: list[tuple[bytes, bytes]],
             timeout: float = 60.0) -> tuple[int, str]:
    """Run argv on a pseudo-terminal, answering each prompt (a byte string to wait for) in
    turn; returns (exit code, everything shown on the terminal)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the wizard on a terminal
        os.execvpe(argv[0], argv, env)
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if pending and pending[0][0] in out:
                # A hidden prompt (getpass) turns echo off with TCSAFLUSH, which throws away
                # input typed before: answer only once the terminal stopped echoing, or
                # the answer is lost (and shown) under load.
                if b"password" in pending[0][0] and _echoing(fd):
                    continue
                os.write(fd, pending.pop(0)[1])
                out += b"\n<answered>\n"
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")
