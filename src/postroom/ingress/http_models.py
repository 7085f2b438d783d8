"""The HTTP API's request and response bodies (pydantic models; they are the OpenAPI schema).

Header injection is refused here, field by field: a CR, LF or NUL in anything that becomes a
header (addresses, subject, custom headers, file names) is a 422 naming the field, never a
new header line (RFC 5322 2.2: a header field is one line, folding is the composer's job).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_TAGS = 20
MAX_METADATA = 50


def _unicode(value: Any) -> Any:
    # JSON can carry lone UTF-16 surrogates ("\ud800") that no UTF-8 text can hold.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (a lone surrogate such as "
                             "\\ud800); send UTF-8 text") from None
    return value


def _one_line(value: Any) -> Any:
    if isinstance(value, str) and any(c in value for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL (header injection); "
                         "send one line per value")
    return _unicode(value)


def _addresses(value: Any) -> Any:
    """A single address is accepted where a list is expected ("to": "bob@example.org")."""
    return [value] if isinstance(value, str) else value


Line = Annotated[str, BeforeValidator(_one_line)]
Text = Annotated[str, BeforeValidator(_unicode)]
AddressList = Annotated[list[Line], BeforeValidator(_addresses)]
Tag = Annotated[str, BeforeValidator(_one_line), Field(min_length=1, max_length=100)]
MetaKey = Annotated[str, BeforeValidator(_one_line), Field(min_length=1, max_length=100)]
MetaValue = Annotated[Text, Field(max_length=1000)]


class _Model(BaseModel):
    # Unknown fields are refused: a typo ("tos") must not silently drop recipients.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AttachmentIn(_Model):
    filename: Line = Field(min_length=1, max_length=255, examples=["invoice.pdf"])
    content: Text = Field(description="The file's bytes, base64-encoded (RFC 4648).")
    content_type: Line | None = Field(
        default=None, max_length=255, description="Guessed from the file name when omitted.")
    content_id: Line | None = Field(
        default=None, max_length=255,
        description='Makes it an inline part the HTML shows with <img src="cid:CONTENT_ID">.')


class MessageIn(_Model):
    """A message to compose. Every address may be "addr" or "Name <addr>"."""

    from_: Line = Field(alias="from", min_length=1, examples=["Shop <shop@example.com>"])
    to: AddressList = Field(default_factory=list, examples=[["bob@example.org"]])
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list, description="Envelope only, never a header.")
    reply_to: AddressList = Field(default_factory=list)
    subject: Line = ""
    text: Text | None = None
    html: Text | None = Field(default=None, description="Without text, a text part is derived.")
    attachments: list[AttachmentIn] = Field(default_factory=list)
    headers: dict[Line, Line] = Field(default_factory=dict, examples=[{"X-Order": "42"}])
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA)
    connection: Line | None = Field(
        default=None, description="Deliver through this named connection only.")
    send_at: Text | float | None = Field(
        default=None, description="Not delivered before: ISO 8601 with a time zone, or epoch "
        "seconds.", examples=["2030-01-01T09:00:00+00:00"])
    priority: Literal["high", "normal", "low"] = Field(
        default="normal", description="High-priority mail (a password reset) is delivered "
        "before normal and low (a newsletter).")
    expires_at: Text | float | None = Field(
        default=None, description="Failed, not sent late, after this time (ISO 8601 with a "
        "time zone, or epoch seconds): for one-time codes and the like.")

    @field_validator("send_at", "expires_at")
    @classmethod
    def _finite(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number of epoch seconds")
        return v


class ResendIn(_Model):
    to: AddressList = Field(
        default_factory=list, description="Other recipients; default: the original ones.")


class Accepted(BaseModel):
    id: str = Field(examples=["5f0c3a9e2b7d4c1e8a6f0b2d4c6e8a0b"])
    status: str = Field(examples=["queued"])
    recipients: list[str]
    send_at: dt.datetime | None = Field(
        default=None, description="Not delivered before this time (scheduled sending).")
    duplicate: bool = Field(
        default=False,
        description="True when this Idempotency-Key already queued this message earlier: "
        "nothing new was queued.")


class RecipientOut(BaseModel):
    address: str
    state: str = Field(description="pending | sent | failed")
    code: int | None = None
    reply: str | None = None
    forced: str | None = Field(
        default=None, description="to | cc | bcc: a recipient added by the message policy "
        "(an archive copy). Its state does not decide the message's status; while pending "
        "it is retried on its own until the message's lifetime ends.")


class AttemptOut(BaseModel):
    started_at: dt.datetime
    ended_at: dt.datetime
    connection: str
    outcome: str
    reply_code: int | None = None
    reply_text: str | None = None
    error_code: str | None = None
    permanent: bool
    recipients: dict[str, dict[str, Any]]
    transcript: str
    provider_id: str | None = Field(
        default=None, description="The provider's id for the message (an HTTPS API's "
        "message id, an SMTP server's queue id): what its delivery events name.")
    advice: dict[str, Any] | None = Field(
        default=None, description="When the attempt failed: its likely cause and the fix "
        "(id, cause, fix, docs), from Postroom's advice catalog.")


class MessageOut(BaseModel):
    id: str
    status: str = Field(description="queued | sending | sent | deferred | partial | failed")
    created_at: dt.datetime
    updated_at: dt.datetime
    next_attempt_at: dt.datetime
    attempt_count: int
    sender: str
    recipients: list[str]
    source: str
    connection: str | None = None
    message_id: str
    subject: str
    from_header: str
    to_header: str
    size: int
    tags: list[str]
    metadata: dict[str, Any]
    last_error: str | None = None


class DeliveryEventOut(BaseModel):
    at: dt.datetime = Field(description="When it happened, by the provider's clock.")
    kind: str = Field(description="queued | delivered | deferred | bounced | rejected | "
                      "complained | unsubscribed | opened | clicked | unknown")
    recipient: str | None = None
    permanent: bool | None = Field(
        default=None, description="For a bounce: hard (true) or soft (false), if known.")
    detail: str = Field(description="The provider's or the report's words (status code...).")
    connection: str = Field(description="The connection whose webhook or DSN reported it.")


class MessageDetail(MessageOut):
    recipient_states: list[RecipientOut]
    attempts: list[AttemptOut]
    delivery_events: list[DeliveryEventOut] = Field(
        default_factory=list, description="What became of it after it left: the provider's "
        "webhook events and the DSNs that came back, oldest first.")


class MessagePage(BaseModel):
    messages: list[MessageOut]
    next: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last one.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, for programs: e.g. address.malformed")
    message: str = Field(description="What is wrong, for people.")
    fix: str = Field(description="How to fix it.")
    field: str | None = Field(default=None, description="The request field at fault, if one.")


class ErrorBody(BaseModel):
    error: ErrorDetail

