"""A raw SMTP client for hostile-input tests: bytes in, (code, text) out, nothing normalised
(smtplib would "help": it fixes line ends and quotes dots). It connects from a chosen source
address: 127.0.0.2 plays a remote client, outside the default trusted_networks."""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
from pathlib import Path

TIMEOUT = 15.0


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Raw:
    """One SMTP session. With ``greet`` the 220 greeting is read (and checked) at once."""

    def __init__(self, port: int, source: str = "127.0.0.1", *, timeout: float = TIMEOUT,
                 greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.rfile = self.sock.makefile("rb")
        self.greeting = self.reply() if greet else (0, "")
        if greet:
            assert self.greeting[0] == 220, self.greeting

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise EOFError(f"connection closed by the server after {lines!r}")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(x[4:] for x in lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.example.org") -> list[str]:
        code, text = self.cmd(f"EHLO {name}")
        assert code == 250, text
        return [x.split()[0].upper() for x in text.splitlines()[1:] if x.strip()]

    def starttls(self, cafile: Path | None = None) -> None:
        """STARTTLS, verifying the server against ``cafile`` (None: not verified)."""
        code, text = self.cmd("STARTTLS")
        assert code == 220, text
        if cafile is not None:
            ctx = ssl.create_default_context(cafile=str(cafile))
            self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock)
        self.rfile = self.sock.makefile("rb")

    def data(self, payload: bytes) -> tuple[int, str]:
        """DATA, then ``payload`` exactly as given (it must carry its own terminator)."""
        code, text = self.cmd("DATA")
        assert code == 354, text
        self.send(payload)
        return self.reply()

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1024) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        # The file from makefile() holds the descriptor open until it is closed too.
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()
