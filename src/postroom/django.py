"""Django email backend: ``EMAIL_BACKEND = "postroom.django.EmailBackend"``.

Everything Django composes (``EmailMessage``, ``EmailMultiAlternatives``, attachments,
``send_mail``, ``send_mass_mail``, ``mail_admins``) is handed to Postroom exactly as Django
built it (``message.message()``), with the envelope Django's SMTP backend would use
(``from_email`` and ``message.recipients()``, Bcc included). Install with
``pip install postroom[django]``. Settings (all optional)::

    POSTROOM = {
        "config": "/etc/postroom/postroom.toml",  # embedded mode (default: found like the CLI)
        "app": "shop",                            # the log shows source "python:shop"
        # or remote mode, through a Postroom server's HTTP API:
        # "url": "http://127.0.0.1:8025", "api_key": "shop.SECRET",
        "connection": None,                       # pin every message to one connection
        "tags": ["django"],                       # added to every message's tags
    }

A message's own ``tags``, ``metadata`` and ``send_at`` attributes (django-anymail's names)
are honoured too: ``msg.tags = ["welcome"]; msg.metadata = {"user": "42"}``.

This module is named ``postroom.django``; the imports below are absolute (``django.…``),
so they always mean the real Django package.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from email.utils import parseaddr
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import EmailMessage

from postroom.exceptions import MessageError, PostroomError
from postroom.mailer import Mailer

_OPTIONS = ("config", "app", "url", "api_key", "connection", "tags", "timeout")
# One Mailer per distinct configuration, for the whole process: Django makes a new backend
# for every send_mail() call, and a Mailer owns a thread and a database pool.
_mailers: dict[tuple[Any, ...], Mailer] = {}
_mailers_lock = threading.Lock()


def _options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    configured = getattr(django_settings, "POSTROOM", None) or {}
    if not isinstance(configured, Mapping):
        raise ImproperlyConfigured("settings.POSTROOM must be a dict, e.g. "
                                   "POSTROOM = {\"config\": \"/etc/postroom/postroom.toml\"}")
    opts = {**configured, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(f"settings.POSTROOM: unknown key(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(_OPTIONS)}")
    return opts


def shared_mailer(opts: Mapping[str, Any]) -> Mailer:
    """The process's Mailer for these options (made on first use)."""
    key = tuple(str(opts.get(k)) for k in ("config", "app", "url", "api_key", "timeout"))
    with _mailers_lock:
        mailer = _mailers.get(key)
        if mailer is None:
            kwargs = {k: opts[k] for k in ("config", "app", "url", "api_key", "timeout")
                      if opts.get(k) is not None}
            mailer = _mailers[key] = Mailer(**kwargs)
        return mailer


def _address(value: Any, what: str) -> str:
    """The bare address of a Django address string ("Name <a@b>" or "a@b")."""
    if isinstance(value, tuple | list) and len(value) == 2:  # (name, address)
        value = value[1]
    name_addr = parseaddr(str(value))
    if not name_addr[1] or any(c in str(value) for c in "\r\n"):
        raise MessageError(f"invalid {what} address {value!r}", code="address.malformed")
    return name_addr[1]


class EmailBackend(BaseEmailBackend):
    """Queues Django's messages in Postroom. ``open()``/``close()`` (and ``with
    get_connection() as conn``) are cheap: the underlying Mailer is shared by the process."""

    def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
        super().__init__(fail_silently=fail_silently)
        self._overrides = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        self._opts: dict[str, Any] = {}
        self.mailer: Mailer | None = None

    def open(self) -> bool:
        """Get the process's Mailer; True if this call opened it for this backend."""
        if self.mailer is not None:
            return False
        try:
            opts = _options(self._overrides)
            self.mailer = shared_mailer(opts)
        except (PostroomError, ImproperlyConfigured):
            if not self.fail_silently:
                raise
            return False
        self._opts = opts
        return True

    def close(self) -> None:
        # The Mailer stays open for the next connection of this process (it is shared).
        self.mailer = None

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Queue each message; returns how many were queued."""
        if not email_messages:
            return 0
        new = self.open()
        if self.mailer is None:  # could not open, fail_silently
            return 0
        sent = 0
        try:
            for message in email_messages:
                if self._send(message):
                    sent += 1
        finally:
            if new:
                self.close()
        return sent

    def _send(self, message: EmailMessage) -> bool:
        if not message.recipients():
            return False
        assert self.mailer is not None
        try:
            sender = _address(message.from_email, "from")
            rcpts = [_address(r, "recipient") for r in message.recipients()]
            # As Django's SMTP backend does: CRLF line ends, the wire form (RFC 5322).
            mime: Any = message.message()
            raw = mime.as_bytes(linesep="\r\n")
            tags = [*(self._opts.get("tags") or ()), *(getattr(message, "tags", None) or ())]
            self.mailer.send_raw(
                raw, sender, rcpts,
                connection=self._opts.get("connection"),
                tags=tags,
                metadata=getattr(message, "metadata", None) or None,
                send_at=getattr(message, "send_at", None),
            )
        except (PostroomError, ValueError) as err:
            # ValueError: what Django's own composition raises for bad headers/addresses.
            if not self.fail_silently:
                if isinstance(err, ValueError):
                    raise MessageError(f"Django could not compose the message: {err}",
                                       code="message.invalid") from err
                raise
            return False
        return True

