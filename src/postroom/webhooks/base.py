"""What one provider's webhook module implements: check the request, read its events.

A provider's module (transports/<provider>.py or its own file) defines one subclass and
names it on its Transport class (``webhook = MailgunWebhook``). The door
(postroom.ingress.webhooks_http) calls, in this order and never otherwise:

1. :meth:`Webhook.verify`: the signature, with the helpers of postroom.webhooks.verify (HMAC
   compared in constant time within a timestamp window, HTTP basic auth, a certificate
   chain). It raises ``webhooks.Refused`` on anything wrong: the client gets a bare 401.
2. :meth:`Webhook.answer`: a handshake some providers need (SNS SubscriptionConfirmation);
   its answer, when it has one, is the response and nothing is parsed.
3. :meth:`Webhook.parse`: the payload as :class:`~postroom.webhooks.DeliveryEvent` items,
   read with :meth:`Webhook.json` or :meth:`Webhook.form` (bounded), ``webhooks.BadEvent``
   on a payload of no known shape.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from postroom.connection_settings import ConnectionBase
from postroom.webhooks import BadEvent, DeliveryEvent, WebhookRequest

# Nesting deeper than this is no provider's payload (theirs nest three to five levels).
MAX_DEPTH = 32
MAX_FORM_FIELDS = 1000


@dataclass(frozen=True)
class WebhookConfig:
    """What a webhook is checked against: the connection's settings, and its signing key
    (``None`` when the connection configures none: a webhook that needs one refuses)."""

    connection: ConnectionBase
    key: str | None
    # Seconds a signed timestamp may be off from now either way (replays older than this
    # are refused outright; newer ones are duplicates by their event key).
    tolerance: float = 300.0


class Webhook(abc.ABC):
    """One provider's delivery events. Stateless: the door makes one per request."""

    # The provider's page on its events and their signatures.
    docs_url: ClassVar[str] = ""
    # True when verify() does network or disk I/O (SNS fetches the certificate it signs
    # with, then caches it): the door runs it in a thread instead of on the event loop.
    blocking: ClassVar[bool] = False

    @abc.abstractmethod
    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        """Raise ``webhooks.Refused`` unless the request is signed (or authenticated) as
        the provider does, with ``settings.key``, recently."""

    @abc.abstractmethod
    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        """The request's events (an empty list for a ping or test event)."""

    async def answer(self, req: WebhookRequest,
                     settings: WebhookConfig) -> tuple[int, bytes] | None:
        """A handshake's answer (status, body), called after :meth:`verify`; None (the
        default): the request carries events."""
        return None

    # -- bounded readers for parse() ---------------------------------------------------------
    @staticmethod
    def json(req: WebhookRequest) -> Any:
        """The body as JSON, refusing what no provider sends: invalid UTF-8 or JSON, and
        nesting over MAX_DEPTH (the C decoder is itself guarded against recursion)."""
        try:
            data = json.loads(req.body)
        except (ValueError, RecursionError) as err:
            raise BadEvent("the webhook body is not JSON; the provider sends JSON here "
                           "(check the webhook's URL and format in its settings)") from err
        # Nesting deeper than MAX_DEPTH needs more brackets than that: counting them (in C)
        # spares the walk for almost every body.
        if req.body.count(b"[") + req.body.count(b"{") > MAX_DEPTH and \
                _too_deep(data, MAX_DEPTH):
            raise BadEvent(f"the webhook body nests deeper than {MAX_DEPTH} levels")
        return data

    @staticmethod
    def form(req: WebhookRequest) -> dict[str, str]:
        """The body as an application/x-www-form-urlencoded form (the last of a repeated
        field), at most MAX_FORM_FIELDS fields."""
        try:
            pairs = parse_qsl(req.body.decode("utf-8"), keep_blank_values=True,
                              strict_parsing=False, max_num_fields=MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError) as err:
            raise BadEvent("the webhook body is not a form of at most "
                           f"{MAX_FORM_FIELDS} UTF-8 fields") from err
        return dict(pairs)


def _too_deep(data: Any, limit: int) -> bool:
    """Whether ``data`` nests more than ``limit`` lists or objects (walked without
    recursion, stopping at the first path over the limit)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        children: Any = item.values() if isinstance(item, dict) else (
            item if isinstance(item, list) else ())
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def event_time(value: Any) -> float:
    """The time a provider's event names, as epoch seconds: a number (or numeric string) of
    seconds, or an ISO 8601 time ("2024-11-22T23:41:12.126Z"); now when it names none or
    one that cannot be read (the event is still worth keeping)."""
    import math
    import time
    from datetime import datetime

    try:
        at = float(value)
    except (TypeError, ValueError):
        try:
            at = datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            at = math.nan
    return at if math.isfinite(at) and at > 0 else time.time()
