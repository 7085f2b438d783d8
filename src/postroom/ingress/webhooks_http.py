"""``POST /webhooks/{connection}``: providers report what became of each message.

The HTTP front (ingress.http_front) hands requests under /webhooks/ here, in two steps, so
that nothing is read for a request that has nowhere to go:

1. :func:`target`, from the request line alone: the connection, and its transport's
   ``webhook`` (postroom.webhooks.base.Webhook). An unknown connection and one whose
   provider sends no webhooks get the same 404, so names cannot be probed for;
2. the front reads the body (at most webhooks.MAX_BODY: 413 over it), then :func:`handle`:
   the signing key (webhook_key_env / _file / stored), the provider's signature check
   (401 with nothing said of why), its handshake if any, its events, recorded by
   postroom.webhooks.intake. 200 for accepted and duplicate events alike: a provider
   re-sends what was not answered 2xx, and a duplicate needs nothing more.

The door needs no API key (providers cannot send one): the signature is the
authentication, and the only thing a request can cause before it is checked is the read of
a bounded body.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.exceptions import EventError, EventRefused, PostroomError
from postroom.secrets import Secret, resolve, secret_name
from postroom.webhooks import WebhookRequest
from postroom.webhooks.base import Webhook, WebhookConfig
from postroom.webhooks.intake import EventLog

if TYPE_CHECKING:
    from postroom.connection_settings import ConnectionBase
    from postroom.ingress.http_front import Context
    from postroom.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/webhooks/"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Answer = tuple[int, dict[str, Any]]


def _error(code: str, message: str, fix: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fix": fix, "field": None}}


NOT_FOUND: Answer = (404, _error(
    "webhook.unknown", "no webhook here",
    "use the URL /webhooks/NAME of a connection whose provider sends delivery events"))
REFUSED: Answer = (401, _error(
    "webhook.refused", "the request's signature was not accepted",
    "configure the same webhook signing key (or user:password) at the provider and in the "
    "connection's webhook_key_env, webhook_key_file or stored key"))


@dataclass(frozen=True)
class Target:
    """Where a webhook request goes: the connection and its provider's webhook class."""

    connection: ConnectionBase
    webhook: type[Webhook]


def target(ctx: Context, scope: dict[str, Any] | Any) -> Target | Answer:
    """The request's connection and webhook, or the answer when there is none: 405 for a
    method other than POST or HEAD, else 404 (unknown connection, or one without webhooks).
    HEAD answers 200 for any well-formed name: Mandrill checks a webhook URL with a HEAD
    before saving it, and the same answer for every name enumerates no connection."""
    name = str(scope["path"])[len(PREFIX):]
    if scope["method"] == "HEAD":
        return (200, {}) if _NAME.fullmatch(name) else NOT_FOUND
    if scope["method"] != "POST":
        return 405, _error("method.not_allowed", f"{scope['method']} on a webhook URL",
                           "providers POST their events")
    if not _NAME.fullmatch(name):
        return NOT_FOUND
    settings = ctx.instance.settings if ctx.instance is not None else ctx.settings
    return _targets(settings).get(name) or NOT_FOUND


# The connections that take webhooks, by name, for the settings in force: worked out once
# per settings object (a reload makes a new one), not on every event a provider posts.
_TARGETS: list[tuple[Settings, dict[str, Target]]] = []


def _targets(settings: Settings) -> dict[str, Target]:
    if _TARGETS and _TARGETS[0][0] is settings:
        return _TARGETS[0][1]
    from postroom.transports import transport_class

    found: dict[str, Target] = {}
    for conn in settings.connections:
        try:
            webhook = transport_class(conn.transport).webhook
        except PostroomError:
            continue
        if webhook is not None:
            found.setdefault(conn.name, Target(conn, webhook))
    _TARGETS[:] = [(settings, found)]
    return found


def _signing_key(ctx: Context, conn: ConnectionBase) -> str | None:
    """The connection's webhook key: ``webhook_key_env``, ``webhook_key_file``, the
    inline ``webhook_key``, else the one stored encrypted (postroom.secrets.resolve); None
    when none is configured."""
    env: str | None = getattr(conn, "webhook_key_env", None)
    file: Path | None = getattr(conn, "webhook_key_file", None)
    stored: str | None = getattr(conn, "webhook_key", None)
    if not env and file is None and stored is None and ctx.instance is not None:
        stored = ctx.instance.secrets.get(secret_name(conn.name, Secret.WEBHOOK_KEY))
    return resolve(f"connection {conn.name}", "webhook_key", env=env, file=file,
                   stored=stored)


def request_of(scope: dict[str, Any] | Any, body: bytes, ip: str) -> WebhookRequest:
    """The request as a provider's Webhook sees it; EventError for a query string of over
    100 fields (no provider sends one)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    from urllib.parse import parse_qsl

    try:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                               max_num_fields=100))
    except ValueError as err:
        raise EventError("the webhook URL's query has over 100 fields") from err
    return WebhookRequest(method=str(scope["method"]), path=str(scope["path"]),
                          headers=headers, body=body, query=query, remote=ip)


async def handle(ctx: Context, found: Target, scope: dict[str, Any] | Any, body: bytes,
                 ip: str) -> tuple[int, Any]:
    """Check, parse and record one webhook request; the answer (status, JSON body, or the
    handshake's bytes)."""
    try:
        req = request_of(scope, body, ip)
    except EventError as err:
        return 400, _error(err.code, err.message, "send the provider's documented request")
    name = found.connection.name
    conn = found.connection
    try:
        if any(getattr(conn, k, None) for k in ("webhook_key_env", "webhook_key_file",
                                                 "webhook_key")):
            key = _signing_key(ctx, conn)  # no database: not worth a thread
        else:  # stored encrypted: a query and a decryption
            key = await asyncio.to_thread(_signing_key, ctx, conn)
    except PostroomError as err:  # a key_env unset, a key_file unreadable: ours to fix
        log.error("webhook for connection %s: %s", name, err.message)
        return 503, _error("webhook.unavailable", "the webhook cannot be checked now",
                           "retry later")
    hook = found.webhook()
    config = WebhookConfig(found.connection, key)
    try:
        if hook.blocking:
            await asyncio.to_thread(hook.verify, req, config)
        else:
            hook.verify(req, config)
    except EventRefused as err:
        # Info, not warning: anyone who knows the URL can cause it.
        log.info("webhook for connection %s from %s refused: %s", name, req.remote,
                 err.message)
        return REFUSED
    try:
        handshake = await hook.answer(req, config)
        if handshake is not None:
            return handshake
        items = hook.parse(req, config)
    except EventError as err:
        log.info("webhook for connection %s from %s not understood: %s", name, req.remote,
                 err.message)
        return 400, _error(err.code, err.message, "send the provider's documented events")
    try:
        settings = ctx.instance.settings if ctx.instance is not None else ctx.settings
        done = await EventLog(ctx.queue, settings).record(name, items)
    except PostroomError as err:
        log.error("webhook for connection %s: could not record %d event(s): %s", name,
                  len(items), err)
        return 503, _error("webhook.unavailable", "the events could not be stored now",
                           "retry later (providers do)")
    return 200, {"accepted": len(done.new), "duplicates": done.duplicates,
                 "attached": done.attached}
