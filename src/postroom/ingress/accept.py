"""The one intake path: what every door checks before a message is stored.

The SMTP listener, ``postroom-sendmail``, the HTTP API (JSON and raw), the Python
``Mailer`` and the CLI each build an :class:`~postroom.envelope.Envelope` their own way, then
call :meth:`Intake.check` on it. A rule written here holds at every door; a refusal is an
:class:`~postroom.exceptions.IntakeError` that says how each door answers it.

The rules:
- Line ends are CRLF. A bare CR is refused at every door: a provider may read ``\\r.\\r\\n``
  as the end of the data, so one could smuggle a second message past our policy and DKIM
  (SMTP smuggling). A lone LF is refused by the SMTP listener (RFC 5321 2.3.8, as Postfix's
  ``smtpd_forbid_bare_newline``); doors whose clients legitimately write LF-only lines
  (sendmail, the raw API, ``Mailer.send_raw``) turn it into CRLF first (:func:`crlf`).
- No NUL byte (RFC 5322 2.3, RFC 6152); header fields are ASCII or UTF-8 (RFC 6532).
- At most ``server.max_message_size`` bytes and ``server.max_recipients`` recipients, at
  least one; every address well-formed; the envelope sender may be empty (bounces).
- A pinned connection exists.
- The owning app, when a door authenticated one, still exists and is within its limits:
  the envelope sender and every From/Sender address are among its allowed senders, a pinned
  connection among its allowed connections, and its rate is not exceeded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import getaddresses
from typing import TYPE_CHECKING, Protocol

from postroom.envelope import Envelope, field_name, field_text, split_header, validate_address
from postroom.exceptions import IntakeError, MessageError

if TYPE_CHECKING:
    from postroom.apps import AppPolicy, Apps
    from postroom.settings import Settings

_LONE_LF = re.compile(rb"(?<!\r)\n")
_SENDER_FIELDS = ("from", "sender")


def crlf(raw: bytes) -> bytes:
    """Lone LFs as CRLF, for doors whose clients write Unix line ends. A bare CR is left for
    :meth:`Intake.check` to refuse: guessing what it meant is how smuggling works."""
    return _LONE_LF.sub(b"\r\n", raw) if b"\n" in raw else raw


def bare_newline(raw: bytes) -> str | None:
    """What is wrong with the line ends of ``raw`` (None when every one is CRLF)."""
    # Passes of C, faster than a regular expression on big messages: what is left once
    # every CRLF is taken out holds a CR or LF only if one stood alone (counting CRs and LFs
    # one byte at a time took twice as long).
    rest = raw.replace(b"\r\n", b"")
    if b"\r" in rest:
        return "bare CR"
    if b"\n" in rest:
        return "bare LF"
    return None


def too_many(count: int, limit: int) -> IntakeError:
    return IntakeError(f"too many recipients ({count}; at most {limit} per message)",
                       "split the message, or raise server.max_recipients",
                       code="message.too_many_recipients", smtp="452 4.5.3", http=422)


def not_allowed_sender(app: AppPolicy, address: str) -> IntakeError:
    return IntakeError(
        f"app {app.name!r} may not send as {address!r} (allowed: {', '.join(app.senders)})",
        f"use one of those, or allow it with `postroom app set {app.name} --sender ...`",
        code="app.sender_not_allowed", smtp="550 5.7.1", http=403)


def revoked(name: str) -> IntakeError:
    return IntakeError(f"the credentials of app {name!r} were removed or rotated",
                       "authenticate again with the current ones",
                       code="app.revoked", smtp="530 5.7.0", http=401)


def header_addresses(raw: bytes, names: Iterable[str] = _SENDER_FIELDS) -> list[str]:
    wanted = set(names)
    fields, _ = split_header(raw)
    values = [field_text(f) for f in fields if field_name(f) in wanted]
    return [addr for _, addr in getaddresses(values) if addr]


class Limits(Protocol):
    """What the checks read of [server]: settings.ServerSettings, or postroom-sendmail's
    pydantic-free view of it (ingress/sendmail_settings.py)."""

    @property
    def max_message_size(self) -> int: ...

    @property
    def max_recipients(self) -> int: ...


class Intake:
    """The checks, bound to one instance's settings and apps."""

    def __init__(self, server: Limits, connections: Iterable[str],
                 apps: Apps | None = None) -> None:
        self.server = server
        self.connections = frozenset(connections)
        self.apps = apps

    @classmethod
    def of(cls, settings: Settings, apps: Apps | None = None) -> Intake:
        return cls(settings.server, (c.name for c in settings.connections), apps)

    # -- single rules, for doors that can refuse early (SMTP MAIL / RCPT) -------------------
    def check_size(self, size: int) -> None:
        if size > self.server.max_message_size:
            raise IntakeError(
                f"the message is {size:,} bytes; the limit is "
                f"{self.server.max_message_size:,} (server.max_message_size)",
                "send smaller attachments (or links)", code="message.too_large",
                smtp="552 5.3.4", http=413)

    def check_recipient_count(self, count: int) -> None:
        if count > self.server.max_recipients:
            raise too_many(count, self.server.max_recipients)

    def current_app(self, name: str, credential: str | None = None) -> AppPolicy:
        """The app as stored now; refused when it was removed, or (given the credential
        the session authenticated with) rotated since."""
        app = self.apps.policy(name) if self.apps is not None else None
        if app is None or (credential is not None and app.credential != credential):
            raise revoked(name)
        return app

    @staticmethod
    def check_sender(app: AppPolicy | None, address: str) -> None:
        if app is not None and address and not app.may_send_as(address):
            raise not_allowed_sender(app, address)

    # -- the whole message ------------------------------------------------------------------
    def check(self, env: Envelope, app: AppPolicy | None = None, *,
              count_rate: bool = True) -> None:
        """Raise IntakeError (or MessageError for an address) unless ``env`` may be stored.
        ``app``: the authenticated owner (``env.app`` names it); ``count_rate``: False for a
        check whose message is not stored after it (a dry run)."""
        raw = env.raw
        self.check_size(len(raw))
        if b"\0" in raw:
            raise IntakeError("the message contains NUL bytes (RFC 5322 2.3)",
                              "remove them, or encode binary content (base64)", code="message.nul",
                              smtp="554 5.6.0", http=422)
        problem = bare_newline(raw)
        if problem is not None:
            raise IntakeError(f"{problem} in the message",
                              "end every line with CRLF (RFC 5321 2.3.8)",
                              code="message.bare_newline", smtp="550 5.5.2", http=422)
        head = raw.split(b"\r\n\r\n", 1)[0]
        if not head.isascii():
            try:
                head.decode("utf-8")
            except UnicodeDecodeError:
                raise IntakeError("header bytes are not UTF-8",
                                  "encode non-ASCII header text with RFC 2047, or send UTF-8 "
                                  "(RFC 6532)",
                                  code="message.header_charset", smtp="554 5.6.0",
                                  http=422) from None
        if not env.recipients:
            raise IntakeError("the message has no recipient",
                              "give at least one recipient address", code="message.no_recipients",
                              smtp="554 5.5.1", http=422)
        self.check_recipient_count(len(env.recipients))
        validate_address(env.sender, allow_empty=True)
        for rcpt in env.recipients:
            validate_address(rcpt)
        if env.connection is not None and env.connection not in self.connections:
            raise IntakeError(
                f"no connection named {env.connection!r}",
                f"use one of: {', '.join(sorted(self.connections)) or 'none configured'}; or "
                "let routing choose", code="connection.unknown", smtp="550 5.7.1", http=422)
        if app is None:
            return
        if env.app != app.name:
            raise MessageError(f"the message is owned by {env.app!r}, not by the app "
                               f"{app.name!r} that handed it in", code="app.owner")
        self.check_sender(app, env.sender)
        if app.senders:  # else it may send as anyone: the header need not be read
            for address in header_addresses(raw):
                self.check_sender(app, address)
        if env.connection is not None and not app.may_use(env.connection):
            raise IntakeError(
                f"app {app.name!r} may not use connection {env.connection!r} (allowed: "
                f"{', '.join(app.connections)})", "omit it, or allow it with `postroom app "
                f"set {app.name} --connection ...`", code="app.connection_not_allowed",
                smtp="550 5.7.1", http=403)
        if count_rate and self.apps is not None:
            wait = self.apps.rates.take(app)
            if wait is not None:
                raise IntakeError(
                    f"app {app.name!r} is over its rate limit ({app.rate})",
                    f"try again in {wait:.0f} s, or raise it with `postroom app set "
                    f"{app.name} --rate ...`", code="app.rate_limited", smtp="451 4.7.0", http=429,
                    retry_after=wait)
