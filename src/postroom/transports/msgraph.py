"""Microsoft Graph: the MIME message through ``sendMail``, or, when it is over Graph's 4 MB
request limit, through a draft and upload sessions (Microsoft Graph "user: sendMail",
"Create message" (user-post-messages), "Attach large files to Outlook messages",
"attachment: createUploadSession", "message: send", "Send Outlook messages from another
user").

Up to 4 MB (the base64 text): ``POST /users/{mailbox}/sendMail`` (or ``/me/sendMail``) with
``Content-Type: text/plain`` and the message base64-encoded as the body; 202 Accepted.

Larger, up to ``max_message_size`` (Exchange Online's largest limit, 150 MB, by default):

1. the message without its largest attachments, base64 MIME as above, becomes a draft:
   ``POST /users/{mailbox}/messages`` -> 201 and the message resource (its ``id``);
2. each attachment taken out: of 3 MB or more, ``POST .../messages/{id}/attachments/
   createUploadSession`` with ``{"AttachmentItem": {"attachmentType": "file", "name",
   "size", "contentType", ...}}`` -> 201 ``{"uploadUrl", "expirationDateTime",
   "nextExpectedRanges": ["0-"]}``, then the bytes in order, ``PUT uploadUrl`` with
   ``Content-Range: bytes {start}-{end}/{total}`` and no Authorization header (the URL is
   pre-authenticated) -> 200 ``{"nextExpectedRanges": ["{next}"]}``, the last one 201 with
   ``Location``; smaller, ``POST .../messages/{id}/attachments`` with a fileAttachment
   (its bytes in base64) -> 201;
3. ``POST .../messages/{id}/send`` -> 202 Accepted.

If anything fails before the send request, the draft is deleted (``DELETE .../messages/
{id}``, best effort) and the attempt fails with nothing sent: a 429, a 5xx or a timeout is
retried later. Only a send request whose answer never came has an unknown outcome.

Permissions: ``sendMail`` needs Mail.Send (Mail.Send.Shared to send as a shared mailbox with
a person's sign-in); a draft needs Mail.ReadWrite (Mail.ReadWrite.Shared for a shared
mailbox) as well, which is asked for only if the connection's ``oauth.scopes`` say so.
Microsoft lists, as a known issue, large attachments failing in a shared or delegated
mailbox with delegated permissions; app-only access does not have it.

Graph delivers to the addresses in To/Cc/Bcc (envelope recipients missing there are added
as Bcc). Errors: ``{"error": {"code", "message", "innerError": {...}}}``.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import json
import mimetypes
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import ConnectError, DataRejected, DeliveryError, UnsupportedFeature
from postroom.transports import _http, base

MAX_REQUEST = 4 * 1024 * 1024  # Graph REST request body limit
# The largest message text whose base64 fits one request.
MAX_MIME = MAX_REQUEST // 4 * 3
# Attachments from this size go through an upload session ("between 3 MB and 150 MB"); a
# smaller one in base64 inside a JSON POST stays under the request limit.
UPLOAD_FROM = 3_000_000
# Bytes per PUT: Microsoft asks for at most 4 MB per range, and upload sessions take ranges
# in multiples of 320 KiB.
CHUNK = 12 * 320 * 1024
EXCHANGE_ONLINE_MAX = 150 * 1024 * 1024  # the most an Exchange Online admin can allow
# Writing back the message without some parts: every line ends in CRLF, as it came.
_MIME = email.policy.compat32.clone(linesep="\r\n")


class Settings(_http.HttpSettings):
    transport: Literal["msgraph"] = "msgraph"
    # "me": the account that signed in; else a user id or address: a shared mailbox, another
    # user (send-as), or the mailbox an app-only (client credentials) token sends from.
    mailbox: str = "me"
    # The mailbox's message size limit: larger messages are refused without a request.
    # Exchange Online's default is 35 MB, which its admin can raise to 150 MB.
    max_message_size: int = Field(default=EXCHANGE_ONLINE_MAX, gt=0)


@dataclass(frozen=True)
class Attachment:
    """An attachment taken out of the message, to be added to the draft on its own."""

    name: str
    content_type: str
    data: bytes
    content_id: str | None  # for an inline part (an image the HTML shows)


class Transport(_http.HttpTransport):
    settings: Settings
    settings_model = Settings
    title = "Microsoft Graph"
    docs_url = "https://learn.microsoft.com/graph/api/user-sendmail"
    default_base = "https://graph.microsoft.com/v1.0"
    scope_codes = frozenset({"ErrorAccessDenied", "NoPermissionsInAccessToken",
                             "Authorization_RequestDenied", "AccessDenied"})
    send_as_codes = frozenset({"ErrorSendAsDenied"})
    rate_codes = frozenset({"ApplicationThrottled", "TooManyRequests",
                            "ErrorTooManyObjectsOpened", "MailboxConcurrency"})
    # The mailbox/user setting names no mailbox this grant can send from.
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = dict.fromkeys(
        ("ErrorInvalidUser", "MailboxNotEnabledForRESTAPI", "ResourceNotFound",
         "ErrorMailboxNotFound", 404),
        _http.ErrorRule("config.mailbox", "check the connection's mailbox setting",
                        kind=DeliveryError, permanent=False))

    @property
    def _mailbox_url(self) -> str:
        box = self.settings.mailbox
        return f"{self.base}/" + ("me" if box == "me" else f"users/{quote(box, safe='@')}")

    def _mime_request(self, url: str, raw: bytes, what: str) -> _http.Request:
        return _http.Request("POST", url, {"Content-Type": "text/plain"},
                             base64.b64encode(raw),
                             f"{what}, {len(raw)} bytes as base64 text/plain")

    def build(self, env: Envelope) -> _http.Request:
        raw = _http.match_headers(env, self.title)
        return self._mime_request(f"{self._mailbox_url}/sendMail", raw, "MIME")

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        raw = _http.match_headers(envelope, self.title)
        if len(raw) <= MAX_MIME:
            return await super().send(envelope)
        limit = self.settings.max_message_size
        if len(raw) > limit:
            raise DataRejected(
                f"the message is {len(raw)} bytes; connection {self.name} sends at most "
                f"{limit} through Microsoft Graph (max_message_size, the mailbox's limit: "
                "Exchange Online allows up to 150 MB). Make the message smaller, e.g. share "
                "big files as links", code="data.too_big", permanent=True, reply_code=552)
        rest, moved = detach(raw, MAX_MIME)
        return await self._send_by_draft(envelope, rest, moved)

    async def _send_by_draft(self, envelope: Envelope, rest: bytes,
                             moved: list[Attachment]) -> base.DeliveryResult:
        ex = _http.Exchange()
        ex.lines.append(f"*  the message is over {MAX_REQUEST} bytes in base64: sending it as "
                        f"a draft and {len(moved)} attachment(s) added one by one")
        try:
            resp = await self.request(ex, self._mime_request(
                f"{self._mailbox_url}/messages", rest,
                f"draft MIME without {len(moved)} attachment(s)"))
        except DeliveryError as err:
            err.after_data = False  # a draft, even if one was made, is never sent
            raise
        if not resp.is_success:
            raise self._draft_failure(self.failure(resp, ex))
        mid = _json(resp).get("id")
        if not isinstance(mid, str) or not mid:
            no_id = ConnectError(f"{self.title} created the draft without saying its id "
                                 f"({resp.status_code}); Postroom retries later",
                                 code="provider.unavailable")
            no_id.transcript = ex.transcript
            raise no_id
        draft = f"{self._mailbox_url}/messages/{quote(mid, safe='=')}"
        try:
            for att in moved:
                if len(att.data) >= UPLOAD_FROM:
                    await self._upload(ex, draft, att)
                else:
                    resp = await self.request(ex, _file_attachment(draft, att))
                    if not resp.is_success:
                        raise self.failure(resp, ex)
        except DeliveryError as err:
            err.after_data = False  # nothing was sent: the draft goes, a retry starts anew
            await self._delete(ex, draft)
            err.transcript = ex.transcript
            raise
        try:
            resp = await self.request(ex, _http.Request("POST", f"{draft}/send", {}, b"",
                                                        "send the draft"))
        except DeliveryError as err:
            # after_data: the send request went out and its answer never came; the message
            # may be on its way, so the draft stays and the outcome is unknown.
            if not err.after_data:
                await self._delete(ex, draft)
                err.transcript = ex.transcript
            raise
        if resp.is_success:
            return self.delivered(envelope, resp, ex)
        await self._delete(ex, draft)
        raise self.failure(resp, ex)

    async def _upload(self, ex: _http.Exchange, draft: str, att: Attachment) -> None:
        item: dict[str, object] = {"attachmentType": "file", "name": att.name,
                                   "size": len(att.data), "contentType": att.content_type}
        if att.content_id:
            item |= {"isInline": True, "contentId": att.content_id}
        resp = await self.request(ex, _http.Request(
            "POST", f"{draft}/attachments/createUploadSession",
            {"Content-Type": "application/json"},
            json.dumps({"AttachmentItem": item}).encode(),
            f"upload session for {att.name!r}, {len(att.data)} bytes"))
        if not resp.is_success:
            raise self.failure(resp, ex)
        url = _json(resp).get("uploadUrl")
        # The bytes go to the URL Graph names (outlook.office.com), never over plain HTTP
        # unless the API itself is (a test server).
        if not isinstance(url, str) or not url.startswith(("https://", self.base)):
            raise ConnectError(f"{self.title} created an upload session without a usable "
                               f"uploadUrl ({resp.status_code}); Postroom retries later",
                               code="provider.unavailable")
        total = len(att.data)
        for start in range(0, total, CHUNK):
            end = min(start + CHUNK, total) - 1
            resp = await self.request(ex, _http.Request(
                "PUT", url, {"Content-Type": "application/octet-stream",
                             "Content-Range": f"bytes {start}-{end}/{total}"},
                att.data[start:end + 1], f"bytes {start}-{end}/{total}", auth=False))
            if not resp.is_success:
                raise self._chunk_failure(resp, ex, att, start, end)

    def _chunk_failure(self, resp: httpx.Response, ex: _http.Exchange, att: Attachment,
                       start: int, end: int) -> DeliveryError:
        err = self.failure(resp, ex)
        if resp.status_code == 429 or resp.status_code >= 500:
            return err
        # The session's URL is its credential and expires; a refused range means the session
        # is gone or out of step. A new attempt starts a new draft and session.
        e = self.parse_error(resp)
        said = " ".join(x for x in (str(e.status), e.code) if x) + f": {e.message}"
        out = ConnectError(
            f"{self.title} refused bytes {start}-{end} of {att.name!r} ({said}); the draft "
            "is deleted and Postroom sends the whole message again later",
            code="provider.upload_failed", reply_code=e.status, reply_text=e.message)
        out.transcript = err.transcript
        return out

    def _draft_failure(self, err: DeliveryError) -> DeliveryError:
        """A draft refused for want of permission: say which one the draft needs."""
        if err.code != "oauth.scope_missing":
            return err
        err.message += (". Messages over 4 MB go through a draft, which needs the permission "
                        "Mail.ReadWrite (Mail.ReadWrite.Shared for a shared mailbox with a "
                        "person's sign-in): list https://graph.microsoft.com/Mail.ReadWrite "
                        "in the connection's oauth scopes, beside Mail.Send, Mail.Send.Shared "
                        "and offline_access, and sign in again; for app-only access an admin "
                        "grants the application permission Mail.ReadWrite")
        return err

    async def _delete(self, ex: _http.Exchange, draft: str) -> None:
        """Best effort: a draft left behind is not sent, only seen in the Drafts folder."""
        try:
            resp = await self.request(ex, _http.Request("DELETE", draft, {}, b"",
                                                         "delete the unsent draft"))
        except DeliveryError as err:
            ex.lines.append(f"*  the draft could not be deleted ({err.message}); it stays "
                            "in the Drafts folder, unsent")
            return
        if not resp.is_success:
            ex.lines.append("*  the draft could not be deleted; it stays in the Drafts "
                            "folder, unsent")

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


def _json(resp: httpx.Response) -> dict[str, object]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _file_attachment(draft: str, att: Attachment) -> _http.Request:
    body: dict[str, object] = {
        "@odata.type": "#microsoft.graph.fileAttachment", "name": att.name,
        "contentType": att.content_type,
        "contentBytes": base64.b64encode(att.data).decode("ascii")}
    if att.content_id:
        body |= {"isInline": True, "contentId": att.content_id}
    return _http.Request("POST", f"{draft}/attachments", {"Content-Type": "application/json"},
                         json.dumps(body).encode(),
                         f"attachment {att.name!r}, {len(att.data)} bytes as base64 in JSON")


# -- taking attachments out of the message -------------------------------------------------
def detach(raw: bytes, budget: int) -> tuple[bytes, list[Attachment]]:
    """The message with its largest attachments taken out until it is at most ``budget``
    bytes, and those attachments. Refused when even the message without any of them is
    larger (a huge text body)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    found = sorted(_attachment_parts(msg), key=lambda pp: _size(pp[1]), reverse=True)
    moved: list[Attachment] = []
    size, rest = len(raw), raw
    for parent, part in found:
        if size <= budget:
            break
        size -= _size(part)
        parent_parts = parent.get_payload()
        assert isinstance(parent_parts, list)  # the parent of a part is a multipart
        parent_parts.remove(part)
        moved.append(_attachment(part, len(moved) + 1,
                                 related=parent.get_content_type() == "multipart/related"))
        if size <= budget:  # an estimate: the message written back decides
            rest = msg.as_bytes(policy=_MIME)
            size = len(rest)
    if moved and size > budget:
        rest = msg.as_bytes(policy=_MIME)
        size = len(rest)
    if size > budget:
        raise UnsupportedFeature(
            f"the message is {len(raw)} bytes, and without its attachments still {size}: "
            f"Microsoft Graph takes the message text and small attachments in one request "
            f"of at most {MAX_REQUEST} bytes (base64) and only attachments on their own. "
            "Route such mail to an SMTP connection, or send the large content as an "
            "attachment", code="unsupported.size")
    return rest, moved


def _attachment_parts(
        msg: email.message.Message
) -> Iterator[tuple[email.message.Message, email.message.Message]]:
    """(parent, part) for every attachment or inline file, not looking inside attached
    messages (an attached message goes as one .eml file)."""
    subparts = msg.get_payload()
    if msg.get_content_type() == "message/rfc822" or not isinstance(subparts, list):
        return
    for part in subparts:
        if not isinstance(part, email.message.Message):
            continue
        if part.is_multipart() and part.get_content_type() != "message/rfc822":
            yield from _attachment_parts(part)
        elif (part.get_filename() or part.get_content_disposition() == "attachment"
              or (part.get("Content-ID") and part.get_content_maintype() != "text")
              or part.get_content_type() == "message/rfc822"):
            yield msg, part


def _size(part: email.message.Message) -> int:
    """About the bytes ``part`` takes in the message, without writing it out again (that
    would copy a big attachment once more)."""
    payload = part.get_payload()
    if isinstance(payload, str):
        return len(payload) + sum(len(k) + len(str(v)) + 4 for k, v in part.items())
    return len(part.as_bytes(policy=_MIME))


def _attachment(part: email.message.Message, n: int, *, related: bool) -> Attachment:
    ctype = part.get_content_type()
    if ctype == "message/rfc822":
        inner = part.get_payload(0)
        data = inner.as_bytes(policy=_MIME) if isinstance(inner, email.message.Message) \
            else b""
    else:
        decoded = part.get_payload(decode=True)
        data = decoded if isinstance(decoded, bytes) else b""
    name = part.get_filename() or f"attachment-{n}{mimetypes.guess_extension(ctype) or ''}"
    cid = str(part.get("Content-ID") or "").strip().strip("<>") or None
    # A part with a Content-ID that the HTML beside it (multipart/related) or its own
    # disposition says is shown in the text stays inline.
    inline = cid is not None and (related or part.get_content_disposition() != "attachment")
    return Attachment(name, ctype, data, cid if inline else None)
