"""Elastic Email: ``POST /v4/emails/transactional`` with the message as JSON (Elastic Email REST
API v4 reference, https://elasticemail.com/developers/api-documentation/rest-api, models
EmailTransactionalMessageData, TransactionalRecipient, EmailContent, BodyPart,
MessageAttachment, Options, EmailSend; "Statistics: Load Channels Stats").

- Auth: ``X-ElasticEmail-ApiKey: <API key>`` (a key with the "Send Http" access level).
- Request: ``{"Recipients": {"To": [...], "CC": [...], "BCC": [...]}, "Content": {"From",
  "ReplyTo" (one), "Subject", "Body": [{"ContentType": "HTML" | "PlainText", "Content",
  "Charset"}], "Attachments": [{"BinaryContent" (base64), "Name", "ContentType"}], "Headers":
  {name: value}, "Postback"}, "Options": {"PoolName", "ChannelName"}}``; addresses are
  "Name <a@example.com>" strings. Attachments have no Content-ID: inline images are refused.
  Elastic Email has no tag or metadata field; ``Postback`` ("returned in notifications")
  carries Postroom's tags and metadata as JSON.
- Success: 200 ``{"TransactionID", "MessageID"}``: ``MessageID`` names the message in
  Elastic Email's logs and notifications.
- Errors: the HTTP status, with the reason in the body's ``Error`` text (the v4 reference
  documents no error codes): 400 the request, 401 the key, 403 the key's access level or the
  account's state, 429, 5xx.
- Delivery events: Elastic Email's notification webhooks are not supported here, as
  Postroom accepts no unsigned events. Checked on 2026-12-07 (issue 14): Elastic Email's
  own "Notification Settings" article
  (https://help.elasticemail.com/en/articles/4804685-notification-settings) documents the
  payload (a GET to the notification URL with from, to, date, subject, status, channel,
  account, category, messageid, transaction, target, postback as URL parameters) and no
  signature, and the v4 endpoint reference in Elastic Email's elasticemail-skills
  repository has no webhook endpoint. Signing: not found in the provider's own docs (a
  third-party OpenAPI rewrite mentions a ``whsec_`` signing secret: not built on).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import AuthError, ConnectError, UnsupportedFeature
from postroom.transports import _auth, _http, _mime

_Rule = _http.ErrorRule
# Elastic Email answers with a status and a sentence, no error code: statuses only.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    400: _Rule("elasticemail.invalid_request", "Elastic Email refused the request (its reason "
               "is above: an address, a field, or an unverified sender domain): correct the "
               "message, or verify the domain under Settings > Domains in Elastic Email"),
    429: _Rule("provider.rate_limited", "rate limit. Postroom retries later; lower the "
               "connection's rate_limit to stay under it", kind=ConnectError, permanent=False),
}


class ElasticEmailSettings(_http.ApiKeySettings):
    transport: Literal["elasticemail"] = "elasticemail"
    pool_name: str | None = Field(default=None, min_length=1)  # a custom IP pool's name
    channel_name: str | None = Field(default=None, min_length=1)  # Elastic Email's channel


class ElasticEmailTransport(_http.HttpTransport):
    settings: ElasticEmailSettings
    settings_model = ElasticEmailSettings
    title = "Elastic Email"
    docs_url = "https://elasticemail.com/developers/api-documentation/rest-api"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "ELASTICEMAIL_API_KEY",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "access level \"Send Http\"",
    }
    default_base = "https://api.elasticemail.com"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = None  # see the module's docstring

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("X-ElasticEmail-ApiKey", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        if any(a.inline for a in m.attachments):
            raise UnsupportedFeature(
                "Elastic Email's API has no Content-ID for attachments, so this message's "
                "inline images cannot be sent as inline: link them from the HTML, or route "
                "such mail to an SMTP connection", code="unsupported.inline")
        if len(m.reply_to) > 1:
            raise UnsupportedFeature(
                f"Elastic Email takes one Reply-To address; this message has "
                f"{len(m.reply_to)}: send it with one, or through a provider that takes "
                "several", code="unsupported.reply_to")
        # No size check here: the v4 reference states no limit; a message over Elastic
        # Email's is refused by it (413, data.too_big).
        body = _http.json_bytes(self.payload(m))
        return _http.Request("POST", f"{self.base}/v4/emails/transactional",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        recipients: dict[str, list[str]] = {"To": list(m.to)}
        for key, values in (("CC", m.cc), ("BCC", m.bcc)):
            if values:
                recipients[key] = list(values)
        parts = [{"ContentType": kind, "Content": text, "Charset": "utf-8"}
                 for kind, text in (("HTML", m.html), ("PlainText", m.text)) if text is not None]
        content: dict[str, Any] = {"From": m.from_, "Subject": m.subject, "Body": parts}
        if m.reply_to:
            content["ReplyTo"] = m.reply_to[0]
        if m.attachments:
            content["Attachments"] = [
                {"BinaryContent": base64.b64encode(a.data).decode("ascii"), "Name": a.filename,
                 "ContentType": a.content_type} for a in m.attachments]
        headers = _mime.header_dict(m, self.title)
        if headers:
            content["Headers"] = headers
        postback = _mime.labels_json(m)
        if postback:
            content["Postback"] = postback
        data: dict[str, Any] = {"Recipients": recipients, "Content": content}
        options = {k: v for k, v in (("PoolName", self.settings.pool_name),
                                     ("ChannelName", self.settings.channel_name)) if v}
        if options:
            data["Options"] = options
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        msg_id = _http.json_body(resp).get("MessageID")
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        said = next((str(data[k]) for k in ("Error", "error", "Message", "message")
                     if data.get(k)), resp.text[:300] or resp.reason_phrase)
        return _http.ApiError(resp.status_code, "", said)

    def check_request(self) -> _http.Request:
        """``GET /v4/statistics/channels?limit=1``: a read of the channels' statistics;
        nothing is sent."""
        return _http.Request("GET", f"{self.base}/v4/statistics/channels?limit=1",
                             {"Accept": "application/json"}, b"", "the channels' statistics")

    def checked(self, resp: httpx.Response) -> str:
        return "the API key works"

    async def check(self) -> str:
        """A key restricted to sending (the least privilege) may not read statistics: its
        403 still proves Elastic Email knows the key (a wrong one gets 401)."""
        try:
            return await super().check()
        except AuthError as err:
            if err.reply_code != 403:
                raise
            return (f"{err.transcript}\n*  {self.title}: the API key works (it may not read "
                    "statistics, which sending does not need)")
