"""The transport interface: ``send``, ``check``, ``aclose`` — and what ``send`` returns.

A transport delivers one message once. It never retries (the queue does) and reports
per-recipient results; a failure of the whole session is raised as a DeliveryError.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from postroom.envelope import Envelope
from postroom.settings import ConnectionBase


@dataclass(frozen=True, slots=True)
class RecipientResult:
    code: int
    reply: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass(slots=True)
class DeliveryResult:
    """What the upstream said about each recipient of one attempt."""

    recipients: dict[str, RecipientResult]
    transcript: str = ""
    reply_code: int | None = None  # the final (end of DATA) reply, if DATA was sent
    reply_text: str | None = None


class TokenProvider(Protocol):
    """Gives an OAuth 2.0 access token for a connection (XOAUTH2 / OAUTHBEARER)."""

    def token(self, connection: str, *, refresh: bool = False,
              rejected: str | None = None) -> str:
        """``refresh=True``: the server refused ``rejected`` (the token last handed out for
        this session); give another, refreshing unless someone already did."""
        ...


@dataclass(frozen=True)
class TransportContext:
    """What a transport may ask of the rest of Postroom."""

    ehlo_name: str
    # Looks up a secret stored encrypted in the database (None if there is none).
    stored_secret: Callable[[str], str | None] = field(default=lambda _name: None)
    tokens: TokenProvider | None = None


class Transport(abc.ABC):
    def __init__(self, settings: ConnectionBase, ctx: TransportContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.name = settings.name

    @abc.abstractmethod
    async def send(self, envelope: Envelope) -> DeliveryResult:
        """Deliver once to ``envelope.recipients``."""

    async def check(self) -> str:
        """Connect and authenticate without sending; return a transcript. Raises on failure."""
        return ""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Close pooled sessions (graceful shutdown)."""
