"""Delivery events: what became of a message after it left, in one closed vocabulary.

Providers report it to ``POST /webhooks/{connection}`` (postroom.ingress.webhooks_http):
each provider's :class:`~postroom.webhooks.base.Webhook` (named on its Transport class,
``webhook = PostmarkWebhook``) checks the request's signature (postroom.webhooks.verify) and
turns its payload into :class:`DeliveryEvent` items; SMTP connections hear it through DSNs
(RFC 3464) sent back to the bounce address (postroom.bounces). Both are recorded by
postroom.webhooks.intake: attached to the message, kept with the raw payload, written as an
event, and fed to the suppression list.

The vocabulary is the issue's (and close to django-anymail's ``EventType``): a provider's
own words are mapped onto it in its module, and anything else is ``unknown`` with the raw
payload kept, never dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postroom.exceptions import EventError, EventRefused

__all__ = [
    "MAX_BODY", "BadEvent", "DeliveryEvent", "Kind", "Refused",
    "WebhookRequest",
]

# The webhook door is unauthenticated until the signature is checked: no request body over
# this is read (413). Providers batch events (SendGrid, Mandrill, SparkPost up to a few
# hundred per request), which stays well under it.
MAX_BODY = 1024 * 1024

Refused = EventRefused  # bad, missing or replayed signature: 401, nothing more said
BadEvent = EventError  # malformed or unknown payload: 400


class Kind(enum.StrEnum):
    """What happened to a message (or one of its recipients) at or after the provider."""

    QUEUED = "queued"  # the provider accepted it and will try (anymail: queued)
    DELIVERED = "delivered"  # the receiving server accepted it
    DEFERRED = "deferred"  # a temporary failure; the provider keeps trying
    BOUNCED = "bounced"  # the receiving server refused it (hard or soft: see `permanent`)
    REJECTED = "rejected"  # the provider itself would not send it (its own suppression, policy)
    COMPLAINED = "complained"  # the recipient marked it as spam (feedback loop, RFC 5965)
    UNSUBSCRIBED = "unsubscribed"  # the recipient unsubscribed (List-Unsubscribe, link)
    OPENED = "opened"
    CLICKED = "clicked"
    UNKNOWN = "unknown"  # an event of the provider's we have no word for: raw kept


@dataclass(frozen=True)
class DeliveryEvent:
    """One event about one message (and, usually, one recipient).

    ``provider_id``: the provider's id of the message (as kept on the attempt row,
    ``attempts.provider_id``), by which the event is attached to the message; else
    ``message_id_header`` (the message's Message-ID) is tried. ``at``: when it happened,
    epoch seconds (the provider's time where it says one). ``event_id``: the provider's id of
    the event itself, which makes a replay a duplicate; without one the raw payload's hash
    does. ``permanent``: for bounces, hard (True) or soft (False), where the provider says."""

    kind: Kind
    provider_id: str | None
    recipient: str | None
    at: float
    detail: str
    raw: dict[str, Any] | str
    event_id: str | None = None
    message_id_header: str | None = None
    permanent: bool | None = None


@dataclass(frozen=True)
class WebhookRequest:
    """A webhook request as the door received it. ``headers``: names lower-cased (a repeated
    field's values joined with ", ", RFC 9110 5.3); ``body``: at most MAX_BODY bytes;
    ``remote``: the client's address."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    remote: str = ""
