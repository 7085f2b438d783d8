"""``postroom.Mailer``: hand mail to Postroom from Python code.

::

    from postroom import Mailer

    mailer = Mailer()                        # embedded: the store of the postroom.toml found
    msg_id = mailer.send(from_="shop@example.com", to="bob@example.org",
                         subject="Your order", text="Thanks!", attachments=["invoice.pdf"])

Two modes, one API:

- **embedded** (default): the message is written straight into the local store of the
  configuration found like the CLI finds it (``config=``, ``$POSTROOM_CONFIG``,
  ``./postroom.toml``, ``~/.config/postroom/``, ``/etc/postroom/``); ``postroom serve`` or
  ``postroom worker`` delivers it. ``send`` returns once the row is on disk (fsync).
- **remote** (``url=``, ``api_key=``): through a Postroom server's HTTP API.

There is one async core (``_Embedded``/``_Remote``), and it always runs on the mailer's own
event loop thread (:class:`postroom.portal.Portal`). ``asend`` awaits it from the caller's
loop; ``send`` blocks on it. So ``send`` works from any thread, from many threads at once,
and from code that is itself inside a running event loop (a Django async view, Jupyter),
and every send of the process shares one group committer (one fsync for many messages).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from postroom import settings as settings_mod
from postroom.envelope import Envelope, validate_address
from postroom.exceptions import ConfigError, MessageError, PostroomError
from postroom.ingress.accept import crlf
from postroom.message import Attachment, Draft, build
from postroom.portal import Portal

# An attachment: a file path, an Attachment, or (filename, content, content type or None).
AttachmentLike = (
    Attachment | str | os.PathLike[str] | tuple[str, bytes] | tuple[str, bytes, str | None]
)
Addresses = str | Iterable[str] | None
SendAt = dt.datetime | float | None
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


# -- checking and normalising what the caller gave -------------------------------------------
def _addresses(value: Addresses, name: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    try:
        out = list(items)
    except TypeError:
        raise MessageError(f"{name} must be an address or a list of addresses, not "
                           f"{type(value).__name__}", code="message.type") from None
    for item in out:
        if not isinstance(item, str):
            raise MessageError(f"{name} must hold address strings, not {type(item).__name__}",
                               code="message.type")
    return [a for a in out if a]


def _strings(value: str | Iterable[str] | None, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value or []
    try:
        out = list(items)
    except TypeError:
        raise MessageError(f"{name} must be a string or a list of strings, not "
                           f"{type(value).__name__}", code="message.type") from None
    if not all(isinstance(v, str) and v for v in out):
        raise MessageError(f"{name} must hold non-empty strings", code="message.type")
    return out


def _mapping(value: Mapping[str, str] | None, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MessageError(f"{name} must be a dict of strings, not {type(value).__name__}",
                           code="message.type")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise MessageError(f"{name} must map strings to strings; {k!r}: {v!r} is not",
                               code="message.type")
    return dict(value)


def _attachment(item: AttachmentLike) -> Attachment:
    if isinstance(item, Attachment):
        if not isinstance(item.content, bytes | bytearray):
            raise MessageError(f"attachment {item.filename!r}: content must be bytes",
                               code="message.attachment")
        return item
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            return Attachment(path.name, path.read_bytes())
        except OSError as err:
            raise MessageError(f"cannot read attachment {path}: {err.strerror}; check the path",
                               code="message.attachment") from err
    if isinstance(item, tuple) and len(item) in (2, 3):
        name, content, *ctype = item
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(name, str) or not isinstance(content, bytes | bytearray):
            raise MessageError("an attachment tuple is (filename, bytes[, content type])",
                               code="message.attachment")
        return Attachment(name, bytes(content), ctype[0] if ctype else None)
    raise MessageError(f"attachments must be file paths, Attachment objects or (filename, "
                       f"bytes, content type) tuples, not {type(item).__name__}",
                       code="message.attachment")


def _send_at(value: SendAt) -> float | None:
    """Epoch seconds; a datetime must say its time zone (a naive one is ambiguous)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise MessageError("send_at must be timezone-aware (e.g. datetime.now(UTC) + "
                               "timedelta(hours=1)) or epoch seconds", code="message.send_at")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MessageError(f"send_at must be an aware datetime or epoch seconds, not {value!r}",
                           code="message.send_at")
    return float(value)


def _digest(parts: Any) -> str:
    """A stable hash of a request, for Idempotency-Key: the same key with a different message
    is a conflict, never a silent second message."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _raw_bytes(raw: bytes | str) -> bytes:
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes | bytearray):
        raise MessageError(f"raw must be the MIME message as bytes, not {type(raw).__name__}",
                           code="message.type")
    # The store keeps CRLF line ends (RFC 5322), whatever the caller's platform wrote; a
    # bare CR is refused at intake (ingress.accept).
    raw = crlf(bytes(raw))
    if not _HEADER_LINE.match(raw):
        raise MessageError("raw does not start with a header field (\"Name: value\"); pass a "
                           "whole RFC 5322 message: headers, a blank line, the body",
                           code="message.malformed")
    return raw


@dataclass(slots=True)
class _Options:
    """What every kind of send may carry besides the message."""

    connection: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    send_at: float | None = None
    idempotency_key: str | None = None

    @classmethod
    def make(
        cls,
        connection: str | None,
        tags: str | Iterable[str] | None,
        metadata: Mapping[str, str] | None,
        send_at: SendAt,
        idempotency_key: str | None,
    ) -> _Options:
        if connection is not None and (not isinstance(connection, str) or not connection):
            raise MessageError("connection must be a connection's name", code="message.type")
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and _IDEMPOTENCY_KEY.fullmatch(idempotency_key)
        ):
            # The HTTP API's rule (it travels in a header), kept for both modes alike.
            raise MessageError("idempotency_key must be 1-255 printable ASCII characters, "
                               f"e.g. 'order-42'; got {idempotency_key!r}",
                               code="message.idempotency_key")
        return cls(connection, _strings(tags, "tags"), _mapping(metadata, "metadata"),
                   _send_at(send_at), idempotency_key)

    def parts(self) -> dict[str, Any]:
        return {"connection": self.connection, "tags": self.tags, "metadata": self.metadata,
                "send_at": self.send_at}


@dataclass(slots=True)
class _Outgoing:
    """One send(), checked and normalised (attachments read), the same for both modes."""

    from_: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    subject: str
    text: str | None
    html: str | None
    attachments: list[Attachment]
    headers: dict[str, str]
    opts: _Options

    def draft(self) -> Draft:
        return Draft(from_=self.from_, to=self.to, cc=self.cc, bcc=self.bcc,
                     reply_to=self.reply_to, subject=self.subject, text=self.text,
                     html=self.html, attachments=self.attachments, headers=self.headers)

    def digest(self) -> str:
        return _digest({
            "from": self.from_, "to": self.to, "cc": self.cc, "bcc": self.bcc,
            "reply_to": self.reply_to, "subject": self.subject, "text": self.text,
            "html": self.html, "headers": self.headers, **self.opts.parts(),
            "attachments": [[a.filename, hashlib.sha256(a.content).hexdigest(),
                             a.content_type, a.content_id] for a in self.attachments],
        })


# -- the two backends (the async core) ---------------------------------------------------------
class _Backend(Protocol):
    def start(self) -> None: ...
    async def send(self, out: _Outgoing) -> str: ...
    async def send_raw(self, raw: bytes, sender: str, rcpts: list[str], opts: _Options) -> str: ...
    async def aclose(self) -> None: ...
    def forget(self) -> None: ...


# SQLite checkpoints the WAL into the database inside the commit that makes the WAL pass
# this many pages (default 1000, ~4 MB). That commit then takes 3-10 ms instead of ~0.4 ms:
# with the default, about one send in 80 paid it, which alone set the p99 of send(). Less
# often means fewer, larger checkpoints that write each hot page (indexes, the table's last
# leaf) once instead of several times; the WAL may grow to ~40 MB. `postroom serve` and
# `postroom worker` keep the default, so with a server running, most checkpoints happen in
# its commits.
WAL_AUTOCHECKPOINT_PAGES = 10_000


def _checkpoint_less_often(engine: Any) -> None:
    from sqlalchemy import event

    def pragma(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")

    event.listen(engine, "connect", pragma)
    engine.dispose()  # the connections opened while migrating were made without it


class _Embedded:
    """Writes into the local store. ``start`` opens it (on the portal, at first use)."""

    def __init__(self, settings: settings_mod.Settings, app: str | None) -> None:
        from postroom.runtime import Instance

        self.settings = settings
        # Code that opens the store itself is trusted: Mailer(app=...) names the owner.
        self.app = app
        self.source = f"python:{app or 'embedded'}"
        self._make = Instance
        self.inst: Any = None

    def start(self) -> None:
        if self.inst is None:
            from postroom.queue.commit import GroupCommitter

            inst = self._make(self.settings)
            if inst.engine.url.get_backend_name() == "sqlite":
                _checkpoint_less_often(inst.engine)
            # The portal's loop only ever writes for this Mailer: commit on it directly.
            inst.queue.writer = GroupCommitter(inst.engine, inline=True)
            self.inst = inst

    def _check(self, env: Envelope) -> None:
        """The one intake path (ingress.accept); a registered app's limits apply too."""
        intake = self.inst.intake
        env.app = self.app
        intake.check(env, None if self.app is None else self.inst.apps.policy(self.app))

    async def _enqueue(self, env: Envelope, opts: _Options, digest: Callable[[], str]) -> str:
        from postroom.queue.sql import IdempotencyKey

        self._check(env)
        key = opts.idempotency_key
        idem = (IdempotencyKey(self.app or "embedded", key, digest()) if key is not None
                else None)
        msg_id: str = await self.inst.queue.enqueue(env, idempotency=idem)
        return msg_id

    async def send(self, out: _Outgoing) -> str:
        o = out.opts
        env = build(out.draft(), source=self.source, connection=o.connection, tags=o.tags,
                    metadata=o.metadata, not_before=o.send_at,
                    max_size=self.settings.server.max_message_size)
        return await self._enqueue(env, o, out.digest)

    async def send_raw(self, raw: bytes, sender: str, rcpts: list[str], opts: _Options) -> str:
        for addr in (sender, *rcpts):
            validate_address(addr)
        if not rcpts:
            raise MessageError("a message needs at least one recipient",
                               code="message.no_recipients")
        env = Envelope(sender, list(dict.fromkeys(rcpts)), raw, source=self.source,
                       connection=opts.connection, tags=opts.tags, metadata=opts.metadata,
                       not_before=opts.send_at)
        return await self._enqueue(env, opts, lambda: _digest({
            "raw": hashlib.sha256(raw).hexdigest(), "sender": sender, "recipients": rcpts,
            **opts.parts()}))

    async def deliver_due(self, limit: int) -> int:
        """Deliver messages that are due now from this process, as a worker would (routes,
        fallbacks, policy, attempts in the log); at most ``limit``. How many were tried."""
        import asyncio

        inst = self.inst
        transports = inst.transports()
        worker = inst.worker(transports)
        done = 0
        try:
            while done < limit:
                batch = min(limit - done, self.settings.delivery.concurrency)
                claimed = await inst.queue.claim(worker.owner, batch,
                                                 self.settings.delivery.lease_seconds)
                if not claimed:
                    break
                await asyncio.gather(*(worker.deliver(m) for m in claimed))
                done += len(claimed)
        finally:
            for t in transports.values():
                await t.aclose()
        return done

    async def aclose(self) -> None:
        if self.inst is not None:
            await self.inst.queue.writer.aclose()
            self.inst.close()
            self.inst = None

    def forget(self) -> None:
        # In a forked child: the parent's pooled SQLite connections must be neither used nor
        # closed here (SQLAlchemy's advice for engines crossing fork()).
        if self.inst is not None:
            self.inst.engine.dispose(close=False)
            self.inst = None


class _Remote:
    """Through the HTTP API of a Postroom server (``postroom.client.AsyncClient``)."""

    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        self.url, self.api_key, self.timeout = url, api_key, timeout
        self.client: Any = None

    def start(self) -> None:
        if self.client is None:
            from postroom.client import AsyncClient

            self.client = AsyncClient(self.url, self.api_key, timeout=self.timeout)

    async def send(self, out: _Outgoing) -> str:
        o = out.opts
        payload: dict[str, Any] = {
            "from": out.from_, "to": out.to, "cc": out.cc, "bcc": out.bcc,
            "reply_to": out.reply_to, "subject": out.subject, "text": out.text,
            "html": out.html, "headers": out.headers, "tags": o.tags, "metadata": o.metadata,
            "attachments": [
                {"filename": a.filename, "content": base64.b64encode(a.content).decode(),
                 "content_type": a.content_type, "content_id": a.content_id}
                for a in out.attachments
            ],
        }
        if o.connection is not None:
            payload["connection"] = o.connection
        if o.send_at is not None:
            payload["send_at"] = o.send_at
        msg_id: str = await self.client.send(payload, idempotency_key=o.idempotency_key)
        return msg_id

    async def send_raw(self, raw: bytes, sender: str, rcpts: list[str], opts: _Options) -> str:
        if opts.metadata:
            raise MessageError("metadata cannot be sent with a raw message over the HTTP API; "
                               "put it in a header, or use send()", code="message.metadata")
        msg_id: str = await self.client.send_raw(
            raw, sender, rcpts, connection=opts.connection, tags=opts.tags,
            send_at=opts.send_at, idempotency_key=opts.idempotency_key)
        return msg_id

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def forget(self) -> None:
        self.client = None  # its sockets belong to the parent process


@dataclass(slots=True)
class _Runtime:
    portal: Portal
    backend: _Backend


# Mailers with a running thread, closed at interpreter exit: a script that never calls
# close() still ends with its store closed cleanly, without asyncio's "Task was destroyed
# but it is pending" on its way out.
_open: weakref.WeakSet[Mailer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for mailer in list(_open):
        with contextlib.suppress(Exception):
            mailer.close()


# -- the public class ------------------------------------------------------------------------
class Mailer:
    """Send mail through Postroom; see the module docstring. Thread-safe; close it when done
    (``close()``/``aclose()``, or ``with``/``async with``)."""

    def __init__(
        self,
        *,
        config: str | os.PathLike[str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        app: str | None = None,
        default_from: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Embedded mode: ``config`` (default: found like the CLI finds it) and ``app``, the
        name the log shows as the source ("python:APP", default "python:embedded").
        Remote mode: ``url`` of a Postroom server's HTTP listener and the app's ``api_key``
        ("NAME.SECRET", printed by ``postroom app add NAME``). ``default_from`` is used when
        a send gives no ``from_``."""
        self.default_from = default_from
        self._lock = threading.Lock()
        self._rt: _Runtime | None = None
        self._closed = False
        self._backend: Any
        if url is not None:
            if config is not None or app is not None:
                raise ConfigError("give either url= and api_key= (remote mode) or config= and "
                                  "app= (embedded mode), not both", code="mailer.mode")
            if not api_key:
                raise ConfigError("remote mode needs api_key=\"NAME.SECRET\" (printed by "
                                  "`postroom app add NAME`)", code="mailer.api_key")
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"url {url!r} must start with http:// or https://, e.g. "
                                  "http://127.0.0.1:8025", code="mailer.url")
            self.mode = "remote"
            self._backend = lambda: _Remote(url, api_key, timeout)
            return
        if api_key is not None:
            raise ConfigError("api_key is for remote mode: add url= (the server's HTTP "
                              "address), or drop api_key for embedded mode", code="mailer.mode")
        settings = settings_mod.load(None if config is None else Path(config))
        if settings.config_path is None:
            from postroom import config_load

            places = ", ".join(str(p) for p in config_load.search_path(os.environ))
            raise ConfigError(
                f"no postroom.toml found (looked in {places}); run `postroom serve` once to "
                "create one, or pass Mailer(config=PATH) or Mailer(url=..., api_key=...)",
                code="config.missing")
        if app is not None:
            from postroom.apps import check_name

            check_name(app)
        self.mode = "embedded"
        self._backend = lambda: _Embedded(settings, app)

    # -- the runtime: one portal and one backend per process ------------------------------------
    def _runtime(self) -> _Runtime:
        rt = self._rt
        if rt is not None and rt.portal.pid == os.getpid():
            return rt
        with self._lock:
            if self._closed:
                raise PostroomError("this Mailer is closed; create a new one",
                                    code="mailer.closed")
            rt = self._rt
            if rt is None or rt.portal.pid != os.getpid():
                if rt is not None:  # forked: the parent's thread did not come along
                    rt.backend.forget()
                rt = self._rt = _Runtime(Portal(), self._backend())
                _open.add(self)
            return rt

    @staticmethod
    async def _core_send(rt: _Runtime, out: _Outgoing) -> str:
        rt.backend.start()
        return await rt.backend.send(out)

    @staticmethod
    async def _core_raw(
        rt: _Runtime, raw: bytes, sender: str, rcpts: list[str], opts: _Options
    ) -> str:
        rt.backend.start()
        return await rt.backend.send_raw(raw, sender, rcpts, opts)

    def _outgoing(
        self, from_: str | None, to: Addresses, cc: Addresses, bcc: Addresses,
        reply_to: Addresses, subject: str, text: str | None, html: str | None,
        attachments: Sequence[AttachmentLike] | None, headers: Mapping[str, str] | None,
        opts: _Options,
    ) -> _Outgoing:
        sender = from_ or self.default_from
        if not sender:
            raise MessageError("from_ is required (or create the Mailer with default_from=)",
                               code="message.no_from")
        for name, value in (("from_", sender), ("subject", subject)):
            if not isinstance(value, str):
                raise MessageError(f"{name} must be a string", code="message.type")
        for name, body in (("text", text), ("html", html)):
            if body is not None and not isinstance(body, str):
                raise MessageError(f"{name} must be a string", code="message.type")
        if isinstance(attachments, str | os.PathLike | Attachment | tuple):
            attachments = [attachments]
        return _Outgoing(
            sender, _addresses(to, "to"), _addresses(cc, "cc"), _addresses(bcc, "bcc"),
            _addresses(reply_to, "reply_to"), subject, text, html,
            [_attachment(a) for a in attachments or ()], _mapping(headers, "headers"), opts,
        )

    # -- sending ------------------------------------------------------------------------------
    def send(
        self,
        *,
        from_: str | None = None,
        to: Addresses = None,
        cc: Addresses = None,
        bcc: Addresses = None,
        reply_to: Addresses = None,
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        attachments: Sequence[AttachmentLike] | None = None,
        headers: Mapping[str, str] | None = None,
        tags: str | Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        connection: str | None = None,
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Compose a message and queue it; returns its id once it is stored.

        Addresses are "addr" or "Name <addr>" (one string or a list). ``html`` alone gets a
        text part derived from it. ``attachments``: file paths, :class:`Attachment` objects
        (with ``content_id`` for inline images) or (filename, bytes, content type) tuples.
        ``connection`` pins delivery to one named connection; ``send_at`` (an aware
        datetime or epoch seconds) holds it back until then; ``idempotency_key``: sending
        again with the same key returns the first message's id and queues nothing.
        Raises MessageError (bad input), ConfigError, StoreError or CredentialsError."""
        opts = _Options.make(connection, tags, metadata, send_at, idempotency_key)
        out = self._outgoing(from_, to, cc, bcc, reply_to, subject, text, html, attachments,
                             headers, opts)
        rt = self._runtime()
        return rt.portal.call(self._core_send(rt, out))

    async def asend(
        self,
        *,
        from_: str | None = None,
        to: Addresses = None,
        cc: Addresses = None,
        bcc: Addresses = None,
        reply_to: Addresses = None,
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        attachments: Sequence[AttachmentLike] | None = None,
        headers: Mapping[str, str] | None = None,
        tags: str | Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        connection: str | None = None,
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        """:meth:`send` for asyncio code."""
        opts = _Options.make(connection, tags, metadata, send_at, idempotency_key)
        out = self._outgoing(from_, to, cc, bcc, reply_to, subject, text, html, attachments,
                             headers, opts)
        rt = self._runtime()
        return await rt.portal.acall(self._core_send(rt, out))

    def send_raw(
        self,
        raw: bytes | str,
        sender: str,
        recipients: str | Iterable[str],
        *,
        connection: str | None = None,
        tags: str | Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Queue a ready RFC 5322 message as it is, with this envelope; returns its id."""
        opts = _Options.make(connection, tags, metadata, send_at, idempotency_key)
        data, rcpts = _raw_bytes(raw), _addresses(recipients, "recipients")
        rt = self._runtime()
        return rt.portal.call(self._core_raw(rt, data, sender, rcpts, opts))

    async def asend_raw(
        self,
        raw: bytes | str,
        sender: str,
        recipients: str | Iterable[str],
        *,
        connection: str | None = None,
        tags: str | Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        """:meth:`send_raw` for asyncio code."""
        opts = _Options.make(connection, tags, metadata, send_at, idempotency_key)
        data, rcpts = _raw_bytes(raw), _addresses(recipients, "recipients")
        rt = self._runtime()
        return await rt.portal.acall(self._core_raw(rt, data, sender, rcpts, opts))

    # -- delivering from this process --------------------------------------------------------
    def deliver_due(self, limit: int = 1000) -> int:
        """Embedded mode: deliver the messages that are due now from this process, through
        the configured connections, and return how many were tried (the outcome of each is
        in the log). For scripts that run no ``postroom serve``/``postroom worker``, and for
        tests with ``transport = "memory"`` or ``"capture"`` connections."""
        rt = self._runtime()
        return rt.portal.call(self._core_deliver(rt, limit))

    async def adeliver_due(self, limit: int = 1000) -> int:
        """:meth:`deliver_due` for asyncio code."""
        rt = self._runtime()
        return await rt.portal.acall(self._core_deliver(rt, limit))

    @staticmethod
    async def _core_deliver(rt: _Runtime, limit: int) -> int:
        if not isinstance(rt.backend, _Embedded):
            raise ConfigError("deliver_due() is for embedded mode: in remote mode the server "
                              "delivers", code="mailer.mode")
        rt.backend.start()
        return await rt.backend.deliver_due(limit)

    # -- closing ------------------------------------------------------------------------------
    def _take(self) -> _Runtime | None:
        with self._lock:
            self._closed = True
            rt, self._rt = self._rt, None
            _open.discard(self)
        return rt if rt is not None and rt.portal.pid == os.getpid() else None

    def close(self) -> None:
        """Finish pending writes, close the store or HTTP connections, stop the thread."""
        rt = self._take()
        if rt is not None:
            try:
                rt.portal.call(rt.backend.aclose())
            finally:
                rt.portal.stop()

    async def aclose(self) -> None:
        """:meth:`close` for asyncio code."""
        import asyncio

        rt = self._take()
        if rt is not None:
            try:
                await rt.portal.acall(rt.backend.aclose())
            finally:
                await asyncio.to_thread(rt.portal.stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<postroom.Mailer {self.mode}{' closed' if self._closed else ''}>"
