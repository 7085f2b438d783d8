"""``[[alerts]]``: alert rules, a feature section of postroom.toml (registered through the
``postroom.sections`` entry point, so configurations without alerts never import this).

The least that works is a destination::

    [[alerts]]
    channels = ["ntfy://ntfy.example.com/postroom", "webhook+https://ops.example.com/hook"]
    webhook_secret_env = "ALERT_WEBHOOK_SECRET"
    email = ["ops@example.com"]     # sent by Postroom itself (postroom.alerts.email)
    email_connection = "alerts"     # optional: a connection kept for alerts

Every other value has a default: the kinds of event that stop mail (severity error) and the
warnings that an OAuth grant is about to die; 5 failed messages in 15 minutes; the oldest
waiting message older than an hour; a grant whose refresh token dies within 7 days; a
bounce rate of 5% or a complaint rate of 0.1% over a day (of 100 messages or more).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from postroom.events import SPECS, Kind, Severity
from postroom.settings import SectionModel, register_section

# Stop mail (every error kind), or will soon (Google's 7-day Testing apps, Microsoft's 90
# idle days). fallback_used and the other warnings are there to be listed by choice.
DEFAULT_KINDS: tuple[Kind, ...] = (
    *(k for k, spec in SPECS.items() if spec.severity is Severity.ERROR),
    Kind.OAUTH_TESTING_APP, Kind.OAUTH_IDLE)
MAX_ATTEMPTS = 8  # tries of one alert on one channel before the channel is disabled
EMAIL = "email"  # the scheme (and channel id suffix) of the email destination


class AlertRule(SectionModel):
    """One ``[[alerts]]`` table."""

    # Names the rule in alerts, `postroom alerts list` and the outbox's channel ids ("ops#1").
    name: str = Field(default="alerts", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    # Apprise URLs (https://github.com/caronc/apprise/wiki) or webhook+https://host/path.
    channels: list[str] = Field(default_factory=list, max_length=20)
    # Email sent by Postroom itself (postroom.alerts.email), on a path that does not need
    # the failing connection: the connection ``email_connection`` when it is usable, else
    # straight to each recipient domain's MX, else the next usable connection of the routes.
    email: list[str] = Field(default_factory=list, max_length=20)
    email_connection: str | None = None  # a connection kept for alerts; tried first
    email_from: str | None = None  # default: postroom@<server.hostname>
    # Straight to the recipients' MX hosts (port 25). False where outgoing port 25 is
    # blocked (most cloud providers block it): the MX path would only cost its timeouts.
    email_direct: bool = True
    # The MX path's port and DNS server (IP[:PORT]; default: this machine's resolver), for
    # split-horizon DNS or a relay on a private network that takes mail on another port.
    email_mx_port: int = Field(default=25, ge=1, le=65535)
    email_dns_server: str | None = None
    kinds: list[Kind] = Field(default_factory=lambda: list(DEFAULT_KINDS))  # events alerted
    connections: list[str] = Field(default_factory=list)  # empty: every connection
    # Empty: every app. Only events about a message and the failure count have an app; an
    # event about a connection concerns every app that sends through it.
    apps: list[str] = Field(default_factory=list)
    failures: int = Field(default=5, ge=0)  # N failed messages ... (0: off)
    failures_minutes: float = Field(default=15, gt=0, le=7 * 24 * 60)  # ... in M minutes
    down_for: float = Field(default=0, ge=0)  # seconds a connection is down before alerting
    queue_age: float = Field(default=3600, ge=0)  # seconds the oldest waiting message (0: off)
    oauth_days: float = Field(default=7, ge=0)  # a refresh token dying within D days (0: off)
    # The providers' reported bounces and complaints (delivery events: webhooks and DSNs) per
    # message sent, in percent (0: off), per connection and in all. The defaults are the
    # lines where providers start acting: Amazon SES reviews an account at a 5% (hard) bounce
    # rate and a 0.1% complaint rate, and pauses it at 10% and 0.5%
    # (https://docs.aws.amazon.com/ses/latest/dg/reputationdashboardmessages.html); Gmail asks
    # senders to keep the spam rate under 0.1% and never reach 0.3%
    # (https://support.google.com/a/answer/81126), as does Yahoo
    # (https://senders.yahooinc.com/best-practices/). So the alert comes before the pause.
    bounce_rate: float = Field(default=5, ge=0, le=100)
    complaint_rate: float = Field(default=0.1, ge=0, le=100)
    # Over the last M minutes (a day: Gmail's Postmaster Tools report the spam rate daily),
    # once at least N messages went: 3 bounces of 10 messages page nobody.
    rate_minutes: float = Field(default=1440, gt=0, le=30 * 24 * 60)
    rate_min_sent: int = Field(default=100, ge=1)
    # At most one alert per kind and connection in this many seconds; the rest are counted
    # and sent as one digest when it has passed (0: every event alerts).
    throttle: float = Field(default=3600, ge=0)
    # The generic webhook's signing key (X-Postroom-Signature), read by postroom.secrets.
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None
    webhook_secret: str | None = None
    # Web Push (webpush://admins): the contact the push services see in the VAPID signature
    # (RFC 8292 2.1; default mailto:postmaster@<server.hostname>), and networks a push
    # endpoint may be in besides public addresses (a push service on your own network).
    webpush_subject: str | None = Field(default=None, pattern=r"^(mailto:\S+@\S+|https://\S+)$",
                                        max_length=200)
    webpush_networks: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("webpush_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (10.0.0.0/8, fd00::/8, "
                                 "192.0.2.7)") from None
        return v

    @field_validator("channels")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        from postroom.alerts import display, scheme
        from postroom.exceptions import ConfigError

        for url in v:
            try:
                kind = scheme(url)
            except ConfigError as err:
                raise ValueError(err.message) from None
            if kind == EMAIL:
                raise ValueError(f"{display(url)}: list email addresses in email = [...], not "
                                 "in channels")
            if kind == "webpush":  # whose browsers: checked now, not at the first alert
                from postroom.alerts.webpush import Target
                from postroom.exceptions import AlertError

                try:
                    Target.of(url)
                except AlertError as err:
                    raise ValueError(err.message) from None
        if len(set(v)) != len(v):
            raise ValueError("lists a channel twice: "
                             f"{', '.join(display(u) for u in v)}; remove the copy")
        return v

    @field_validator("email", "email_from")
    @classmethod
    def _addresses(cls, v: list[str] | str | None) -> list[str] | str | None:
        from postroom.envelope import validate_address
        from postroom.exceptions import PostroomError

        for address in [v] if isinstance(v, str) else v or []:
            try:
                validate_address(address)
            except PostroomError as err:
                raise ValueError(err.message) from None
        if isinstance(v, list) and len({a.lower() for a in v}) != len(v):
            raise ValueError("lists an address twice; remove the copy")
        return v

    @field_validator("email_dns_server")
    @classmethod
    def _dns_server(cls, v: str | None) -> str | None:
        from postroom.diagnostics.dns import parse_server
        from postroom.exceptions import ConfigError

        if v is not None:
            try:
                parse_server(v)
            except ConfigError:
                raise ValueError(f"{v!r} is not IP[:PORT] (127.0.0.1:5353, [::1]:53, "
                                 "9.9.9.9)") from None
        return v

    @model_validator(mode="after")
    def _destination(self) -> AlertRule:
        if not self.channels and not self.email:
            raise ValueError("an [[alerts]] rule needs somewhere to send: channels = [...] "
                             "(Apprise or webhook URLs) or email = [\"ops@example.com\"]")
        return self

    def destinations(self) -> list[tuple[str, str]]:
        """(channel id, URL) of each destination: the channels by position ("ops#1"), the
        email addresses as one channel ("ops#email", ``email://`` and the addresses)."""
        out = [(f"{self.name}#{i}", url) for i, url in enumerate(self.channels, 1)]
        if self.email:
            out.append((f"{self.name}#{EMAIL}", f"{EMAIL}://{','.join(self.email)}"))
        return out

    def channel_ids(self) -> list[str]:
        """Its channels' ids: the rule's name and the URL's position ("ops#1"), "ops#email"."""
        return [cid for cid, _ in self.destinations()]


class AlertsSettings(SectionModel):
    """Every ``[[alerts]]`` table of the file."""

    array_field: ClassVar[str] = "rules"  # [[alerts]] is read as [alerts] rules = [...]
    # [[alerts]] may be stored in the database and exported (postroom.store.dbfeatures):
    # each rule's channel URLs (Apprise URLs carry their tokens) and webhook key are kept
    # encrypted in the secrets table, apart from the rest of the rule.
    stored_secrets: ClassVar[tuple[str, ...]] = ("channels", "webhook_secret")
    rules: list[AlertRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> AlertsSettings:
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two [[alerts]] rules are named {twice[0]!r}; give each rule "
                             "its own name = \"...\"")
        return self

    def channel_ids(self) -> dict[str, tuple[AlertRule, str]]:
        """Channel id ("ops#1") -> its rule and URL."""
        return {cid: (r, url) for r in self.rules for cid, url in r.destinations()}


register_section("alerts", AlertsSettings)
