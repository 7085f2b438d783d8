"""Microsoft Graph messages over its 4 MB request limit, at the HTTP seam
(httpx.MockTransport), with the request and response shapes of Microsoft's documentation
("Create message" in MIME format, "Attach large files to Outlook messages",
"attachment: createUploadSession", "Add attachment", "message: send", "Delete message"):

- a 10 MB message with a 6 MB attachment: a draft with the text and the small attachment,
  an upload session for the big one, its bytes PUT in order in 320 KiB multiples without
  the Authorization header, then send; the transcript lists every request, secrets hidden;
- attachments under 3 MB that do not fit the draft go one POST each (inline ones stay
  inline);
- an upload failing halfway: the draft is deleted, the attempt is retried later (or on the
  next connection), nothing is sent and the outcome is not "unknown"; only a send request
  whose answer never came is;
- a message under 4 MB still goes in one sendMail request; over the connection's
  max_message_size it is refused before any request; a draft refused for want of
  Mail.ReadWrite says so.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_oauth_http_transports import GRAPH, MS_TOKEN, Clock, Seam, graph_error, setup

from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    TimeoutError_,
)
from postroom.oauth.tokens import TokenManager
from postroom.routing.chain import Next, after_failure
from postroom.transports import base, msgraph

API = "https://graph.microsoft.com/v1.0/users/shared@contoso.com"
DRAFT_ID = "AAMkADA1MTAAAAqldOAAA="
DRAFT = f"{API}/messages/{DRAFT_ID}"
AUTHTOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6IktmYUNIUlN6bllHMmNI"
UPLOAD_URL = ("https://outlook.office.com/api/v2.0/Users('a8e8e219-4931-95c1-b73d-62626fd79c32"
              "@72aa88bf-76f0-494f-91ab-2d7cd730db47')/Messages('AAMkADA1MTAAAAqldOAAA=')/"
              f"AttachmentSessions('AAMkADI5MAAIT3k0tAAA=')?authtoken={AUTHTOKEN}")
MiB = 1024 * 1024
RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def blob(size: int, seed: int) -> bytes:
    """Bytes that never repeat a pattern, so a misplaced range shows."""
    return random.Random(seed).randbytes(size)


def mime(*attachments: tuple[str, str, bytes], cid: str = "") -> bytes:
    """A message with a text body and these (filename, type, bytes) attachments; with
    ``cid``, the first one is an inline image the HTML part shows."""
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "Shared <shared@contoso.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "quarterly figures"
    msg["Message-ID"] = "<big-1@contoso.com>"
    msg.set_content("Figures attached.\n")
    for i, (name, ctype, data) in enumerate(attachments):
        maintype, subtype = ctype.split("/")
        if cid and i == 0:
            msg.add_alternative(f'<p>Figures: <img src="cid:{cid}"></p>', subtype="html")
            html = msg.get_payload()[-1]  # type: ignore[index]
            html.add_related(data, maintype, subtype, cid=f"<{cid}>", filename=name)
        else:
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


class Graph(Seam):
    """Microsoft Graph as documented: the token endpoint (Seam's) and the mail endpoints a
    large message uses. ``fail`` answers in place of the n-th chunk PUT (1-based) or of
    the send request ("send")."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[httpx.Request] = []
        self.uploaded = bytearray()
        self.next = 0
        self.fail: dict[int | str, Callable[[httpx.Request], httpx.Response]] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == MS_TOKEN:
            return super().handler(request)
        self.calls.append(request)
        url, method = str(request.url), request.method
        if (method, url) == ("POST", f"{API}/sendMail"):
            return httpx.Response(202, headers={"request-id": "r-small"})
        if (method, url) == ("POST", f"{API}/messages"):
            return httpx.Response(201, json={
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users("
                                  "'shared%40contoso.com')/messages/$entity",
                "id": DRAFT_ID, "isDraft": True, "hasAttachments": True,
                "internetMessageId": "<big-1@contoso.com>", "subject": "quarterly figures"})
        if (method, url) == ("POST", f"{DRAFT}/attachments/createUploadSession"):
            return httpx.Response(201, json={
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph."
                                  "uploadSession",
                "uploadUrl": UPLOAD_URL, "expirationDateTime": "2026-11-21T10:09:30.7671707Z",
                "nextExpectedRanges": ["0-"]})
        if (method, url) == ("PUT", UPLOAD_URL):
            return self.put(request)
        if (method, url) == ("POST", f"{DRAFT}/attachments"):
            sent = json.loads(request.content)
            return httpx.Response(201, json={
                "@odata.type": "#microsoft.graph.fileAttachment", "id": "AAMkADA1M-zAAA=",
                "name": sent["name"], "contentType": sent["contentType"],
                "size": len(base64.b64decode(sent["contentBytes"])),
                "isInline": sent.get("isInline", False)})
        if (method, url) == ("POST", f"{DRAFT}/send"):
            if "send" in self.fail:
                return self.fail["send"](request)
            return httpx.Response(202, headers={"request-id": "r-big"})
        if (method, url) == ("DELETE", DRAFT):
            return httpx.Response(204)
        return graph_error(404, "ResourceNotFound", f"no such resource: {method} {url}")

    def put(self, request: httpx.Request) -> httpx.Response:
        n = sum(1 for r in self.calls if r.method == "PUT")
        if n in self.fail:
            return self.fail[n](request)
        m = RANGE.fullmatch(request.headers["content-range"])
        assert m is not None, request.headers["content-range"]
        start, end, total = map(int, m.groups())
        if start != self.next or end - start + 1 != len(request.content):
            return graph_error(400, "InvalidRange", "The range does not match the upload.")
        self.uploaded += request.content
        self.next = end + 1
        if self.next < total:
            return httpx.Response(200, json={
                "@odata.context": "https://outlook.office.com/api/v2.0/$metadata#Users("
                                  "'shared%40contoso.com')/Messages('AAMkADA1MTAAAAqldOAAA%3D')"
                                  "/AttachmentSessions/$entity",
                "ExpirationDateTime": "2026-11-21T10:09:30.7671707Z",
                "nextExpectedRanges": [str(self.next)]})
        return httpx.Response(201, headers={
            "Location": "https://outlook.office.com/api/v2.0/Users('a8e8e219')/Messages("
                        "'AAMkADA1MTAAAAqldOAAA=')/Attachments('AAMkADI5MAAIT3drCAAABEgAQ=')",
            "Content-Length": "0"})

    def steps(self) -> list[str]:
        """The API requests made, shortened: "POST messages", "PUT upload", ..."""
        out = []
        for r in self.calls:
            url = str(r.url)
            where = ("upload" if url == UPLOAD_URL else url.removeprefix(DRAFT + "/")
                     .removeprefix(API + "/") if url != DRAFT else "draft")
            out.append(f"{r.method} {where}")
        return out


_TOKEN_MANAGERS: list[TokenManager] = []


@pytest.fixture(autouse=True)
def _dispose() -> Iterator[None]:
    yield
    while _TOKEN_MANAGERS:
        _TOKEN_MANAGERS.pop().engine.dispose()


def run(tmp_path: Path, graph: Graph, env: Envelope, conn: str = GRAPH) -> Any:
    """Send ``env`` through a msgraph connection: its result, or the DeliveryError."""
    settings, tm = setup(tmp_path, conn, graph, Clock())
    _TOKEN_MANAGERS.append(tm)
    t = msgraph.Transport(settings.connections[0],
                          base.TransportContext(ehlo_name="test", tokens=tm),
                          http=httpx.MockTransport(graph.handler))

    async def go() -> Any:
        try:
            return await t.send(env)
        except DeliveryError as err:
            return err
        finally:
            await t.aclose()

    return asyncio.run(go())


def envelope(raw: bytes) -> Envelope:
    return Envelope("shared@contoso.com", ["bob@example.org", "carol@example.org"], raw)


def test_a_10_mb_message_goes_draft_upload_session_chunks_send(tmp_path: Path) -> None:
    report, photo = blob(6 * MiB, 1), blob(1_200_000, 2)
    raw = mime(("report.pdf", "application/pdf", report), ("photo.jpg", "image/jpeg", photo))
    assert len(raw) > 10_000_000
    graph = Graph()
    result = run(tmp_path, graph, envelope(raw))
    assert isinstance(result, base.DeliveryResult), result
    assert graph.steps() == ["POST messages", "POST attachments/createUploadSession",
                             "PUT upload", "PUT upload", "POST send"]
    # The draft: the message in base64 MIME (text/plain) with the text, the small photo and
    # carol as Bcc (envelope only), without the 6 MB report.
    draft_req = graph.calls[0]
    assert draft_req.headers["content-type"] == "text/plain"
    assert len(draft_req.content) <= msgraph.MAX_REQUEST
    draft = email.message_from_bytes(base64.b64decode(draft_req.content),
                                     policy=email.policy.default)
    assert draft["Bcc"] == "carol@example.org" and draft["Message-ID"] == "<big-1@contoso.com>"
    names = {p.get_filename(): p.get_content() for p in draft.iter_attachments()}
    assert set(names) == {"photo.jpg"} and names["photo.jpg"] == photo
    # The upload session: the documented AttachmentItem.
    assert json.loads(graph.calls[1].content) == {"AttachmentItem": {
        "attachmentType": "file", "name": "report.pdf", "size": 6 * MiB,
        "contentType": "application/pdf"}}
    # The chunks: in order, multiples of 320 KiB but the last, at most 4 MB, no Authorization.
    puts = [r for r in graph.calls if r.method == "PUT"]
    assert [r.headers["content-range"] for r in puts] == [
        "bytes 0-3932159/6291456", "bytes 3932160-6291455/6291456"]
    assert all(len(r.content) % (320 * 1024) == 0 and len(r.content) <= 4 * MiB
               for r in puts[:-1])
    assert all(int(r.headers["content-length"]) == len(r.content) for r in puts)
    assert all(r.headers["content-type"] == "application/octet-stream" for r in puts)
    assert all("authorization" not in r.headers for r in puts)
    assert bytes(graph.uploaded) == report
    api = [r for r in graph.calls if r.method != "PUT"]
    assert all(r.headers["authorization"] == "Bearer access-1" for r in api)
    assert graph.tokens == 1  # one token for the whole delivery
    # The same outcome as sendMail's: every recipient accepted, Graph's request-id.
    assert {r: v.code for r, v in result.recipients.items()} == {
        "bob@example.org": 250, "carol@example.org": 250}
    assert result.reply_code == 250 and result.reply_text == "202 accepted, request-id r-big"
    # Every request in the transcript; neither the bearer token nor the URL's token in it.
    shown = result.transcript
    assert shown.count("\nC: ") == 5 and shown.count("\nS: ") == 5
    assert "C: PUT https://outlook.office.com/api/v2.0/Users(" in shown
    assert "?****" in shown and AUTHTOKEN not in shown and "access-1" not in shown
    assert "bytes 3932160-6291455/6291456" in shown and "Bearer ****" in shown


def test_attachments_under_3_mb_that_do_not_fit_go_one_post_each(tmp_path: Path) -> None:
    chart, table = blob(2_500_000, 3), blob(2_400_000, 4)
    raw = mime(("chart.png", "image/png", chart), ("table.csv", "text/csv", table),
               cid="chart1@contoso.com")
    graph = Graph()
    result = run(tmp_path, graph, envelope(raw))
    assert isinstance(result, base.DeliveryResult), result
    assert graph.steps() == ["POST messages", "POST attachments", "POST attachments",
                             "POST send"]
    posted = [json.loads(r.content) for r in graph.calls[1:3]]
    assert all(p["@odata.type"] == "#microsoft.graph.fileAttachment" for p in posted)
    by_name = {p["name"]: p for p in posted}
    assert base64.b64decode(by_name["chart.png"]["contentBytes"]) == chart
    assert by_name["chart.png"]["isInline"] is True
    assert by_name["chart.png"]["contentId"] == "chart1@contoso.com"
    assert base64.b64decode(by_name["table.csv"]["contentBytes"]) == table
    assert "isInline" not in by_name["table.csv"]
    assert all(len(r.content) <= msgraph.MAX_REQUEST for r in graph.calls)


def fail_with(answer: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: answer


def read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out reading the answer", request=request)


@pytest.mark.parametrize(("answer", "error", "code"), [
    (fail_with(graph_error(503, "ServiceUnavailable", "Service Unavailable")), ConnectError,
     "provider.unavailable"),
    (fail_with(graph_error(429, "ApplicationThrottled", "Application is over its "
                           "MailboxConcurrency limit.", **{"Retry-After": "30"})),
     ConnectError, "provider.rate_limited"),
    (fail_with(graph_error(404, "ErrorItemNotFound", "The upload session was not found.")),
     ConnectError, "provider.upload_failed"),
    (read_timeout, TimeoutError_, "timeout"),
])
def test_an_upload_failing_halfway_deletes_the_draft_and_retries_later(
        tmp_path: Path, answer: Callable[[httpx.Request], httpx.Response], error: type,
        code: str) -> None:
    raw = mime(("archive.zip", "application/zip", blob(12 * MiB, 5)))
    graph = Graph()
    graph.fail[3] = answer
    err = run(tmp_path, graph, envelope(raw))
    assert isinstance(err, error) and err.code == code, err
    assert graph.steps() == ["POST messages", "POST attachments/createUploadSession",
                             "PUT upload", "PUT upload", "PUT upload", "DELETE draft"]
    # Temporary, nothing sent, and a known outcome: the next connection may take it now.
    assert err.permanent is False and err.after_data is False
    assert after_failure(err) is Next.FALLBACK
    assert "DELETE " + DRAFT in err.transcript and AUTHTOKEN not in err.transcript
    assert "bytes 7864320-11796479/12582912" in err.transcript
    if code == "provider.upload_failed":
        assert "refused bytes 7864320-11796479 of 'archive.zip' (404 ErrorItemNotFound: The " \
               "upload session was not found.)" in err.message
        assert "sends the whole message again later" in err.message


def test_only_a_send_request_left_unanswered_is_an_unknown_outcome(tmp_path: Path) -> None:
    raw = mime(("report.pdf", "application/pdf", blob(5 * MiB, 6)))
    graph = Graph()
    graph.fail["send"] = read_timeout
    err = run(tmp_path, graph, envelope(raw))
    assert isinstance(err, TimeoutError_) and err.after_data is True
    assert after_failure(err) is Next.UNKNOWN
    assert graph.steps()[-1] == "POST send"  # the draft stays: it may be on its way
    # A send refused outright: nothing went out, the draft is deleted.
    graph = Graph()
    graph.fail["send"] = fail_with(graph_error(500, "InternalServerError", "Internal error."))
    (tmp_path / "again").mkdir()
    err = run(tmp_path / "again", graph, envelope(raw))
    assert isinstance(err, ConnectError) and err.code == "provider.unavailable"
    assert err.after_data is False and graph.steps()[-2:] == ["POST send", "DELETE draft"]


def test_a_message_under_4_mb_still_uses_one_sendmail_request(tmp_path: Path) -> None:
    raw = mime(("report.pdf", "application/pdf", blob(2 * MiB, 7)))
    graph = Graph()
    result = run(tmp_path, graph, envelope(raw))
    assert isinstance(result, base.DeliveryResult), result
    assert graph.steps() == ["POST sendMail"]
    sent = base64.b64decode(graph.calls[0].content)
    assert sent == b"Bcc: carol@example.org\r\n" + raw
    assert result.reply_text == "202 accepted, request-id r-small"


def test_a_message_over_the_mailbox_limit_is_refused_before_any_request(
        tmp_path: Path) -> None:
    assert msgraph.Settings(name="x").max_message_size == 150 * MiB
    raw = mime(("video.mp4", "video/mp4", blob(7 * MiB, 8)))
    graph = Graph()
    err = run(tmp_path, graph, envelope(raw), GRAPH + "max_message_size = 8000000\n")
    assert isinstance(err, DataRejected) and err.code == "data.too_big" and err.permanent
    assert graph.calls == [] and after_failure(err) is Next.STOP
    bcc = len(b"Bcc: carol@example.org\r\n")  # added for the envelope-only recipient
    assert f"the message is {len(raw) + bcc} bytes" in err.message
    assert "at most 8000000" in err.message and "max_message_size" in err.message


def test_a_draft_refused_for_want_of_permission_names_it(tmp_path: Path) -> None:
    raw = mime(("report.pdf", "application/pdf", blob(4 * MiB, 9)))
    graph = Graph()
    denied = graph_error(403, "ErrorAccessDenied", "Access is denied. Check credentials and "
                         "try again.")
    original = graph.handler

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and str(request.url) == f"{API}/messages":
            graph.calls.append(request)
            return denied
        return original(request)

    graph.handler = handler  # type: ignore[method-assign]
    err = run(tmp_path, graph, envelope(raw))
    assert isinstance(err, AuthError) and err.code == "oauth.scope_missing"
    assert "Mail.ReadWrite" in err.message and "sign in again" in err.message
    assert graph.steps() == ["POST messages"]
