"""Alerts: tell someone when mail stops (issue 15).

The path of an alert: events (postroom.events) and a few figures of the store ->
:mod:`.rules` (pure: incidents open and close, one alert each way) -> :mod:`.outbox` (one
durable row per alert and channel) -> a :class:`Channel` sends it, retried with backoff;
:mod:`.dispatcher` is the chore of ``postroom serve`` that does all of it.

Channels, one module per kind, named in :data:`CHANNELS` by URL scheme (imported when an
alert goes to one): ``webhook+https://`` the signed generic webhook (:mod:`.webhook`);
``webpush://admins`` Web Push to the browsers subscribed in the web admin (:mod:`.webpush`,
with :mod:`.vapid`, :mod:`.subscriptions`, :mod:`.outbound`); every other URL is an Apprise
URL (:mod:`.apprise`: Slack, Teams, Discord, Telegram, ntfy, mailto...).
A rule's ``email = [...]`` addresses are one more channel, ``email://`` (:mod:`.email`: sent
by Postroom itself, on a path that avoids the failing connection, :mod:`.mx` for the direct
one). A new kind is a module with a class that follows :class:`Channel` and a line in
:data:`CHANNELS`.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from postroom.alerts.config import AlertRule
    from postroom.settings import Settings


class Change(enum.StrEnum):
    """What an alert says about its incident."""

    OPENED = "opened"  # something is wrong (or, for a warning, worth a look)
    RECOVERED = "recovered"  # the incident this rule alerted about is over
    DIGEST = "digest"  # how many more of a noisy kind came while the rule was throttled
    CHANNEL_DISABLED = "channel_disabled"  # another channel failed for good: it is off
    TEST = "test"  # `postroom alerts test`


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert, as the outbox keeps it and channels send it. ``key`` is unique per alert:
    the same key written twice is one alert."""

    key: str
    rule: str
    change: Change
    severity: str  # postroom.events.Severity value
    kind: str  # the event kind or threshold ("connection_down", "failures", "queue_age"...)
    title: str
    text: str
    at: float
    connection: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "rule": self.rule, "change": self.change.value,
                "severity": self.severity, "kind": self.kind, "title": self.title,
                "text": self.text, "at": self.at, "connection": self.connection}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        return cls(key=str(d["key"]), rule=str(d["rule"]), change=Change(d["change"]),
                   severity=str(d["severity"]), kind=str(d["kind"]), title=str(d["title"]),
                   text=str(d["text"]), at=float(d["at"]), connection=d.get("connection"))


class Channel(Protocol):
    """One destination. ``send`` returns when the destination took the alert, else raises
    a PostroomError (usually :class:`postroom.exceptions.AlertError`): ``permanent`` disables
    the channel, anything else is retried by the outbox with backoff. The dispatcher keeps a
    channel between alerts; one that holds a client (a connection pool) also has
    ``async def aclose()``, called when the dispatcher stops or the channel's rule changes."""

    async def send(self, alert: Alert) -> None: ...


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """What a channel class is built from: its URL and the secret of its rule (the
    webhook's signing key, resolved through postroom.secrets), if any."""

    url: str
    secret: str | None = None
    timeout: float = 10.0
    # For a channel that sends through Postroom's own parts (email: the connections, their
    # health and stored secrets): its rule, the settings in force and the database.
    rule: AlertRule | None = None
    settings: Settings | None = None
    engine: Engine | None = None


# URL scheme -> "module:Class"; any other scheme is an Apprise URL.
CHANNELS: dict[str, str] = {
    "webhook+https": "postroom.alerts.webhook:WebhookChannel",
    "webhook+http": "postroom.alerts.webhook:WebhookChannel",
    "email": "postroom.alerts.email:EmailChannel",  # [[alerts]] email = [...], not a URL
    "webpush": "postroom.alerts.webpush:WebPushChannel",  # browsers, from the web admin
}
APPRISE = "postroom.alerts.apprise:AppriseChannel"


def scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    if not sep or not head:
        raise ConfigError(f"alert channel {display(url)!r} is not a URL; write it as "
                          "scheme://... (an Apprise URL such as ntfy://topic, or "
                          "webhook+https://host/path)", code="config.invalid")
    return head.lower()


def display(url: str) -> str:
    """A channel's URL as shown and logged: the scheme and, for the webhook, the host. An
    Apprise URL carries its tokens anywhere (slack://TokenA/TokenB/TokenC), so no more."""
    head, sep, rest = url.partition("://")
    if not sep:
        return "(not a URL)"
    if head.lower() == "email":  # the addresses of email = [...]: no secret in them
        return url
    if head.lower() in CHANNELS:
        host = rest.split("/", 1)[0].rpartition("@")[2]
        return f"{head}://{host}/…"
    return f"{head}://…"


def channel_class(url: str) -> type[Channel]:
    target = CHANNELS.get(scheme(url), APPRISE)
    module, _, name = target.partition(":")
    cls: type[Channel] = getattr(importlib.import_module(module), name)
    return cls


def make_channel(config: ChannelConfig) -> Channel:
    factory: Any = channel_class(config.url)
    channel: Channel = factory(config)
    return channel
