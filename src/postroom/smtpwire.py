"""One SMTP client conversation on asyncio streams, shared by the transport and the probe.

Replies are parsed from our own buffer (one read can hold several pipelined replies), every
line goes to a transcript, and commands can be written several at a time (RFC 2920
PIPELINING). Everything runs on the event loop: no thread hand-off per command, which is
what a worker's throughput is made of.

Timeouts are the caller's (``asyncio.timeout``); this module only bounds sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl

from postroom.diagnostics import net

MAX_REPLY_LINES = 200
MAX_LINE = 8192  # a reply line longer than this is not SMTP (RFC 5321: 512; smtplib: 8192)
_READ = 64 * 1024


class Garbled(Exception):
    """The peer said something that is not an SMTP reply."""


class Closed(ConnectionError):
    """The peer closed the connection."""


class Wire:
    """A connected SMTP client: replies read from a buffer, each line in the transcript."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 transcript: list[str]) -> None:
        self.reader = reader
        self.writer = writer
        self.transcript = transcript
        self.buf = b""

    # -- reading --------------------------------------------------------------------------------
    async def _fill(self) -> None:
        if len(self.buf) > MAX_LINE:
            raise Garbled(f"line too long: a reply line over {MAX_LINE} bytes")
        data = await self.reader.read(_READ)
        if not data:
            raise Closed("the server closed the connection")
        self.buf += data

    async def first_bytes(self, wait: float | None) -> bytes | None:
        """The first bytes the server sends; None if it stays silent for ``wait`` seconds,
        b"" if it closes."""
        try:
            data = await asyncio.wait_for(self.reader.read(1024), wait)
        except TimeoutError:
            return None
        self.buf = data
        return data

    async def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: its code and the text of each line."""
        texts: list[str] = []
        for _ in range(MAX_REPLY_LINES):
            # Bounded: each pass returns a line or reads at least one byte, and _fill
            # refuses to grow the buffer past MAX_LINE without a line break.
            while (end := self.buf.find(b"\n")) < 0:
                await self._fill()
            if end > MAX_LINE:
                raise Garbled(f"line too long: a reply line over {MAX_LINE} bytes")
            raw, self.buf = self.buf[:end].rstrip(b"\r"), self.buf[end + 1:]
            text = raw.decode("utf-8", "replace")
            self.transcript.append(f"S: {text}")
            if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b"", b" ", b"-"):
                raise Garbled(f"not an SMTP reply: {text[:80]!r}")
            texts.append(text[4:])
            if raw[3:4] != b"-":
                return int(raw[:3]), texts
        raise Garbled(f"a reply of more than {MAX_REPLY_LINES} lines")

    # -- writing --------------------------------------------------------------------------------
    def send_lines(self, lines: list[str], shown: list[str] | None = None) -> None:
        """Commands in one write; ``shown`` is what the transcript gets instead (redacted)."""
        self.transcript.extend(f"C: {line}" for line in (shown or lines))
        self.writer.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    async def send_data(self, data: bytes) -> None:
        """Message data (dot-stuffed by the caller): the transcript gets its size only."""
        self.transcript.append(f"C: <message data, {len(data)} bytes>")
        self.writer.write(data)
        await self.writer.drain()  # a large message: wait for the socket, not for memory

    async def command(self, line: str, shown: str | None = None) -> tuple[int, list[str]]:
        self.send_lines([line], None if shown is None else [shown])
        return await self.reply()

    # -- the connection -------------------------------------------------------------------------
    async def start_tls(self, ctx: ssl.SSLContext, server_name: str) -> None:
        # Bytes after the reply to STARTTLS (or before an implicit-TLS handshake) would be
        # read later as if they had come through TLS: an injection (CVE-2011-0411 and its
        # kin), or a broken server. Refuse, rather than drop them silently.
        pending = len(self.buf) + len(getattr(self.reader, "_buffer", b""))
        if pending:
            raise Garbled(f"the server sent {pending} byte(s) in plain text before the TLS "
                          "handshake; refusing to go on (a STARTTLS injection?)")
        await self.writer.start_tls(ctx, server_hostname=server_name)

    def tls_facts(self) -> tuple[str, str] | None:
        """(version, cipher) of the TLS session, None in plain text."""
        obj = self.writer.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject):
            return None
        cipher = obj.cipher()
        return str(obj.version()), cipher[0] if cipher else "?"

    async def quit(self) -> None:
        with contextlib.suppress(Closed, Garbled, OSError):
            await self.command("QUIT")

    async def close(self, wait: float = 0.5) -> None:
        await net.close(self.writer, wait)

    def abort(self) -> None:
        self.writer.transport.abort()


def capabilities(lines: list[str]) -> dict[str, str]:
    """EHLO reply lines -> {KEYWORD: parameters}; the pre-RFC 4954 ``AUTH=`` form merged."""
    caps: dict[str, str] = {}
    for line in lines[1:]:  # the first line is the server's name
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
        if keyword == "AUTH" and "AUTH" in caps:
            params = " ".join(dict.fromkeys(f"{caps['AUTH']} {params}".split()))
        if keyword:
            caps[keyword] = params.strip()
    return caps


# The id a server gave the message in its final 250 reply (no RFC defines one; each MTA words
# it its own way): Postfix and SendGrid "Ok: queued as 4Xyz", Exim "OK id=1q2w3e-0004Rt-Ab",
# Gmail "OK  1712345678 a1b2c3.45 - gsmtp", Sendmail "x8ABCdef012345 Message accepted for
# delivery", Amazon SES "Ok 0100018c8f...-000000".
_QUEUE_ID = [re.compile(p, re.IGNORECASE) for p in (
    r"\bqueued as ([\w.@<>:+/=-]+)",
    r"\bid=([\w.@<>:+/=-]+)",
    r"\bok\s+\d+\s+(\S+)\s+-\s+gsmtp\b",
    r"^(?:2\.\d\.\d+\s+)?(\w{14}) message accepted for delivery",
    r"^(?:2\.\d\.\d+\s+)?ok\s+([0-9a-f]{16,}(?:-[0-9a-f]+)+)\b",
)]


def queue_id(reply: str) -> str | None:
    """The server's id for the message from its final reply's text (``reply`` without the
    code; an enhanced status code may lead it), or None when it names none. What the
    server's logs and bounces (DSNs) call the message: kept as the attempt's provider id."""
    text = reply.strip()
    for pattern in _QUEUE_ID:
        if (m := pattern.search(text)) is not None:
            return m.group(1).strip("<>.,;")[:255] or None
    return None
