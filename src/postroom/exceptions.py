"""Postroom's one exception tree.

Every error Postroom raises is a :class:`PostroomError`. Each carries a stable ``code``
(used in logs, the API, the CLI and the advice catalog) and ``permanent``: ``True`` means
retrying the same thing cannot help (fail the message), ``False`` means a later try may
succeed (defer it). Foreign exceptions are mapped at the boundary and chained ``from err``.

::

    PostroomError
    ├── ConfigError                  bad configuration value (names the key and the fix)
    ├── StoreError                   the database failed
    ├── MessageError                 a message or address we cannot accept as given
    │   └── IntakeError              refused at intake (ingress.accept): says how each door
    │                                answers (SMTP reply, HTTP status, when to retry)
    ├── CredentialsError             an app's credentials were refused (HTTP API key)
    ├── PermissionDenied             an admin account's role does not allow the action
    ├── EventError                   a delivery event (webhook, DSN) that cannot be taken
    │   └── EventRefused             its signature is missing, wrong or replayed
    ├── AlertError                   an alert channel did not take an alert (postroom.alerts)
    ├── InstallError                 setting up the system failed (postroom.system: service
    │                                user, unit files, the system's sendmail)
    └── DeliveryError                one delivery attempt failed
        ├── ConnectError             DNS, refused, unreachable, connect timeout
        ├── TimeoutError_            the server stopped answering mid-session
        ├── TLSError                 handshake or certificate verification failed
        ├── AuthError                credentials rejected or mechanism unusable
        ├── SenderRejected           MAIL FROM refused
        ├── DataRejected             the message cannot be sent as it is (e.g. over SIZE)
        ├── ProtocolError            the server spoke something we do not understand
        └── UnsupportedFeature       the message needs something the server lacks (SMTPUTF8)

A :class:`DeliveryError` also says what it is *about* (``scope``, a :class:`Scope`): the
message, the connection's configuration, or the connection right now.
``postroom.routing.chain`` turns that into what happens next (fail, hold, fall back).
"""

from __future__ import annotations

import enum


class Scope(enum.Enum):
    """What a delivery failure is about; ``routing.chain`` holds the one rule for each."""

    MESSAGE = "message"  # the message or its recipients: the same on any connection
    CONFIGURATION = "configuration"  # this connection is set up wrong (credentials, TLS...)
    CONNECTION = "connection"  # this connection or its server, now (network, busy, refusal)


class PostroomError(Exception):
    """Base of every Postroom error."""

    code: str = "error"
    permanent: bool = True

    def __init__(
        self, message: str, *, code: str | None = None, permanent: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if permanent is not None:
            self.permanent = permanent

    def __str__(self) -> str:
        return self.message


class ConfigError(PostroomError):
    """A configuration value is missing or wrong; the message says which key and the fix."""

    code = "config"


class StoreError(PostroomError):
    """The message store (database) failed."""

    code = "store"
    permanent = False


class MessageError(PostroomError):
    """A message, address or header that cannot be accepted as given."""

    code = "message.invalid"


class IntakeError(MessageError):
    """A door refuses a message (postroom.ingress.accept). Every door answers the same
    refusal the same way: ``smtp`` is the SMTP reply code and enhanced status ("552 5.3.4"),
    ``http`` the HTTP status; ``retry_after`` (seconds) is set for a temporary refusal."""

    code = "message.refused"

    def __init__(self, message: str, fix: str = "correct the message", *,
                 code: str | None = None, smtp: str = "554 5.6.0", http: int = 422,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{message}; {fix}", code=code, permanent=retry_after is None)
        self.problem = message
        self.fix = fix
        self.smtp = smtp
        self.http = http
        self.retry_after = retry_after

    @property
    def smtp_reply(self) -> str:
        return f"{self.smtp} {self.message}"


class CredentialsError(PostroomError):
    """Postroom refused the credentials an app presented (a missing or unknown API key)."""

    code = "auth.credentials"


class PermissionDenied(PostroomError):
    """The admin account (session, API token or command) may not do this: its role is too
    low (postroom.ops.require). Pages answer 403, the admin API 403 with this code."""

    code = "admin.forbidden"


class EventError(PostroomError):
    """A delivery event (a provider's webhook request, a DSN) that cannot be taken as sent:
    too big, malformed, of no known shape. ``status``: the HTTP answer (postroom.webhooks)."""

    code = "event.invalid"
    status = 400


class EventRefused(EventError):
    """A delivery event whose signature (or webhook password) is missing, wrong, too old or
    replayed. The sender is told nothing more than 401 (postroom.webhooks.verify)."""

    code = "event.refused"
    status = 401


class AlertError(PostroomError):
    """An alert channel (webhook, Apprise URL...) did not take an alert. ``permanent``: it
    never will as configured (404/410, an unusable URL): the channel is disabled."""

    code = "alert.channel"
    permanent = False


class InstallError(PostroomError):
    """`postroom install-service` or `install-sendmail` could not change the system: not
    root, a tool that failed, a file in the way (postroom.system). Says what to do instead."""

    code = "install"


class DeliveryError(PostroomError):
    """One delivery attempt failed as a whole. ``reply_code``/``reply_text`` hold the server's
    answer. (Refusals of single recipients are not errors: the transport reports them per
    recipient, see transports.base.DeliveryResult.)"""

    code = "delivery"
    permanent = False
    scope = Scope.CONNECTION

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        permanent: bool | None = None,
        reply_code: int | None = None,
        reply_text: str | None = None,
        scope: Scope | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, permanent=permanent)
        if scope is not None:
            self.scope = scope
        self.reply_code = reply_code
        self.reply_text = reply_text
        # Seconds the upstream asked to wait (a 429/503 Retry-After, RFC 9110 section 10.2.3),
        # clamped to [1, 3600]: routing.health holds the connection that long.
        self.retry_after = retry_after
        # Filled in by the transport: the session so far (secrets redacted), and whether
        # the message data had been sent when it failed (an ambiguous outcome).
        self.transcript = ""
        self.after_data = False

    @classmethod
    def from_reply(
        cls, what: str, reply_code: int, reply_text: str, *, code: str | None = None
    ) -> DeliveryError:
        """Build an error from an SMTP reply: 5xx is permanent, anything else transient."""
        return cls(
            f"{what}: {reply_code} {reply_text}",
            code=code,
            permanent=500 <= reply_code < 600,
            reply_code=reply_code,
            reply_text=reply_text,
        )


class ConnectError(DeliveryError):
    code = "connect"


class TimeoutError_(DeliveryError):
    code = "timeout"


class TLSError(DeliveryError):
    code = "tls"
    scope = Scope.CONFIGURATION


class AuthError(DeliveryError):
    code = "auth"
    scope = Scope.CONFIGURATION


class SenderRejected(DeliveryError):
    code = "sender.rejected"


class DataRejected(DeliveryError):
    code = "data.rejected"
    scope = Scope.MESSAGE


class ProtocolError(DeliveryError):
    code = "protocol"


class UnsupportedFeature(DeliveryError):
    code = "unsupported"
    permanent = True
