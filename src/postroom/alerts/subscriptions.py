"""The browsers that asked the web admin for alerts by Web Push (table
``webpush_subscriptions``): checked as they come, kept per admin account, read by the Web
Push channel (postroom.alerts.webpush).

A subscription is what a browser's ``PushManager.subscribe()`` returns: the push service's
endpoint URL for that browser and two keys (p256dh, the browser's P-256 public key; auth, a
16-byte secret) that the message is encrypted to (RFC 8291). The keys are kept encrypted
with the instance key; the endpoint stays readable (it names the push service in the list,
and a push to it also needs the instance's VAPID signature). Bounded: an endpoint of at
most MAX_ENDPOINT characters, https only, MAX_PER_ACCOUNT browsers per account.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, insert, select, update

from postroom.audit import Role
from postroom.exceptions import PostroomError
from postroom.store.db import write_transaction
from postroom.store.schema import admin_accounts
from postroom.store.schema import webpush_subscriptions as table

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from postroom.secrets import Vault

MAX_PER_ACCOUNT = 10
MAX_ENDPOINT = 1024  # the push services' endpoints are 150-300 characters
MAX_BODY = 4096  # the subscription JSON a browser posts
MAX_LABEL = 120
KEEP_KEYS = 50  # alert keys remembered per subscription (a retry skips those it took)


class SubscriptionRefused(PostroomError):
    """A subscription the web admin does not take; ``message`` says why."""

    code = "webpush.invalid"


@dataclass(frozen=True, slots=True)
class Subscription:
    id: int
    account: str
    endpoint: str
    label: str
    created_at: float
    sent_at: float | None
    sent_keys: tuple[str, ...] = ()
    p256dh: str = ""  # base64url; filled only for the channel (targets)
    auth: str = ""

    @property
    def service(self) -> str:
        """The push service's host, as the list shows it."""
        return urlsplit(self.endpoint).hostname or "?"

    def info(self) -> dict[str, Any]:
        """What a page or `alerts` command may show (never the keys)."""
        return {"id": self.id, "account": self.account, "service": self.service,
                "label": self.label, "created_at": self.created_at, "sent_at": self.sent_at}


def _b64(value: object, what: str, size: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise SubscriptionRefused(f"keys.{what} is missing or not a string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise SubscriptionRefused(f"keys.{what} is not base64url") from None
    if len(raw) != size:
        raise SubscriptionRefused(f"keys.{what} is {len(raw)} bytes, not {size}")
    return value


def check_endpoint(endpoint: object) -> str:
    """``endpoint`` if it is an https URL of at most MAX_ENDPOINT characters with a host and
    no user name (push services have none); the address it leads to is checked when a
    push is sent (postroom.alerts.outbound), as DNS may change meanwhile."""
    if not isinstance(endpoint, str) or not endpoint:
        raise SubscriptionRefused("the subscription has no endpoint")
    if len(endpoint) > MAX_ENDPOINT:
        raise SubscriptionRefused(f"the endpoint is longer than {MAX_ENDPOINT} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in endpoint):
        raise SubscriptionRefused("the endpoint holds spaces or control characters")
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        raise SubscriptionRefused("the endpoint is not a URL") from None
    if parts.scheme.lower() != "https":
        raise SubscriptionRefused("the endpoint is not https: push services are reached "
                                  "over https only")
    if not parts.hostname or "@" in parts.netloc or port == 0:
        raise SubscriptionRefused("the endpoint has no host, or has a user name")
    return endpoint


def parse(body: bytes) -> tuple[str, str, str]:
    """(endpoint, p256dh, auth) of a PushSubscription's JSON (``subscription.toJSON()``)."""
    if len(body) > MAX_BODY:
        raise SubscriptionRefused(f"the subscription is larger than {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SubscriptionRefused("the subscription is not JSON") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), Mapping):
        raise SubscriptionRefused("the subscription has no keys: send "
                                  "PushSubscription.toJSON()")
    keys = data["keys"]
    p256dh = _b64(keys.get("p256dh"), "p256dh", 65)
    auth = _b64(keys.get("auth"), "auth", 16)
    _on_curve(p256dh)
    return check_endpoint(data.get("endpoint")), p256dh, auth


def _on_curve(p256dh: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = base64.urlsafe_b64decode(p256dh + "=" * (-len(p256dh) % 4))
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise SubscriptionRefused("keys.p256dh is not a P-256 public key") from None


def add(engine: Engine, vault: Vault, account: str, body: bytes, label: str,
        now: float | None = None) -> Subscription:
    """Store the subscription posted by ``account``'s browser. The same browser subscribed
    again is updated (and moves to ``account`` if another account had it)."""
    endpoint, p256dh, auth = parse(body)
    now = time.time() if now is None else now
    label = " ".join(label.split())[:MAX_LABEL] or "?"
    keys = vault.encrypt(json.dumps({"p256dh": p256dh, "auth": auth}))
    t = table.c
    with write_transaction(engine) as conn:
        conn.execute(delete(table).where(t.endpoint == endpoint))
        have = conn.execute(select(func.count()).where(t.account == account)).scalar_one()
        if have >= MAX_PER_ACCOUNT:
            raise SubscriptionRefused(
                f"this account has {MAX_PER_ACCOUNT} browsers subscribed already; remove "
                "one first", code="webpush.too_many")
        conn.execute(insert(table).values(
            account=account, endpoint=endpoint, secret=keys, label=label, created_at=now,
            sent_at=None, sent_keys="[]"))
        new_id = conn.execute(select(t.id).where(t.endpoint == endpoint)).scalar_one()
    return Subscription(int(new_id), account, endpoint, label, now, None)


def of_account(engine: Engine, account: str) -> list[Subscription]:
    t = table.c
    with engine.connect() as conn:
        rows = conn.execute(select(t.id, t.account, t.endpoint, t.label, t.created_at,
                                   t.sent_at).where(t.account == account)
                            .order_by(t.created_at)).all()
    return [Subscription(r.id, r.account, r.endpoint, r.label, r.created_at, r.sent_at)
            for r in rows]


def remove(engine: Engine, account: str, *, sub_id: int | None = None,
           endpoint: str | None = None) -> bool:
    """Delete one of ``account``'s subscriptions (by id or endpoint); False if it has none
    such (another account's is never touched)."""
    t = table.c
    q = delete(table).where(t.account == account)
    if sub_id is not None:
        q = q.where(t.id == sub_id)
    elif endpoint is not None:
        q = q.where(t.endpoint == endpoint)
    else:
        return False
    with write_transaction(engine) as conn:
        return bool(conn.execute(q).rowcount)


def targets(engine: Engine, vault: Vault, audience: str) -> list[Subscription]:
    """The subscriptions a channel sends to, keys decrypted: ``admins`` (accounts with the
    admin role), ``all``, or ``account:<name>``."""
    t, a = table.c, admin_accounts.c
    q = select(table).join(admin_accounts, a.name == t.account).order_by(t.id)
    if audience == "admins":
        q = q.where(a.role == Role.ADMIN.value)
    elif audience.startswith("account:"):
        q = q.where(t.account == audience.partition(":")[2])
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for r in rows:
        keys = json.loads(vault.decrypt(r.secret))
        out.append(Subscription(r.id, r.account, r.endpoint, r.label, r.created_at, r.sent_at,
                                tuple(json.loads(r.sent_keys)), keys["p256dh"], keys["auth"]))
    return out


def delivered(engine: Engine, sub: Subscription, alert_key: str, now: float) -> None:
    keys = [*(k for k in sub.sent_keys if k != alert_key), alert_key][-KEEP_KEYS:]
    with write_transaction(engine) as conn:
        conn.execute(update(table).where(table.c.id == sub.id).values(
            sent_at=now, sent_keys=json.dumps(keys)))


def gone(engine: Engine, sub_id: int) -> None:
    """The push service says the subscription is no more (404/410): forget it."""
    with write_transaction(engine) as conn:
        conn.execute(delete(table).where(table.c.id == sub_id))
