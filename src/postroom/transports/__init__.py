"""Transports: one module per kind, listed in this registry table (never an if/elif over
kinds, never a class found by name through reflection). Each entry names the module and
the :class:`postroom.transports.base.Transport` subclass; the class names its settings
model (``settings_model``, a ConnectionBase subclass: its config keys), its ``title`` and
``docs_url``. Modules are imported when a kind is used, so ``serve`` loads only the
providers its connections need."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from postroom.secrets import Secret
    from postroom.settings import ConnectionBase
    from postroom.transports.base import Transport, TransportContext

# kind -> "module:Class". One line per provider (ADDING_PROVIDERS.md).
REGISTRY: dict[str, str] = {
    "smtp": "postroom.transports.smtp:Transport",
    "memory": "postroom.transports.memory:Transport",
    "capture": "postroom.transports.capture:Transport",
    "gmail": "postroom.transports.gmail:Transport",
    "msgraph": "postroom.transports.msgraph:Transport",
    "postal": "postroom.transports.postal:PostalTransport",
    "postmark": "postroom.transports.postmark:PostmarkTransport",
    "scaleway": "postroom.transports.scaleway:ScalewayTransport",
    "ses": "postroom.transports.ses:SesTransport",
    "sparkpost": "postroom.transports.sparkpost:SparkPostTransport",
    "mailgun": "postroom.transports.mailgun:MailgunTransport",
    "sendgrid": "postroom.transports.sendgrid:SendGridTransport",
    "mailjet": "postroom.transports.mailjet:MailjetTransport",
    "resend": "postroom.transports.resend:ResendTransport",
    "brevo": "postroom.transports.brevo:BrevoTransport",
    "mandrill": "postroom.transports.mandrill:MandrillTransport",
    "smtp2go": "postroom.transports.smtp2go:Smtp2goTransport",
    "elasticemail": "postroom.transports.elasticemail:ElasticEmailTransport",
    "mailersend": "postroom.transports.mailersend:MailerSendTransport",
    "mailtrap": "postroom.transports.mailtrap:MailtrapTransport",
    "zeptomail": "postroom.transports.zeptomail:ZeptoMailTransport",
}


def kinds() -> list[str]:
    """Every transport kind, sorted (for CLIs, the wizard, the docs)."""
    return sorted(REGISTRY)


def transport_class(kind: str, where: str = "connection") -> type[Transport]:
    """The Transport class of ``kind``; ``where`` names the setting for the error."""
    target = REGISTRY.get(kind)
    if target is None:
        raise ConfigError(
            f"{where}.transport = {kind!r} is not a known transport; use one of: "
            f"{', '.join(kinds())}",
            code="config.transport.unknown",
        )
    module, _, name = target.partition(":")
    cls: type[Transport] = getattr(importlib.import_module(module), name)
    return cls


def settings_model(kind: str, where: str) -> type[ConnectionBase]:
    return transport_class(kind, where).settings_model


def create(settings: ConnectionBase, ctx: TransportContext) -> Transport:
    cls = transport_class(settings.transport, f"connection {settings.name!r}")
    return cls(settings, ctx)


def password_secret(conn: ConnectionBase) -> tuple[str, Secret]:
    """What `postroom connection set-password NAME` stores for ``conn``, in words and as a
    secret: an HTTPS API provider's api key, else the (SMTP) password."""
    from postroom.secrets import Secret
    from postroom.transports._settings import ApiKeySettings

    if isinstance(conn, ApiKeySettings):
        return "api key", Secret.API_KEY
    return "password", Secret.PASSWORD
