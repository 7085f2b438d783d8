"""``/api/v1/admin/messages/{id}``: one logged message as JSON, its body (role-checked and
audited), and the single-message actions: resend, retry now, delete. The same service
functions as the message page (postroom.ops.messages)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from postroom.audit import Actor, Role
from postroom.ingress.http_errors import HttpError
from postroom.ingress.http_models import ErrorBody
from postroom.ops import messages as ops
from postroom.web import api, auth
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=api.router.prefix + "/messages", tags=["admin"],
                   responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such message."}}


class Header(BaseModel):
    name: str
    value: str = Field(description="Decoded (RFC 2047) and unfolded.")


class RecipientState(BaseModel):
    address: str
    state: str = Field(description="pending, sent or failed.")
    code: int | None = None
    reply: str | None = None
    forced: str | None = Field(None, description="The message policy rule that added this "
                               "copy (retried on its own), if any.")


class Advice(BaseModel):
    id: str
    cause: str
    fix: str
    docs: list[str] = []
    recipient: str | None = None


class Attempt(BaseModel):
    connection: str
    started_at: float
    ended_at: float
    outcome: str
    reply_code: int | None = None
    reply_text: str | None = None
    error_code: str | None = None
    permanent: bool
    recipients: dict[str, dict[str, Any]]
    transcript: str = Field(description="The SMTP (or API) session; secrets redacted.")
    provider_id: str | None = Field(None, description="The provider's id for the message "
                                    "(what its delivery events name).")
    advice: Advice | None = Field(None, description="Why it failed and the fix.")


class Event(BaseModel):
    at: float
    kind: str = Field(description="One of postroom.events.Kind: fallback_used, "
                      "lease_expired, retry_requested...")
    severity: str = Field("info", description="info, warning or error.")
    connection: str | None = None
    detail: str = ""


class MessageDetail(BaseModel):
    id: str
    status: str
    created_at: float
    updated_at: float
    next_attempt_at: float
    sender: str
    recipients: list[str]
    from_header: str
    to_header: str
    subject: str
    message_id: str
    app: str | None
    source: str = Field(description="The door it came through (\"smtp\", \"http:shop\"...).")
    connection: str | None = Field(description="The connection the sender chose, if any.")
    via: str | None = Field(None, description="The connection that last tried it.")
    size: int
    attempt_count: int
    last_error: str | None
    tags: list[str] = []
    metadata: dict[str, Any] = {}
    purged: bool = Field(description="The body was removed by retention.")
    may_see_body: bool = Field(description="Whether this account may GET the body "
                               "([admin] bodies).")
    headers: list[Header]
    recipient_states: list[RecipientState]
    attempts: list[Attempt]
    events: list[Event]


class Part(BaseModel):
    index: int = Field(description="Download it from /admin/messages/{id}/parts/{index}.")
    filename: str
    content_type: str
    size: int
    content_id: str
    inline: bool


class Body(BaseModel):
    text: str | None
    html: str | None = Field(description="As sent: never insert it into a page unsandboxed.")
    attachments: list[Part]
    truncated: bool = Field(description="The message has more parts than are listed.")


class ResendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[str] | None = Field(None, max_length=ops.MAX_RESEND_TO, description=(
        "Other recipients; absent: the original ones."))


class Resent(BaseModel):
    id: str = Field(description="The new message's id (a new log entry).")
    copy_of: str


class Retried(BaseModel):
    id: str
    was: str = Field(description="The status before.")
    recipients: list[str] = Field(description="The recipients that will be tried.")


class Deleted(BaseModel):
    id: str
    deleted: bool


@router.get("/{msg_id}", summary="A logged message", responses=NOT_FOUND)
async def get_message(request: Request, actor: Viewer, msg_id: str) -> MessageDetail:
    """Its log entry without the content: summary, header fields, recipients and their
    states, every attempt with transcript and advice, provider events."""
    m = await call(ops.detail, instance(request), actor, msg_id)
    return MessageDetail(**{**m, "metadata": m.get("meta") or {}, "tags": m.get("tags") or [],
                            "headers": [Header(name=n, value=v) for n, v in m["headers"]]})


@router.get("/{msg_id}/body", summary="A message's content", responses=NOT_FOUND)
async def get_body(request: Request, actor: Viewer, msg_id: str) -> Body:
    """The text and HTML bodies and the attachments' list. Needs the role [admin] bodies
    names (admin by default); each call is written to the audit log."""
    b = await call(ops.body_parts, instance(request), actor, msg_id)
    return Body(text=b.text, html=b.html, truncated=b.truncated,
                attachments=[Part(**vars(p)) for p in b.parts])


@router.post("/{msg_id}/resend", summary="Resend a message", responses=NOT_FOUND,
             status_code=201)
async def resend(request: Request, actor: Admin, msg_id: str,
                 data: ResendRequest | None = None) -> Resent:
    """Queue a copy (a new log entry) to the original recipients, or to ``to``."""
    inst = instance(request)
    to = data.to if data is not None else None
    full = await call(ops.full_id, inst, msg_id)
    new_id = await call(ops.resend, inst, actor, full, to)
    hook = request.app.state.ctx.on_enqueued
    if hook is not None:
        hook(new_id)
    return Resent(id=new_id, copy_of=full)


@router.post("/{msg_id}/retry", summary="Retry a message now", responses=NOT_FOUND)
async def retry(request: Request, actor: Admin, msg_id: str) -> Retried:
    """Make it due now; a failed or partial message's failed recipients are tried again.
    409 while it is being sent, or when it was sent (resend it instead)."""
    done = await call(ops.retry, instance(request), actor, msg_id)
    hook = request.app.state.ctx.on_enqueued
    if hook is not None:
        hook(done.id)
    return Retried(id=done.id, was=done.was, recipients=list(done.recipients))


@router.delete("/{msg_id}", summary="Delete a message", responses=NOT_FOUND)
async def delete(request: Request, actor: Admin, msg_id: str) -> Deleted:
    """Remove it and its attempts from the log (never while it is being sent: 409)."""
    if not await call(ops.delete, instance(request), actor, msg_id):
        raise HttpError(404, "message.unknown", f"no message {msg_id!r}",
                        "list messages with the log page")
    return Deleted(id=msg_id, deleted=True)
