"""Microsoft Graph ``sendMail`` with the MIME message (Microsoft Graph "user: sendMail",
example "Send a new message using MIME format", and "Send Outlook messages from another
user").

``POST /users/{mailbox}/sendMail`` (or ``/me/sendMail``) with ``Content-Type: text/plain``
and the message base64-encoded as the body; 202 Accepted, no body. Sending as a shared
mailbox or another user: ``mailbox`` names it; with a person's sign-in that needs the
delegated Mail.Send.Shared permission and Send As (or Send on Behalf) rights on it, with
app-only access (client credentials) the application permission Mail.Send. The From header
should be that mailbox.

Graph delivers to the addresses in To/Cc/Bcc (envelope recipients missing there are added
as Bcc). Errors: ``{"error": {"code", "message", "innerError": {...}}}``; a request is at
most 4 MB.
"""

from __future__ import annotations

import base64
from typing import Literal
from urllib.parse import quote

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import UnsupportedFeature
from postroom.transports import _http

MAX_REQUEST = 4 * 1024 * 1024  # Graph REST request body limit


class Settings(_http.HttpSettings):
    transport: Literal["msgraph"] = "msgraph"
    # "me": the account that signed in; else a user id or address: a shared mailbox, another
    # user (send-as), or the mailbox an app-only (client credentials) token sends from.
    mailbox: str = "me"


class Transport(_http.HttpTransport):
    settings: Settings
    title = "Microsoft Graph"
    default_base = "https://graph.microsoft.com/v1.0"
    scope_codes = frozenset({"ErrorAccessDenied", "NoPermissionsInAccessToken",
                             "Authorization_RequestDenied", "AccessDenied"})
    send_as_codes = frozenset({"ErrorSendAsDenied"})
    rate_codes = frozenset({"ApplicationThrottled", "TooManyRequests",
                            "ErrorTooManyObjectsOpened", "MailboxConcurrency"})
    config_codes = frozenset({"ErrorInvalidUser", "MailboxNotEnabledForRESTAPI",
                              "ResourceNotFound", "ErrorMailboxNotFound"})

    def build(self, env: Envelope) -> _http.Request:
        raw = _http.match_headers(env, self.title)
        body = base64.b64encode(raw)
        if len(body) > MAX_REQUEST:
            raise UnsupportedFeature(
                f"the message is {len(raw)} bytes ({len(body)} in base64); Microsoft Graph "
                f"takes at most {MAX_REQUEST} bytes per request: route big messages to an SMTP "
                "connection", code="unsupported.size")
        box = self.settings.mailbox
        path = "me" if box == "me" else f"users/{quote(box, safe='@')}"
        return _http.Request("POST", f"{self.base}/{path}/sendMail",
                             {"Content-Type": "text/plain"}, body,
                             f"MIME, {len(raw)} bytes as base64 text/plain")

    def accepted(self, resp: httpx.Response) -> str:
        rid = resp.headers.get("request-id")
        return f"{resp.status_code} accepted" + (f", request-id {rid}" if rid else "")

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        err = _http.json_error(resp)
        return _http.ApiError(resp.status_code, str(err.get("code") or ""),
                              str(err.get("message") or resp.reason_phrase))

    async def check(self) -> str:
        await self._token()
        return f"*  {self.title}: an access token for {self.name} is at hand"
