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
