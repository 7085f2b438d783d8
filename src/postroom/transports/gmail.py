"""Gmail API: ``users.messages.send`` with the raw MIME message (Google "Sending Email" and
"Uploading Attachments" guides).

- Up to ``upload_above`` bytes: ``POST /gmail/v1/users/{user}/messages/send`` with the JSON
  body ``{"raw": <base64url of the RFC 2822 message>}``;
- larger: the media upload endpoint, ``POST /upload/gmail/v1/users/{user}/messages/send?
  uploadType=media`` with ``Content-Type: message/rfc822`` and the message as it is (no
  base64 inflation), up to Gmail's 35 MB.

Gmail delivers to the addresses in To/Cc/Bcc (it removes Bcc): envelope recipients missing
there are added as Bcc (transports._http.match_headers). Scopes: gmail.send (or
https://mail.google.com/). Errors: ``{"error": {"code", "message", "status", "errors":
[{"reason"}], "details": [{"reason"}]}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import DataRejected, DeliveryError
from postroom.transports import _http

MAX_SIZE = 35 * 1024 * 1024  # Gmail API: messages.send accepts at most 35 MB


class Settings(_http.HttpSettings):
    transport: Literal["gmail"] = "gmail"
    user: str = "me"  # the mailbox: "me" (who signed in) or an address (service accounts)
    # Above this size the upload endpoint takes the message as it is ("simple upload" is for
    # "5 MB or less" per Google; the JSON form costs a third more in base64).
    upload_above: int = Field(default=4 * 1024 * 1024, ge=0)


class Transport(_http.HttpTransport):
    settings: Settings
    settings_model = Settings
    title = "Gmail API"
    docs_url = "https://developers.google.com/gmail/api/guides/sending"
    default_base = "https://gmail.googleapis.com"
    scope_codes = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})
    rate_codes = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded",
                            "RATE_LIMIT_EXCEEDED", "quotaExceeded"})
    send_as_codes = frozenset({"invalidFrom"})  # "Invalid From header" for an unknown alias
    # The mailbox/user setting names no mailbox this grant can send from.
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = dict.fromkeys(
        ("failedPrecondition", "notFound", 404),
        _http.ErrorRule("config.mailbox", "check the connection's user setting",
                        kind=DeliveryError, permanent=False))

    def build(self, env: Envelope) -> _http.Request:
        raw = _http.match_headers(env, self.title)
        if len(raw) > MAX_SIZE:
            raise DataRejected(f"the message is {len(raw)} bytes; the Gmail API sends at most "
                               f"{MAX_SIZE}", code="data.too_big", permanent=True,
                               reply_code=552)
        user = quote(self.settings.user, safe="@")
        if len(raw) > self.settings.upload_above:
            return _http.Request(
                "POST", f"{self.base}/upload/gmail/v1/users/{user}/messages/send"
                "?uploadType=media", {"Content-Type": "message/rfc822"}, raw,
                f"media upload, message/rfc822, {len(raw)} bytes")
        body = json.dumps({"raw": _http.b64url(raw)}).encode()
        return _http.Request(
            "POST", f"{self.base}/gmail/v1/users/{user}/messages/send",
            {"Content-Type": "application/json"}, body,
            f"raw MIME, {len(raw)} bytes as base64url in JSON")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        try:
            data = resp.json()
        except ValueError:
            data = {}
        msg_id = data.get("id") if isinstance(data, dict) else None
        return (str(msg_id) if msg_id else None), None

    def accepted(self, resp: httpx.Response) -> str:
        return f"{resp.status_code} sent"

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        err = _http.json_error(resp)
        reasons = [d.get("reason") for d in err.get("errors", []) + err.get("details", [])
                   if isinstance(d, dict) and d.get("reason")]
        code = str(reasons[0] if reasons else err.get("status") or "")
        # A more specific reason (ACCESS_TOKEN_SCOPE_INSUFFICIENT) beats a generic one.
        for r in reasons:
            if r in self.scope_codes | self.rate_codes:
                code = str(r)
        return _http.ApiError(resp.status_code, code,
                              str(err.get("message") or resp.reason_phrase))

    async def check(self) -> str:
        await self._token()
        return f"*  {self.title}: an access token for {self.name} is at hand"
