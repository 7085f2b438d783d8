"""Postmark: ``POST /email`` with the message as JSON (Postmark "Email API", "API overview:
error codes"). The worked example of ADDING_PROVIDERS.md: settings, request, result and
the documented errors as a table; the base (transports._http) does the rest.

- Auth: ``X-Postmark-Server-Token: <server API token>`` (one token per Postmark server);
  ``test_mode = true`` sends the token ``POSTMARK_API_TEST``, which validates the request
  and delivers nothing.
- Request: ``From``, ``To``/``Cc``/``Bcc`` (comma-separated mailboxes, at most 50 in all),
  ``Subject``, ``TextBody``/``HtmlBody``, ``ReplyTo``, ``Headers`` ([{Name, Value}]),
  ``Attachments`` ([{Name, Content (base64), ContentType, ContentID "cid:..." for inline}]),
  ``Tag`` (one), ``Metadata`` ({str: str}), ``MessageStream``. At most 10 MB in all.
- Success: 200 ``{"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}``;
  ``MessageID`` is the id Postmark's webhooks name the message by.
- Errors: 401 or 422 ``{"ErrorCode": n, "Message": "..."}``, 429, 5xx (table below).

Checked against Postmark's own pages on 2026-12-07 (issue 14): the error body and the
HTTP statuses are confirmed (https://postmarkapp.com/developer/api/overview, "HTTP response
codes": 401 for a missing or wrong token, 422 with ``{ErrorCode, Message}``). Its "Error
codes" table was not in the stored copies of that page, so:

- ErrorCode 413 (the account may not send): unverified; only a third-party copy of that
  table lists it.
- ErrorCode 1235 (the message stream is not found): unverified; in none of the copies searched,
  nor in Postmark's Message Streams articles.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import (
    ConnectError,
    DeliveryError,
    ProtocolError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http, _mime

MAX_SIZE = 10 * 1024 * 1024  # "the request exceeded Postmark's size limit of 10 MB"
MAX_RECIPIENTS = 50  # To, Cc and Bcc together
TEST_TOKEN = "POSTMARK_API_TEST"  # Postmark: validates the request, delivers nothing

_Rule = _http.ErrorRule
_SIGNATURE = ("Fix: in Postmark, add the From address (or verify its domain) under Sender "
              "Signatures, or send from an address that has one")
# Postmark's ErrorCode values (API overview, "Error codes") -> what they mean here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "10": _Rule("auth.api_key_refused", auth="refused"),
    "300": _Rule("postmark.invalid_request", "Postmark found the message invalid (an "
                 "address or a field, named above): correct it in the app that sent it"),
    "400": _Rule("postmark.sender_signature_missing", f"no Sender Signature. {_SIGNATURE}",
                 kind=SenderRejected, permanent=False, scope=Scope.CONFIGURATION),
    "401": _Rule("postmark.sender_unconfirmed", "the Sender Signature is not confirmed. Fix: "
                 "follow the link Postmark emailed to that address, or verify the domain "
                 "(DKIM and Return-Path) in Postmark", kind=SenderRejected, permanent=False,
                 scope=Scope.CONFIGURATION),
    "402": _Rule("postmark.json_refused", "Postmark could not read Postroom's request: "
                 "please report it", kind=ProtocolError, scope=Scope.CONNECTION),
    "403": _Rule("postmark.json_refused", "Postmark could not read Postroom's request: "
                 "please report it", kind=ProtocolError, scope=Scope.CONNECTION),
    "405": _Rule("postmark.not_allowed", "the account may not send (out of credits, or "
                 "sending was stopped). Fix: buy credits or contact Postmark support",
                 kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    "406": _Rule("postmark.inactive_recipient", "Postmark suppresses this recipient after a "
                 "hard bounce, spam complaint or manual suppression. Fix: reactivate it under "
                 "the message stream's Suppressions in Postmark if the address works again"),
    "411": _Rule("postmark.forbidden_attachment", "Postmark does not send this attachment "
                 "type (see its list of forbidden file types): send it as a link or zip it"),
    "412": _Rule("postmark.account_pending", "the account awaits approval and until then "
                 "sends only to addresses at the sender's own domain. Fix: request approval "
                 "in Postmark's dashboard", kind=DeliveryError, permanent=False,
                 scope=Scope.CONFIGURATION),
    # 413 and 1235: unverified against Postmark's own table (module header).
    "413": _Rule("postmark.account_blocked", "the account may not send. Fix: contact "
                 "Postmark support", kind=DeliveryError, permanent=False,
                 scope=Scope.CONFIGURATION),
    "429": _Rule("provider.rate_limited", "rate limit. Postroom retries later; lower the "
                 "connection's rate_limit to stay under it", kind=ConnectError,
                 permanent=False),
    "1235": _Rule("postmark.stream_missing", "the server has no such message stream. Fix: "
                  "set message_stream to a stream's ID from Postmark (\"outbound\" by "
                  "default)", kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
}


class PostmarkSettings(_http.ApiKeySettings):
    transport: Literal["postmark"] = "postmark"
    # The stream to send through: "outbound" (transactional) or a broadcast stream's ID.
    message_stream: str = Field(default="outbound", min_length=1)
    test_mode: bool = False  # use the POSTMARK_API_TEST token: nothing is delivered


class PostmarkTransport(_http.HttpTransport):
    settings: PostmarkSettings
    settings_model = PostmarkSettings
    title = "Postmark"
    docs_url = "https://postmarkapp.com/developer/user-guide/send-email-with-api"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "POSTMARK_SERVER_TOKEN",
        "message_stream": "outbound",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "the server's API token (Servers > API Tokens)",
    }
    default_base = "https://api.postmarkapp.com"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS

    def make_auth(self) -> _auth.Auth:
        key: _auth.Credential = (lambda: TEST_TOKEN) if self.settings.test_mode else self.api_key
        return _auth.ApiKeyHeader("X-Postmark-Server-Token", key)

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        if len(m.recipients) > MAX_RECIPIENTS:
            raise UnsupportedFeature(
                f"Postmark sends one message to at most {MAX_RECIPIENTS} recipients (To, Cc "
                f"and Bcc); this one has {len(m.recipients)}: send it in parts",
                code="unsupported.recipients")
        body = _http.json_bytes(self.payload(m))
        if len(body) > MAX_SIZE:
            raise UnsupportedFeature(
                f"the message is {len(body)} bytes as Postmark's JSON; Postmark takes at most "
                f"{MAX_SIZE}: send big files as links", code="unsupported.size")
        return _http.Request("POST", f"{self.base}/email",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, m.summary(len(body)))

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = {"From": m.from_, "To": ", ".join(m.to), "Subject": m.subject,
                                "MessageStream": self.settings.message_stream}
        for key, values in (("Cc", m.cc), ("Bcc", m.bcc), ("ReplyTo", m.reply_to)):
            if values:
                data[key] = ", ".join(values)
        if m.text is not None:
            data["TextBody"] = m.text
        if m.html is not None:
            data["HtmlBody"] = m.html
        if m.headers:
            data["Headers"] = [{"Name": k, "Value": v} for k, v in m.headers]
        if m.attachments:
            data["Attachments"] = [_attachment(a) for a in m.attachments]
        metadata = dict(m.metadata)
        if m.tags:
            data["Tag"] = m.tags[0]  # Postmark keeps one tag: with more, Metadata has them all
            if len(m.tags) > 1:
                metadata["tags"] = ", ".join(m.tags)
        if metadata:
            data["Metadata"] = metadata
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        data = _http.json_body(resp)
        msg_id = data.get("MessageID")
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        code = data.get("ErrorCode")
        return _http.ApiError(resp.status_code, "" if code is None else str(code),
                              str(data.get("Message") or resp.reason_phrase))

    def check_request(self) -> _http.Request:
        """``GET /server``: the server's settings; sends nothing."""
        return _http.Request("GET", f"{self.base}/server", {"Accept": "application/json"}, b"",
                             "the server's settings")

    def checked(self, resp: httpx.Response) -> str:
        name = _http.json_body(resp).get("Name")
        return "the server token works" + (f" (server {name!r})" if name else "")


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"Name": a.filename, "Content": base64.b64encode(a.data).decode("ascii"),
           "ContentType": a.content_type}
    if a.content_id:
        out["ContentID"] = f"cid:{a.content_id}"
    return out
