"""The transport interface: ``send``, ``check``, ``aclose`` — and what ``send`` returns.

A transport delivers one message once. It never retries (the queue does) and reports
per-recipient results; a failure of the whole session is raised as a DeliveryError.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from postroom.envelope import Envelope
from postroom.secrets import Secret, resolve, secret_name
from postroom.settings import ConnectionBase

if TYPE_CHECKING:
    from postroom.webhooks.base import Webhook


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
    # The provider's id for the message: an HTTPS API's message id, or the queue id an SMTP
    # server named in its final 250 reply. Kept on the attempt row; delivery events
    # (webhooks) find the message by it.
    provider_id: str | None = None


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
    """One kind of upstream. A concrete class names its settings model and is listed in
    ``postroom.transports.REGISTRY`` (never found by name through reflection)."""

    settings_model: ClassVar[type[ConnectionBase]]
    title: ClassVar[str] = "provider"  # the upstream in the user's words ("Postmark")
    docs_url: ClassVar[str] = ""  # the provider's API documentation
    # The provider's delivery events (postroom.webhooks), for HTTPS API providers that send them.
    webhook: ClassVar[type[Webhook] | None] = None
    # The keys a sample [[connections]] entry sets besides name and transport (the README's
    # provider table is generated from these: postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {}
    example_notes: ClassVar[Mapping[str, str]] = {}  # key -> a comment beside it

    def __init__(self, settings: ConnectionBase, ctx: TransportContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.name = settings.name

    def secret(self, key: str, what: Secret, *, env: str | None, file: Path | None,
               inline: str | None = None) -> str | None:
        """This connection's secret ``key`` from ``{key}_env``, ``{key}_file``, the value in
        the configuration, or the one stored encrypted (postroom.secrets.resolve). The
        database is asked only when nothing else is configured."""
        stored = inline
        if not env and file is None and inline is None:
            stored = self.ctx.stored_secret(secret_name(self.name, what))
        return resolve(f"connection {self.name}", key, env=env, file=file, stored=stored)

    @abc.abstractmethod
    async def send(self, envelope: Envelope) -> DeliveryResult:
        """Deliver once to ``envelope.recipients``."""

    async def check(self) -> str:
        """Connect and authenticate without sending; return a transcript. Raises on failure."""
        return ""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Close pooled sessions (graceful shutdown)."""
