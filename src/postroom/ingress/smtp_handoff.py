"""Hand one message to a running Postroom over SMTP (``[sendmail] server``).

For users who cannot write the data folder (PHP as www-data): the listener stores the message
and says "250 queued" only once it is on disk, so a 250 here means the same as a commit in
store mode. All or nothing: if any recipient is refused, the transaction is abandoned and the
whole message fails, exactly as it would in store mode.

Errors come back as Postroom's own (``ConfigError``, ``AuthError``, ``DeliveryError`` with
``permanent`` from the reply class) for the sendmail command to turn into exit codes.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.config_values import parse_smtp_url
from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConfigError,
    ConnectError,
    DeliveryError,
    ProtocolError,
    SenderRejected,
    TLSError,
    UnsupportedFeature,
)

if TYPE_CHECKING:
    import smtplib
    import ssl

    from postroom.ingress.sendmail_settings import SendmailView
    from postroom.settings import SendmailSettings

    # [sendmail] as the models give it, or as postroom-sendmail's light loader does.
    SendmailConfig = SendmailSettings | SendmailView

RECIPIENT_REFUSED = "recipient.rejected"


def _password(cfg: SendmailConfig, environ: Mapping[str, str],
              resolve: Callable[[Path], Path]) -> str:
    from postroom.secrets import resolve as resolve_secret

    file = resolve(cfg.password_file) if cfg.password_file is not None else None
    try:  # SendmailSettings requires password_env or password_file
        secret = resolve_secret("sendmail", "password", env=cfg.password_env, file=file,
                                stored=None, environ=environ)
    except AuthError as err:  # before any connection: this machine's configuration
        raise ConfigError(err.message, code="config.sendmail.password") from err
    return secret or ""


def _tls_context(cfg: SendmailConfig, resolve: Callable[[Path], Path]) -> ssl.SSLContext:
    import ssl

    cafile = str(resolve(cfg.ca_file)) if cfg.ca_file else None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"sendmail.ca_file: cannot use {cafile}: {err}",
                          code="config.sendmail.ca_file") from err
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _reply(what: str, code: int, text: bytes, *, kind: type[DeliveryError] = DeliveryError,
           err_code: str | None = None) -> DeliveryError:
    return kind.from_reply(what, code, text.decode("utf-8", "replace"), code=err_code)


def _session(client: smtplib.SMTP, cfg: SendmailConfig, env: Envelope, *, tls: bool,
             host: str, password: str, ctx: ssl.SSLContext | None) -> str:
    client.ehlo_or_helo_if_needed()
    if cfg.starttls and not tls:
        if not client.has_extn("starttls"):
            raise TLSError(f"{cfg.server} does not offer STARTTLS (sendmail.starttls = true)")
        client.starttls(context=ctx)
        client.ehlo()
        tls = True
    if cfg.username:
        if not tls and not _loopback(host):
            raise ConfigError("sendmail: the password would cross the network unencrypted; "
                              "set starttls = true or use an smtps:// server",
                              code="config.sendmail.tls")
        client.login(cfg.username, password)
    options = []
    if env.smtputf8:
        if not client.has_extn("smtputf8"):
            raise UnsupportedFeature(f"{cfg.server} does not offer SMTPUTF8, which the "
                                     "non-ASCII addresses of this message need")
        options.append("SMTPUTF8")
    if client.has_extn("8bitmime") and not env.raw.isascii():
        options.append("BODY=8BITMIME")
    code, text = client.mail(env.sender, options)
    if code != 250:
        raise _reply(f"MAIL FROM:<{env.sender}>", code, text, kind=SenderRejected)
    for rcpt in env.recipients:
        code, text = client.rcpt(rcpt)
        if code not in (250, 251):
            raise _reply(f"RCPT TO:<{rcpt}>", code, text, err_code=RECIPIENT_REFUSED)
    code, text = client.data(env.raw)
    if code != 250:
        raise _reply("end of data", code, text)
    return text.decode("utf-8", "replace")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def hand_off(cfg: SendmailConfig, env: Envelope, *, ehlo_name: str,
             resolve: Callable[[Path], Path], environ: Mapping[str, str] | None = None) -> str:
    """Send ``env`` to ``cfg.server``; return the server's final reply ("2.0.0 queued as
    ...")."""
    import smtplib
    import ssl

    scheme, host, port = parse_smtp_url(cfg.server)
    password = _password(cfg, os.environ if environ is None else environ, resolve) \
        if cfg.username else ""
    implicit = scheme == "smtps"
    ctx = _tls_context(cfg, resolve) if implicit or cfg.starttls else None
    where = f"{cfg.server} (sendmail.server)"
    try:
        # local_hostname given: smtplib would otherwise ask DNS for this machine's FQDN.
        client = (smtplib.SMTP_SSL(host, port, local_hostname=ehlo_name, timeout=cfg.timeout,
                                   context=ctx) if implicit else
                  smtplib.SMTP(host, port, local_hostname=ehlo_name, timeout=cfg.timeout))
        with client:
            return _session(client, cfg, env, tls=implicit, host=host, password=password,
                            ctx=ctx)
    except smtplib.SMTPAuthenticationError as err:
        raise AuthError(f"{where} refused the credentials of app {cfg.username!r}: "
                        f"{err.smtp_code} {_text(err.smtp_error)}; check sendmail.username "
                        "and its password", permanent=True) from err
    except smtplib.SMTPNotSupportedError as err:
        raise ProtocolError(f"{where}: {err}", permanent=True) from err
    except smtplib.SMTPResponseException as err:
        raise _reply(where, err.smtp_code, _text(err.smtp_error).encode()) from err
    except smtplib.SMTPServerDisconnected as err:
        raise ProtocolError(f"{where} closed the connection: {err}") from err
    except smtplib.SMTPException as err:
        raise ProtocolError(f"{where}: {err}") from err
    except ssl.SSLError as err:
        raise TLSError(f"TLS with {where} failed: {err}") from err
    except OSError as err:
        raise ConnectError(f"cannot reach {where}: {err.strerror or err}; is `postroom serve` "
                           "running there?") from err
