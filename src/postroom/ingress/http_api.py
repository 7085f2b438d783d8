"""The HTTP API under ``/api/v1``: send JSON or raw MIME, search the log, get one message
with its attempts, resend. Every app authenticates with its own Bearer API key
(`postroom app add NAME`) and sees only what it handed in, through any door.

Like the SMTP handler this is a thin door: validate, build the Envelope, ``enqueue()``; the
202 is sent only once the message is durably stored. Every error is a JSON body
``{"error": {"code", "message", "fix", "field"}}`` (see ``http_errors``).

The operations are the route table ``TABLE`` (ingress.api_table): served on the HTTP front by
ingress.api_dispatch without FastAPI, and described in the OpenAPI document of the FastAPI
application ``create_app`` makes (the web admin, the OAuth pages, the docs page), which
imports FastAPI when called.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any, Literal

from postroom import __version__
from postroom.apps import AppPolicy
from postroom.envelope import Envelope, new_id, validate_address
from postroom.exceptions import IntakeError, MessageError, StoreError
from postroom.ingress import http_raw
from postroom.ingress.api_table import Answer, Call, Param, Route, Table
from postroom.ingress.http_errors import HttpError
from postroom.ingress.http_front import AdminPart, Context
from postroom.ingress.http_models import (
    Accepted,
    AttachmentIn,
    ErrorBody,
    MessageDetail,
    MessageIn,
    MessageOut,
    MessagePage,
    ResendIn,
)
from postroom.message import Attachment, Draft, build
from postroom.queue.sql import IdempotencyKey
from postroom.store.log import LogFilter
from postroom.store.schema import PRIORITIES, STATUSES
from postroom.webhooks import Kind

if TYPE_CHECKING:
    from fastapi import FastAPI

PREFIX = "/api/v1"
# Composing a big message (base64 of large attachments) takes long enough to stall the
# event loop, and with it every SMTP session: above this size it runs in a thread.
_THREAD_ABOVE = 256 * 1024
# Documented on every operation (the OpenAPI document's router-wide responses).
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown API key."},
    413: {"model": ErrorBody, "description": "Request or message over a size limit."},
    422: {"model": ErrorBody, "description": "Invalid request; `fix` says how to fix it."},
    503: {"model": ErrorBody, "description": "The store is unavailable; retry later."},
}
IDEMPOTENCY = Param(
    "idempotency_key", "header", str | None, alias="Idempotency-Key",
    constraints={"min_length": 1, "max_length": 255, "pattern": r"^[\x20-\x7e]+$"},
    description="Repeat a request with the same key (per app) and the same body: the first "
    "message's id comes back (200) and nothing is queued twice.")
MSG_ID = Param("msg_id", "path", str, constraints={
    "min_length": 1, "max_length": 64, "pattern": r"^[A-Za-z0-9_-]+$"})


# -- helpers -------------------------------------------------------------------------------
def _time(value: str | float, name: str) -> float:
    """ISO 8601 with a zone, or epoch seconds, as epoch seconds."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _iso_time(str(value), name)
    if not math.isfinite(value) or not 0 <= value < 253402300800:  # year 10000
        raise HttpError(422, "request.time", f"{name} {value!r} is out of range",
                        "use epoch seconds between 0 and 253402300799", field=name)
    return float(value)


def _iso_time(value: str, name: str) -> float:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HttpError(422, "request.time", f"{name} {value!r} is not a time",
                        "use ISO 8601 with a zone (2030-01-01T09:00:00Z) or epoch seconds",
                        field=name) from None
    if when.tzinfo is None:
        raise HttpError(422, "request.time", f"{name} {value!r} has no time zone",
                        "add one: 2030-01-01T09:00:00Z or +02:00", field=name)
    return when.timestamp()


def _send_at(ctx: Context, value: str | float | None) -> float | None:
    if value is None:
        return None
    at = _time(value, "send_at")
    horizon = ctx.settings.delivery.max_lifetime
    if at > ctx.queue.clock() + horizon:
        raise HttpError(422, "request.send_at", "send_at is too far in the future",
                        f"schedule at most {horizon:.0f} s ahead (delivery.max_lifetime)",
                        field="send_at")
    return at


# "addr" or "Name <addr>" at their plainest (a dot-atom address, a name of letters, digits
# and single spaces): getaddresses reads the same address from them, and its parser costs
# more than the rest of a message's checks; anything else is read by getaddresses.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN = re.compile(rf"({_ADDR})|[A-Za-z0-9]+(?: [A-Za-z0-9]+)* ?<({_ADDR})>")


def _addresses(field: str, values: list[str]) -> list[str]:
    """The addresses in ``values`` ("addr" or "Name <addr>"), each checked; errors name the
    field and the index."""
    out: list[str] = []
    for i, value in enumerate(values):
        where = field if field == "from" else f"{field}[{i}]"
        if any(c in value for c in "\r\n\x00"):
            raise HttpError(422, "message.header_injection", f"{where} contains CR, LF or NUL",
                            "send one address per value, on one line", field=where)
        plain = _PLAIN.fullmatch(value)
        found = [plain[1] or plain[2]] if plain else [a for _, a in getaddresses([value]) if a]
        if not found:
            raise HttpError(422, "address.malformed", f"no address in {value!r}",
                            "write 'addr@example.com' or 'Name <addr@example.com>'", field=where)
        for addr in found:
            try:
                validate_address(addr)
            except MessageError as err:
                raise HttpError(422, err.code, err.message,
                                "write 'addr@example.com' or 'Name <addr@example.com>'",
                                field=where) from err
        out += found
    return out


_FIELDS = {"connection.unknown": "connection", "app.connection_not_allowed": "connection",
           "message.too_many_recipients": "to", "message.no_recipients": "to",
           "app.sender_not_allowed": "from"}


def _refused(err: IntakeError) -> HttpError:
    """ingress.accept's refusal, as this door answers it."""
    headers = {"Retry-After": str(math.ceil(err.retry_after))} if err.retry_after else None
    return HttpError(err.http, err.code, err.problem, err.fix, field=_FIELDS.get(err.code),
                     headers=headers)


def _policy(ctx: Context, app: str) -> AppPolicy:
    try:
        return ctx.checks().current_app(app)
    except IntakeError as err:
        raise _refused(err) from err


def _recipient_limit(ctx: Context, count: int) -> None:
    try:
        ctx.checks().check_recipient_count(count)
    except IntakeError as err:
        raise _refused(err) from err


def _admit(ctx: Context, env: Envelope, app: str) -> None:
    """The one intake path's checks (ingress.accept), for a message ``app`` hands in."""
    env.app = app
    try:
        ctx.checks().check(env, _policy(ctx, app))
    except IntakeError as err:
        raise _refused(err) from err
    except MessageError as err:
        raise HttpError(422, err.code, err.message, "correct the message") from err


def _decode(i: int, att: AttachmentIn) -> Attachment:
    try:
        content = base64.b64decode(att.content, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(422, "attachment.base64", f"attachment {att.filename!r} is not base64",
                        "encode the file's bytes with base64 (RFC 4648, no line breaks)",
                        field=f"attachments[{i}].content") from None
    return Attachment(att.filename, content, att.content_type, att.content_id)


def _draft(ctx: Context, body: MessageIn) -> tuple[Draft, int]:
    sender = _addresses("from", [body.from_])
    if len(sender) != 1:
        raise HttpError(422, "address.malformed", "from must hold exactly one address",
                        "put other people in reply_to", field="from")
    count = sum(len(_addresses(f, getattr(body, f))) for f in ("to", "cc", "bcc"))
    _addresses("reply_to", body.reply_to)
    if count == 0:
        raise HttpError(422, "message.no_recipients", "the message has no recipient",
                        "give at least one address in to, cc or bcc", field="to")
    _recipient_limit(ctx, count)
    draft = Draft(
        from_=body.from_, to=body.to, cc=body.cc, bcc=body.bcc, reply_to=body.reply_to,
        subject=body.subject, text=body.text, html=body.html,
        attachments=[_decode(i, a) for i, a in enumerate(body.attachments)],
        headers=body.headers,
    )
    size = len(body.text or "") + len(body.html or "") + sum(
        len(a.content) for a in body.attachments)
    return draft, size


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


async def _enqueue(ctx: Context, env: Envelope, app: str, key: str | None,
                   request_hash: Callable[[], str]) -> Answer:
    """Store ``env`` (at most once per Idempotency-Key) and answer 202, or 200 for a repeat.
    ``request_hash`` is only called with a key: what identifies "the same request"."""
    _admit(ctx, env, app)
    idem = IdempotencyKey(app, key, request_hash()) if key is not None else None
    try:
        msg_id = await ctx.queue.enqueue(env, idempotency=idem)
    except MessageError as err:
        if err.code == "idempotency.conflict":
            raise HttpError(409, err.code, err.message,
                            "send a new Idempotency-Key for a different message, or repeat "
                            "the first request exactly", field="Idempotency-Key") from err
        raise HttpError(422, err.code, err.message, "correct the message") from err
    except StoreError as err:
        raise HttpError(503, err.code, f"the message could not be stored: {err.message}",
                        "retry later with the same Idempotency-Key",
                        headers={"Retry-After": "5"}) from err
    if msg_id != env.id:  # the key's first request was answered before: same message
        row = await asyncio.to_thread(ctx.queue.log.get, msg_id)
        out = Accepted(id=msg_id, status=str(row["status"]) if row else "queued",
                       recipients=list(row["recipients"]) if row else env.recipients,
                       duplicate=True)
        return Answer(200, out)
    if ctx.on_enqueued is not None and env.not_before is None:
        ctx.on_enqueued(env.id)
    out = Accepted(id=env.id, status="queued", recipients=env.recipients,
                   send_at=_iso(env.not_before) if env.not_before else None)
    return Answer(202, out)


def _iso(at: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(at, dt.UTC)


def _owned(row: dict[str, Any] | None, app: str, msg_id: str) -> dict[str, Any]:
    # Another app's message is "not found", not "forbidden": its existence is not told.
    if row is None or row["id"] != msg_id or row["app"] != app:
        raise HttpError(404, "message.unknown", f"no message {msg_id!r} for this app",
                        "use an id this app's send returned; GET /api/v1/messages lists them",
                        field="id")
    return row


def _out(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: row[k] for k in ("id", "status", "attempt_count", "sender", "source",
                               "connection", "message_id", "subject", "from_header",
                               "to_header", "size", "last_error")},
        "recipients": list(row["recipients"]),
        "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
        "next_attempt_at": _iso(row["next_attempt_at"]),
        "tags": list(row.get("tags") or []), "metadata": dict(row.get("meta") or {}),
    }


def _cursor(row: dict[str, Any]) -> str:
    data = json.dumps([row["created_at"], row["id"]]).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _before(cursor: str) -> tuple[float, str]:
    try:
        at, last = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(last, str) or isinstance(at, bool):
            raise TypeError(last)
        return float(at), last
    except (ValueError, TypeError, binascii.Error):
        raise HttpError(422, "request.cursor", "cursor is not one this API returned",
                        "pass the `next` value of the previous page unchanged",
                        field="cursor") from None


# -- routes --------------------------------------------------------------------------------
_ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"description": "Stored; it will be delivered."},
             200: {"model": Accepted, "description": "Repeat of an Idempotency-Key: the "
                   "message queued the first time; nothing new was queued."},
             409: {"model": ErrorBody, "description": "Idempotency-Key already used for a "
                   "different request."}}


async def send_message(call: Call) -> Answer:
    ctx, app = call.ctx, call.app
    body: MessageIn = call.body  # the route's body model, validated
    not_before = _send_at(ctx, body.send_at)
    connection = body.connection
    draft, size = _draft(ctx, body)

    expires_at = None if body.expires_at is None else _time(body.expires_at, "expires_at")

    def compose() -> Envelope:
        env = build(draft, source=f"api:{app}", connection=connection, tags=body.tags,
                    metadata=body.metadata, not_before=not_before,
                    max_size=ctx.settings.server.max_message_size)
        env.priority = PRIORITIES[body.priority]
        env.expires_at = expires_at
        return env

    try:
        # HTML is turned into text at about a microsecond a byte: off the loop well before
        # _THREAD_ABOVE, or a few hundred KB of it would stall every other request.
        threaded = size > _THREAD_ABOVE or len(body.html or "") > _THREAD_ABOVE // 16
        env = await asyncio.to_thread(compose) if threaded else compose()
    except MessageError as err:
        status = 413 if err.code == "message.too_large" else 422
        raise HttpError(status, err.code, err.message, "correct the message") from err
    return await _enqueue(ctx, env, app, call.args["idempotency_key"],
                          lambda: _hash("messages", body.model_dump(mode="json", by_alias=True)))


_RAW_BODY = {"requestBody": {"required": True, "description": "A whole RFC 5322 message.",
                             "content": {"message/rfc822": {"schema": {
                                 "type": "string", "format": "binary"}}}}}


async def send_raw(call: Call) -> Answer:
    ctx, app, args = call.ctx, call.app, call.args
    ctype = (call.header(b"content-type") or "").split(";")[0].strip().lower()
    if ctype != "message/rfc822":
        raise HttpError(415, "request.content_type",
                        f"Content-Type is {ctype or 'missing'!r}, not message/rfc822",
                        "send the message as the body with 'Content-Type: message/rfc822'")
    raw = call.raw
    try:
        ctx.checks().check_size(len(raw))  # before parsing it
    except IntakeError as err:
        raise _refused(err) from err
    not_before = _send_at(ctx, args["send_at"])
    sender, to = args["sender"], args["to"]
    tags: list[str] = args["tag"] or []
    for i, t in enumerate(tags):
        if not 1 <= len(t) <= 100:
            raise HttpError(422, "request.tag", "a tag has 1 to 100 characters",
                            "shorten the tag", field=f"tag[{i}]")
    try:
        host = ctx.settings.server.hostname
        parsed = (await asyncio.to_thread(http_raw.check, raw, host)
                  if len(raw) > _THREAD_ABOVE else http_raw.check(raw, host))
    except MessageError as err:
        raise HttpError(422, err.code, err.message, "correct the message", field="body") from err
    env_sender = _addresses("from", [sender])[0] if sender else parsed.sender
    rcpts = _addresses("to", to) if to else parsed.recipients
    try:
        validate_address(env_sender)
    except MessageError as err:
        raise HttpError(422, err.code, err.message, "fix the From header or pass ?from=",
                        field="from") from err
    if not rcpts:
        raise HttpError(422, "message.no_recipients", "no recipient: the message has no "
                        "To, Cc or Bcc and no ?to= was given", "add ?to=addr (repeatable)",
                        field="to")
    for i, r in enumerate(rcpts):
        try:
            validate_address(r)
        except MessageError as err:
            raise HttpError(422, err.code, err.message, "fix the address or pass ?to=",
                            field=f"to[{i}]") from err
    _recipient_limit(ctx, len(set(rcpts)))
    env = Envelope(env_sender, list(dict.fromkeys(rcpts)), parsed.raw, source=f"api:{app}",
                   connection=args["connection"], tags=tags, not_before=not_before)
    query = sorted(call.query)
    return await _enqueue(ctx, env, app, args["idempotency_key"],
                          lambda: _hash("raw", query, hashlib.sha256(raw).hexdigest()))


async def list_messages(call: Call) -> Answer:
    ctx, a = call.ctx, call.args
    since, until, event, limit = a["since"], a["until"], a["event"], a["limit"]
    wanted = LogFilter(status=a["status"], to=a["recipient"] or None,
                       sender=a["sender"] or None, text=a["q"] or None, tag=a["tag"] or None,
                       app=call.app, since=_time(since, "since") if since else None,
                       until=_time(until, "until") if until else None,
                       event=str(event) if event else None)
    cursor = a["cursor"]
    rows = await asyncio.to_thread(ctx.queue.log.page, wanted,
                                   before=_before(cursor) if cursor else None, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return Answer(200, MessagePage(messages=[MessageOut.model_validate(_out(r)) for r in rows],
                                   next=_cursor(rows[-1]) if more else None))


async def get_message(call: Call) -> Answer:
    # The advice catalog is read here, not when sending: an app that only sends never
    # loads it.
    from postroom.diagnostics.advice import advice_for_attempt

    ctx, msg_id = call.ctx, call.args["msg_id"]
    row = _owned(await asyncio.to_thread(ctx.queue.log.get, msg_id), call.app, msg_id)
    # The message's own recipients, then the copies its policy added (marked "forced").
    forced = [r for r, st in row["rcpt_status"].items() if st.get("forced")]
    states = [{"address": r, **{k: v for k, v in row["rcpt_status"].get(r, {}).items()
                                if k in ("state", "code", "reply", "forced")}}
              for r in [*row["recipients"], *forced]]
    attempts = [{**a, "started_at": _iso(a["started_at"]), "ended_at": _iso(a["ended_at"]),
                 "permanent": bool(a["permanent"]), "transcript": a["transcript"] or "",
                 "advice": advice_for_attempt(a, settings=ctx.settings)}
                for a in row["attempts"]]
    from postroom.webhooks.intake import EventLog  # the event tables' code: when first asked

    reported = await asyncio.to_thread(EventLog(ctx.queue).for_message, row["id"])
    return Answer(200, MessageDetail.model_validate(
        {**_out(row), "recipient_states": states, "attempts": attempts,
         "delivery_events": [{**ev, "at": _iso(ev["at"])} for ev in reported]}))


async def resend(call: Call) -> Answer:
    ctx, app, msg_id, body = call.ctx, call.app, call.args["msg_id"], call.body
    row = _owned(await asyncio.to_thread(ctx.queue.log.get, msg_id), app, msg_id)
    if row["raw"] is None:
        raise HttpError(409, "message.no_body", f"message {msg_id} has no stored body",
                        "it was purged; send it again")
    to = _addresses("to", body.to) if body and body.to else list(row["recipients"])
    _recipient_limit(ctx, len(set(to)))
    env = Envelope(row["sender"], list(dict.fromkeys(to)), row["raw"], source=f"api:{app}",
                   connection=row["connection"], id=new_id(), tags=list(row["tags"] or []),
                   metadata=dict(row["meta"] or {}))
    return await _enqueue(ctx, env, app, call.args["idempotency_key"],
                          lambda: _hash("resend", msg_id, to))


async def list_connections(call: Call) -> Answer:
    from postroom.queue.status import connections_report

    policy = _policy(call.ctx, call.app)
    report: dict[str, Any] = await asyncio.to_thread(connections_report, call.ctx.queue,
                                                     call.ctx.settings)
    if policy.connections:
        report["connections"] = [c for c in report["connections"]
                                 if policy.may_use(str(c.get("name")))]
    return Answer(200, report)


def _query(name: str, annotation: Any, default: Any = None, **more: Any) -> Param:
    return Param(name, "query", annotation, default, **more)


_SINCE = "ISO 8601 or epoch s."
TABLE = Table(PREFIX, [
    Route("POST", "/messages", send_message, "Compose and send a message",
          params=(IDEMPOTENCY,), body=MessageIn, status=202, response_model=Accepted,
          responses=_ACCEPTED),
    Route("POST", "/messages/raw", send_raw, "Send a ready-made MIME message", params=(
        _query("sender", str | None, alias="from",
               description="Envelope sender; default: the From address."),
        _query("to", list[str] | None, many=True, description=(
            "Envelope recipients (repeat the parameter); default: To, Cc and Bcc. Bcc "
            "fields are removed from the message either way.")),
        _query("connection", str | None),
        _query("tag", list[str] | None, many=True, constraints={"max_length": 20}),
        _query("send_at", str | None, description="ISO 8601 with a zone, or epoch s."),
        IDEMPOTENCY),
        status=202, response_model=Accepted, openapi_extra=_RAW_BODY,
        responses={**_ACCEPTED, 415: {"model": ErrorBody, "description": "Not message/rfc822."}}),
    Route("GET", "/messages", list_messages, "Search the log, newest first", params=(
        _query("status", Literal[STATUSES] | None),
        _query("recipient", str | None, constraints={"max_length": 320}),
        _query("sender", str | None, constraints={"max_length": 320}),
        _query("q", str | None, constraints={"max_length": 200},
               description="Text in the subject, From, To or Message-ID."),
        _query("tag", str | None, constraints={"max_length": 100}),
        _query("since", str | None, description=_SINCE),
        _query("until", str | None, description=_SINCE),
        _query("event", Kind | None,
               description="Had a delivery event of this kind (bounced, complained...)."),
        _query("limit", int, 50, constraints={"ge": 1, "le": 200}),
        _query("cursor", str | None, constraints={"max_length": 200})),
        response_model=MessagePage),
    Route("GET", "/messages/{msg_id}", get_message,
          "One message: recipients' states and every attempt", params=(MSG_ID,),
          response_model=MessageDetail,
          responses={404: {"model": ErrorBody, "description": "No such message."}}),
    Route("POST", "/messages/{msg_id}/resend", resend,
          "Queue a copy (to the same or other recipients)", params=(MSG_ID, IDEMPOTENCY),
          body=ResendIn, body_required=False, status=202, response_model=Accepted,
          responses={**_ACCEPTED, 404: {"model": ErrorBody, "description": "No such message."}}),
    Route("GET", "/connections", list_connections,
          "Connections: health, pause switch, limits in use", response_model=dict[str, Any],
          # The line break as the description had it when it was a docstring.
          description="The same as `postroom connections --json`, limited to the connections "
          "this app may\nuse (when `postroom app set --connection` limits it)."),
])


def create_app(ctx: Context, *, admin: AdminPart = "all", pages: bool = True) -> FastAPI:
    """The FastAPI application: the OAuth pages, the OpenAPI document (with ``TABLE``'s
    operations) and its docs page, and, as ``admin`` says, none of the web admin, its
    pages alone, or its pages and its JSON API (postroom.web). ``TABLE`` itself is served
    by the HTTP front (ingress.api_dispatch), never by this application. Under `postroom
    serve` the web admin's process (ingress.admin_child) runs it; the front runs one
    itself only without that process (an application embedded on its own), and then
    with the admin part a request needs, the admin's modules imported only then.
    ``pages=False``: without the OAuth pages, the OpenAPI document and the docs page."""
    from fastapi import FastAPI

    from postroom.ingress import api_openapi
    from postroom.ingress.http_errors import install

    api = FastAPI(
        title="Postroom API", version=__version__,
        description="Hand mail to Postroom, follow it, resend it. Authenticate with the API "
        "key `postroom app add NAME` prints. Errors: `{\"error\": {code, message, fix, "
        "field}}`.",
        openapi_url=f"{PREFIX}/openapi.json" if pages else None, docs_url=None,
        redoc_url=None,
    )
    api.state.ctx = ctx
    api.include_router(api_openapi.router(TABLE, ERRORS))
    if pages:
        from postroom.ingress import http_docs
        from postroom.oauth import web as oauth_web

        http_docs.install(api, PREFIX, api.title)  # Swagger UI from the package, no CDN
        api.include_router(oauth_web.router)  # /oauth/start/{connection}, /oauth/callback
    if admin != "none":  # /, /admin (pages), /api/v1/admin (JSON): postroom.web
        from postroom.web import app as web_app

        web_app.install(api, json=admin == "all")
    install(api)
    return api
