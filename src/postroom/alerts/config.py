"""``[[alerts]]``: alert rules, a feature section of postroom.toml (registered through the
``postroom.sections`` entry point, so configurations without alerts never import this).

The least that works is a destination::

    [[alerts]]
    channels = ["ntfy://ntfy.example.com/postroom", "webhook+https://ops.example.com/hook"]
    webhook_secret_env = "ALERT_WEBHOOK_SECRET"

Every other value has a default: the kinds of event that stop mail (severity error) and the
warnings that an OAuth grant is about to die; 5 failed messages in 15 minutes; the oldest
waiting message older than an hour; a grant whose refresh token dies within 7 days.
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


class AlertRule(SectionModel):
    """One ``[[alerts]]`` table."""

    # Names the rule in alerts, `postroom alerts list` and the outbox's channel ids ("ops#1").
    name: str = Field(default="alerts", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    # Apprise URLs (https://github.com/caronc/apprise/wiki) or webhook+https://host/path.
    channels: list[str] = Field(min_length=1, max_length=20)
    kinds: list[Kind] = Field(default_factory=lambda: list(DEFAULT_KINDS))
    connections: list[str] = Field(default_factory=list)  # empty: every connection
    # Empty: every app. Only events about a message and the failure count have an app; an
    # event about a connection concerns every app that sends through it.
    apps: list[str] = Field(default_factory=list)
    failures: int = Field(default=5, ge=0)  # N failed messages ... (0: off)
    failures_minutes: float = Field(default=15, gt=0, le=7 * 24 * 60)  # ... in M minutes
    down_for: float = Field(default=0, ge=0)  # seconds a connection is down before alerting
    queue_age: float = Field(default=3600, ge=0)  # seconds the oldest waiting message (0: off)
    oauth_days: float = Field(default=7, ge=0)  # a refresh token dying within D days (0: off)
    # At most one alert per kind and connection in this many seconds; the rest are counted
    # and sent as one digest when it has passed (0: every event alerts).
    throttle: float = Field(default=3600, ge=0)
    # The generic webhook's signing key (X-Postroom-Signature), read by postroom.secrets.
    webhook_secret_env: str | None = None
    webhook_secret_file: str | None = None
    webhook_secret: str | None = None

    @field_validator("channels")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        from postroom.alerts import display, scheme
        from postroom.exceptions import ConfigError

        for url in v:
            try:
                scheme(url)
            except ConfigError as err:
                raise ValueError(err.message) from None
        if len(set(v)) != len(v):
            raise ValueError("lists a channel twice: "
                             f"{', '.join(display(u) for u in v)}; remove the copy")
        return v


    def channel_ids(self) -> list[str]:
        """Its channels' ids: the rule's name and the URL's position ("ops#1")."""
        return [f"{self.name}#{i}" for i in range(1, len(self.channels) + 1)]


class AlertsSettings(SectionModel):
    """Every ``[[alerts]]`` table of the file."""

    array_field: ClassVar[str] = "rules"  # [[alerts]] is read as [alerts] rules = [...]
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
        return {cid: (r, url) for r in self.rules
                for cid, url in zip(r.channel_ids(), r.channels, strict=True)}


register_section("alerts", AlertsSettings)
