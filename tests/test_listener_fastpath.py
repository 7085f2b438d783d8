"""The listener's fast paths must behave exactly like aiosmtpd's own slow ones."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from postroom.apps import Apps
from postroom.ingress.accept import Intake
from postroom.ingress.smtpd import Handler, Policy, PostroomSMTP
from postroom.queue.sql import Queue
from postroom.settings import ServerSettings
from postroom.store.db import make_engine, migrate


def _handler(tmp_path: Path) -> Handler:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    apps = Apps(engine, b"k" * 32)
    return Handler(Queue(engine), apps, Policy(ServerSettings()),
                   Intake(ServerSettings(), (), apps))


def _describe(obj: PostroomSMTP) -> dict[str, Any]:
    """Attributes, with bound methods and per-connection objects reduced to what they are."""
    out: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if inspect.ismethod(value):
            out[key] = ("method", value.__func__, value.__self__ is obj)
        elif key in ("_smtp_methods", "_auth_methods"):
            out[key] = {
                k: (getattr(v, "is_builtin", None),
                    getattr(getattr(v, "method", v), "__func__", None),
                    getattr(getattr(v, "method", v), "__self__", None) is obj)
                for k, v in value.items()
            }
        elif isinstance(value, (asyncio.Future, asyncio.StreamReader)) or key in (
            "_stream_reader_wr", "_drain_waiters"
        ):
            out[key] = type(value)
        else:
            out[key] = value
    return out


def test_like_equals_a_normal_construction(tmp_path: Path) -> None:
    async def go() -> None:
        handler = _handler(tmp_path)
        kw: dict[str, Any] = dict(
            implicit_tls=False, data_size_limit=1000, enable_SMTPUTF8=True, decode_data=False,
            hostname="h.test", ident="x", authenticator=handler.authenticator,
        )
        template = PostroomSMTP(handler, **kw)
        slow = PostroomSMTP(handler, **kw)
        fast = PostroomSMTP.like(template)
        assert _describe(fast) == _describe(slow)
        # nothing per-connection is shared with the template
        for key in ("_stream_reader_wr", "_closed", "_drain_waiters"):
            if key in vars(fast):
                assert vars(fast)[key] is not vars(template)[key]
        assert fast._auth_methods["PLAIN"].method.__self__ is fast
        assert fast._smtp_methods["MAIL"].__self__ is fast

    asyncio.run(go())


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.c> SIZE=2000",
        "<a@b.c>",
        " <a@b.c>  BODY=8BITMIME SMTPUTF8",
        "<>",
        "<δοκιμή@example.test> SMTPUTF8",
        "a@b.c",
        '<"q x"@b.c>',
        "<@r:a@b.c>",
        "<a@@b>",
        "<a b@c>",
        "<" + "x" * 65 + "@b.c>",
        "<a@b.c",
        "<a.b+tag@sub.example.org> SIZE=1 BODY=7BIT",
    ],
)
def test_fast_getaddr_agrees_with_aiosmtpd(tmp_path: Path, arg: str) -> None:
    async def go() -> None:
        handler = _handler(tmp_path)
        ours = PostroomSMTP(handler, implicit_tls=False)
        theirs = SMTP(handler)
        assert ours._getaddr(arg) == theirs._getaddr(arg)

    asyncio.run(go())


# -- DATA read in blocks (ingress.smtpdata) vs aiosmtpd's line-by-line reader ---------------

_LONG = b"x" * 999
_DATA_CASES = {
    "empty": b"",
    "one line": b"Subject: hi\r\n\r\nbody\r\n",
    "dots": b".leading\r\n..two\r\nmid.dle\r\n.\r\nx\r\n..\r\nend.\r\n...\r\n",
    "sentences": b"Subject: s\r\n\r\n" + b"Thanks.\r\n" * 50 + b"bye.\r\n",
    "first line is a dot": b"..\r\nafter\r\n",
    "line at the limit": _LONG + b"\r\n" + b"ok\r\n",
    "line over the limit": _LONG + b"y\r\n" + b"ok\r\n",
    "line far over, no CRLF for long": b"a\r\n" + b"z" * 5000 + b"\r\nb\r\n",
    "over the size": b"0123456789abcdef\r\n" * 7000,
    "50 KB": b"Subject: big\r\n\r\n" + b"A" * 76 + b"\r\n" + (b"B" * 76 + b"\r\n") * 640,
    "dot at line ends": b"a.\r\n" * 40 + b".b\r\n",
}


class _Recorder(Handler):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append(envelope.original_content)
        return "250 2.0.0 recorded"


class _LineByLine(PostroomSMTP):
    smtp_DATA = SMTP.smtp_DATA  # aiosmtpd's own reader, for comparison


async def _serve(cls: type[PostroomSMTP], handler: _Recorder) -> tuple[asyncio.Server, int]:
    template = cls(handler, implicit_tls=False, data_size_limit=100_000, decode_data=False,
                   hostname="h.test", authenticator=handler.authenticator)
    server = await asyncio.get_running_loop().create_server(
        lambda: cls.like(template), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _exchange(port: int, data: bytes, pieces: int) -> list[bytes]:
    """One transaction, the data written in ``pieces`` writes (each drained), then QUIT
    pipelined right after the dot; every reply line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    replies: list[bytes] = []
    while not (replies and replies[-1].startswith(b"354")):
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    stream = data + b".\r\nQUIT\r\n"
    step = max(1, -(-len(stream) // pieces))
    for i in range(0, len(stream), step):
        writer.write(stream[i:i + step])
        await writer.drain()
        await asyncio.sleep(0)
    while not (replies and replies[-1].startswith(b"221")):
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    return replies


@pytest.mark.parametrize("case", list(_DATA_CASES))
def test_data_in_blocks_agrees_with_aiosmtpd(tmp_path: Path, case: str) -> None:
    """Same replies and the same stored bytes as aiosmtpd's reader, the data arriving
    whole, in a few pieces and one byte at a time (splits at every position)."""
    data = _DATA_CASES[case]
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in data.splitlines(keepends=True))

    async def go() -> None:
        base = _handler(tmp_path)
        ours_h = _Recorder(base.queue, base.apps, base.policy, base.intake)
        theirs_h = _Recorder(base.queue, base.apps, base.policy, base.intake)
        ours_h.got, theirs_h.got = [], []
        ours, ours_port = await _serve(PostroomSMTP, ours_h)
        theirs, theirs_port = await _serve(_LineByLine, theirs_h)
        try:
            splits = [1, 3, 17] + ([len(stuffed) + 5] if len(stuffed) < 3000 else [])
            for pieces in splits:
                got = await _exchange(ours_port, stuffed, pieces)
                want = await _exchange(theirs_port, stuffed, pieces)
                assert got == want, pieces
            assert ours_h.got == theirs_h.got
            refused = case in ("line over the limit", "line far over, no CRLF for long",
                               "over the size")
            assert ours_h.got == ([] if refused else [data] * len(splits))
        finally:
            ours.close()
            theirs.close()

    asyncio.run(go())
