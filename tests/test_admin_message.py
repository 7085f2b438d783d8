"""The message page of the web admin (issue 13, page 2, second half) and its service
functions (postroom.ops.messages).

- ops, on an Instance of its own: resend/retry/delete audited, the body refused below
  [admin] bodies, the preview framed by a recorded view adds no second audit row, a
  malformed or deeply nested message never raises, cid: images inlined only when images.
- A real `postroom serve` delivering to the real Postfix (peers), Chromium driven by
  Playwright: a message carrying script payloads in its subject, From name, text, HTML,
  attachment name and a header, sent in through the SMTP door, renders inert (no dialog,
  window.__xss never set), the preview is a sandboxed frame with the sandbox CSP, the
  attachment downloads with a safe name and nosniff; a viewer sees no body and can change
  nothing (pages and JSON); resend to another address arrives in the Postfix Maildir; retry
  and delete with their confirmation; the JSON endpoints; axe and screenshots.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_browser import ADMIN, VIEWER, AdminServer, axe, login, no_horizontal_scroll, shot
from real_servers import Sink
from serve_proc import smtp_connection

from postroom import audit as audit_log
from postroom import mimeparts, settings
from postroom.audit import Action, Actor, Role
from postroom.exceptions import MessageError, PermissionDenied
from postroom.message import Attachment, Draft, build, render
from postroom.ops import messages as ops
from postroom.runtime import Instance
from postroom.web.message import safe_filename

MAILBOX = "testuser@example.test"
OTHER = "alice@example.test"
NOWHERE = "nobody@refused.test"
REFUSED_SENDER = "refused@app.test"
FILENAME = '"><script>alert(1)</script>.html'
XSS = "window.__xss = 1; alert(1)"
HOSTILE_HTML = (
    f"<p>hello</p><script>{XSS}</script>"
    f'<img src=x onerror="{XSS}">'
    f'<a id="js" href="javascript:{XSS}">click me</a>'
    f'<svg onload="{XSS}"></svg>'
    '<img id="remote" src="http://127.0.0.1:9/remote.png" alt="remote">'
)
ADMIN_ACTOR = Actor(kind="admin", name="alice", role=Role.ADMIN)
VIEWER_ACTOR = Actor(kind="admin", name="bob", role=Role.VIEWER)


def hostile_draft(to: str = MAILBOX, subject: str | None = None) -> Draft:
    return Draft(
        from_=(f"<img src=x onerror=\"{XSS}\">", "evil@example.test"), to=[to],
        subject=subject or f"<script>{XSS}</script> hostile",
        text=f"<script>{XSS}</script> text body",
        html=HOSTILE_HTML, headers={"X-Evil": f"<script>{XSS}</script>"},
        attachments=[Attachment(filename=FILENAME, content=f"<script>{XSS}</script>".encode(),
                                content_type="text/html")])


# -- ops and the MIME reader, without a server ---------------------------------------------
@pytest.fixture
def inst(tmp_path: Path) -> Instance:
    (tmp_path / "postroom.toml").write_text(
        '[server]\ndata_dir = "data"\n' + smtp_connection(9, "up"))
    return Instance(settings.load(tmp_path / "postroom.toml", environ={}))


def queued(inst: Instance, draft: Draft) -> str:
    return inst.queue.enqueue_sync(build(draft))


def rows(inst: Instance, action: Action) -> list[dict[str, Any]]:
    return audit_log.read(inst.engine, action=action.value)


def test_ops_body_role_and_audit(inst: Instance) -> None:
    msg = queued(inst, hostile_draft())
    detail = ops.detail(inst, VIEWER_ACTOR, msg)
    assert detail["may_see_body"] is False and "raw" not in detail
    assert ("X-Evil", f"<script>{XSS}</script>") in detail["headers"]
    for fn in (ops.body_parts, ops.preview):
        with pytest.raises(PermissionDenied):
            fn(inst, VIEWER_ACTOR, msg)
    with pytest.raises(PermissionDenied):
        ops.attachment(inst, VIEWER_ACTOR, msg, 3)
    assert rows(inst, Action.MESSAGE_VIEW_BODY) == []
    body = ops.body_parts(inst, ADMIN_ACTOR, msg)
    assert body.html == HOSTILE_HTML + "\r\n" and [p.filename for p in body.parts] == [FILENAME]
    # The preview the page frames right after adds no row; an attachment does.
    assert ops.preview(inst, ADMIN_ACTOR, msg) == HOSTILE_HTML + "\r\n"
    _, data = ops.attachment(inst, ADMIN_ACTOR, msg, body.parts[0].index)
    assert data == f"<script>{XSS}</script>".encode()
    views = rows(inst, Action.MESSAGE_VIEW_BODY)
    assert [r["detail"]["what"] for r in views] == ["attachment", "body"]
    assert all(r["actor"] == "admin:alice" and r["object"] == msg for r in views)


def test_ops_actions_audited_and_refused_to_viewers(inst: Instance) -> None:
    msg = queued(inst, hostile_draft())
    for call in (lambda a: ops.resend(inst, a, msg), lambda a: ops.retry(inst, a, msg),
                 lambda a: ops.delete(inst, a, msg)):
        with pytest.raises(PermissionDenied):
            call(VIEWER_ACTOR)
    with pytest.raises(MessageError, match="malformed"):
        ops.resend(inst, ADMIN_ACTOR, msg, ["not an address"])
    with pytest.raises(MessageError, match="no address"):
        ops.resend(inst, ADMIN_ACTOR, msg, [" "])
    copy = ops.resend(inst, ADMIN_ACTOR, msg[:10], [OTHER, OTHER])
    assert inst.queue.log.get(copy)["recipients"] == [OTHER]
    assert ops.retry(inst, ADMIN_ACTOR, msg).was == "queued"
    assert ops.delete(inst, ADMIN_ACTOR, msg) is True
    assert ops.delete(inst, ADMIN_ACTOR, msg) is False
    assert inst.queue.log.get(msg) is None
    (resent,), (retried,), (deleted,) = (rows(inst, a) for a in (
        Action.MESSAGE_RESEND, Action.MESSAGE_RETRY, Action.MESSAGE_DELETE))
    assert resent["detail"] == {"copy": copy, "to": [OTHER]} and resent["object"] == msg
    assert retried["detail"]["was"] == "queued" and deleted["object"] == msg
    with pytest.raises(MessageError, match="no message"):
        ops.detail(inst, ADMIN_ACTOR, msg)


def test_mime_reader_bounded_and_never_raises() -> None:
    nested = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(
        b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(mimeparts.MAX_PARTS + 50)
    ) + b"--b--\r\n"
    body = mimeparts.read(nested)
    assert body.truncated and body.text == "x" and len(body.parts) < mimeparts.MAX_PARTS
    broken = (b"Subject: =?utf-8?b?####?=\r\nContent-Type: text/plain; charset=nonsense-8\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64\r\n")
    assert mimeparts.read(broken).text is not None
    assert mimeparts.headers(broken)[0][0] == "Subject"
    assert mimeparts.read(b"").text == ""


def test_cid_images_inlined_only_when_images() -> None:
    raw = render(Draft(from_="a@example.test", to=["b@example.test"], subject="cid",
                       html='<img src="cid:logo"><img src="cid:doc"><img src="cid:none">',
                       attachments=[
                           Attachment(filename="logo.png", content=b"PNG", content_type="image/png",
                                      content_id="logo"),
                           Attachment(filename="x.html", content=b"<script>", content_id="doc",
                                      content_type="text/html")]))
    html = mimeparts.read(raw).html or ""
    out = mimeparts.inline_images(raw, html)
    assert '<img src="data:image/png;base64,UE5H">' in out
    assert '<img src="cid:">' in out and "<script>" not in out


def test_safe_filename() -> None:
    assert safe_filename(FILENAME, 3) == ("script_alert(1)_script_.html",) * 2
    assert safe_filename("../../etc/passwd", 1)[0] == "etc_passwd"
    assert safe_filename("", 4) == ("attachment-4", "attachment-4")
    assert safe_filename("résumé.pdf", 2) == ("r_sum_.pdf", "résumé.pdf")
    assert len(safe_filename("a" * 1000, 1)[1]) <= 120


# -- a real serve, Chromium ----------------------------------------------------------------
@pytest.fixture(scope="module")
def refuser() -> Iterator[Sink]:
    sink = Sink(rcpt_reply={NOWHERE: "550 5.1.1 no such user"}).start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def admin_config(peers: Any, refuser: Sink) -> str:
    # Mail goes to the real Postfix (it delivers example.test into its Maildirs), except
    # from REFUSED_SENDER: to a server refusing NOWHERE for good.
    return (smtp_connection(peers.plain_port, "postfix") + smtp_connection(refuser.port, "refuser")
            + f'[[routes]]\nname = "refused"\nmatch = {{ sender = "{REFUSED_SENDER}" }}\n'
            'chain = ["refuser"]\n[[routes]]\nchain = ["postfix"]\n')


def smtp_send(server: AdminServer, raw: bytes, to: str,
              sender: str = "evil@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.proc.smtp_port, timeout=30) as s:
        s.sendmail(sender, [to], raw)


def log_id(server: AdminServer, subject: str, *, status: str | None = None,
           timeout: float = 30) -> str:
    """The log id of the message with this subject (waiting for ``status`` when given)."""
    deadline = time.monotonic() + timeout
    while True:
        out = server.proc.cli("log", "--json")
        found = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
        found = [m for m in found if m["subject"] == subject]
        if found and (status is None or found[0]["status"] == status):
            return str(found[0]["id"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no message {subject!r} ({status}) in the log: {found}")
        time.sleep(0.2)


def wait_status(server: AdminServer, msg_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = server.proc.cli("show", msg_id, "--json")
        if out.returncode == 0 and json.loads(out.stdout)["status"] == status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"message {msg_id} not {status}: {out.stdout[:300]!r}")
        time.sleep(0.2)


def api_token(server: AdminServer, account: str) -> dict[str, str]:
    out = server.proc.cli("admin", "token", account, "--label", "e2")
    token = re.search(r"prt_\S+", out.stdout.decode())
    assert token, out
    return {"Authorization": f"Bearer {token.group(0)}"}


def audit_rows(server: AdminServer, action: str) -> list[dict[str, Any]]:
    out = server.proc.cli("audit", "--action", action, "--json")
    assert out.returncode == 0, out
    parsed: list[dict[str, Any]] = json.loads(out.stdout)
    return parsed


def api(server: AdminServer) -> httpx.Client:
    return httpx.Client(base_url=server.base, timeout=30, follow_redirects=False)


@pytest.fixture(scope="module")
def hostile(admin_server: AdminServer) -> str:
    subject = f"<script>{XSS}</script> {uuid.uuid4().hex[:8]}"
    smtp_send(admin_server, render(hostile_draft(subject=subject)), MAILBOX)
    return log_id(admin_server, subject)


def test_hostile_message_renders_inert(page: Any, admin_server: AdminServer,
                                       hostile: str) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    login(page, *ADMIN)
    previews: list[Any] = []
    page.on("response", lambda r: previews.append(r) if "/preview" in r.url else None)
    page.goto(f"/admin/messages/{hostile}")
    page.wait_for_load_state("load")
    assert page.get_by_role("heading", level=1).inner_text().startswith("<script>")
    assert page.get_by_text(f"<script>{XSS}</script> text body").is_visible()
    frame_el = page.locator("iframe.preview")
    assert frame_el.get_attribute("sandbox") == ""
    page.wait_for_timeout(500)  # the frame's load and anything it would try to run
    assert previews and "sandbox" in previews[0].headers["content-security-policy"]
    assert "img-src data: cid:" in previews[0].headers["content-security-policy"]
    assert previews[0].headers["x-content-type-options"] == "nosniff"
    frame = page.frame_locator("iframe.preview")
    frame.locator("#js").click()  # a javascript: link in a frame without scripts
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    assert not [c for c in console if "__xss" in c]
    assert axe(page) == []
    shot(page, "message")
    page.set_viewport_size({"width": 360, "height": 740})
    assert no_horizontal_scroll(page)
    assert axe(page) == []
    page.set_viewport_size({"width": 1280, "height": 800})
    # Remote images only when asked for, still sandboxed.
    page.get_by_role("link", name="Load remote images").click()
    page.wait_for_load_state("load")
    assert page.locator("iframe.preview").get_attribute("src", timeout=5000).endswith(
        "?images=1")
    assert "img-src data: https: http:" in previews[-1].headers["content-security-policy"]
    assert "sandbox" in previews[-1].headers["content-security-policy"]
    # The attachment only downloads, under a safe name.
    link = page.locator("a[href*='/parts/']", has_text="alert(1)")
    # Scrolled to first: a click that has to scroll below the fold while the preview frame
    # is still loading can be lost (seen once in three runs).
    link.scroll_into_view_if_needed()
    with page.expect_download() as info:
        link.click()
    name = info.value.suggested_filename
    assert not set(name) & set('"<>/\\') and name.endswith(".html")
    assert dialogs == [] and page.evaluate("window.__xss") is None
    views = [r for r in audit_rows(admin_server, "message.view_body")
             if r["object"] == hostile and r["actor"] == "admin:admin"]
    assert {r["detail"]["what"] for r in views} == {"body", "attachment"}


def test_part_headers(admin_server: AdminServer, hostile: str) -> None:
    with api(admin_server) as c:
        body = c.get(f"/api/v1/admin/messages/{hostile}/body",
                     headers=api_token(admin_server, "admin")).json()
        index = body["attachments"][0]["index"]
        # Pages take the session only: the download through a signed-in browser is above;
        # here its headers, through a session made by the sign-in form.
        c.post("/admin/login", data={"name": ADMIN[0], "password": ADMIN[1]})
        r = c.get(f"/admin/messages/{hostile}/parts/{index}")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"].startswith("sandbox")
        assert r.headers["content-disposition"].startswith(
            'attachment; filename="script_alert(1)_script_.html"; filename*=UTF-8\'\'')
        assert c.get(f"/admin/messages/{hostile}/parts/999").status_code == 404


def test_viewer_sees_no_body_and_changes_nothing(page: Any, admin_server: AdminServer,
                                                 hostile: str) -> None:
    login(page, *VIEWER)
    page.goto(f"/admin/messages/{hostile}")
    assert page.get_by_text("Hidden: your role may not see message bodies").is_visible()
    assert page.locator("iframe").count() == 0
    assert page.locator("a[href*='/parts/']").count() == 0
    assert page.locator("form[action*='/admin/messages/']").count() == 0
    assert page.get_by_text("Resend").count() == 0
    assert axe(page) == []
    shot(page, "message-viewer")
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    for path in ("preview", "parts/3"):
        r = page.request.get(f"/admin/messages/{hostile}/{path}")
        assert r.status == 403, path
    for path in ("resend", "retry", "delete"):
        r = page.request.post(f"/admin/messages/{hostile}/{path}", form={"csrf": csrf},
                              max_redirects=0)
        assert r.status == 403, path
    assert page.request.get(f"/admin/messages/{hostile}/delete").status == 403
    viewer = api_token(admin_server, "viewer")
    with api(admin_server) as c:
        base = f"/api/v1/admin/messages/{hostile}"
        assert c.get(base, headers=viewer).json()["may_see_body"] is False
        assert c.get(base + "/body", headers=viewer).status_code == 403
        assert c.post(base + "/resend", headers=viewer, json={}).status_code == 403
        assert c.post(base + "/retry", headers=viewer).status_code == 403
        r = c.delete(base, headers=viewer)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin.role"
        assert c.get(base).status_code == 401
    assert admin_server.proc.cli("show", hostile).returncode == 0  # still there


def test_resend_to_another_address_through_postfix(page: Any, admin_server: AdminServer,
                                                   peers: Any) -> None:
    subject = f"resend me {uuid.uuid4().hex[:8]}"
    raw = render(Draft(from_="shop@example.test", to=[MAILBOX], subject=subject, text="hi"))
    smtp_send(admin_server, raw, MAILBOX)
    msg = log_id(admin_server, subject, status="sent")
    peers.wait_for(MAILBOX, subject, timeout=20)
    login(page, *ADMIN)
    page.goto(f"/admin/messages/{msg}")
    page.get_by_label("Resend to another address").fill(OTHER)
    page.get_by_role("button", name="Resend", exact=True).click()
    page.wait_for_load_state()
    assert page.get_by_role("status").inner_text().startswith("A copy was queued")
    stored = peers.wait_for(OTHER, subject, timeout=20)
    assert str(stored["Subject"]) == subject
    copy = page.get_by_role("status").get_by_role("link").inner_text()
    page.get_by_role("status").get_by_role("link").click()
    page.wait_for_url(re.compile(f"/admin/messages/{copy}"))
    (row,) = [r for r in audit_rows(admin_server, "message.resend") if r["object"] == msg]
    assert row["detail"]["to"] == [OTHER] and row["actor"] == "admin:admin"


def test_retry_then_delete_with_confirmation(page: Any, admin_server: AdminServer) -> None:
    subject = f"nowhere {uuid.uuid4().hex[:8]}"
    smtp_send(admin_server, render(Draft(from_=REFUSED_SENDER, to=[NOWHERE],
                                         subject=subject, text="x")), NOWHERE,
              sender=REFUSED_SENDER)
    msg = log_id(admin_server, subject, status="failed")
    login(page, *ADMIN)
    page.goto(f"/admin/messages/{msg}")
    assert page.locator("details > summary", has_text="Transcript").count() >= 1
    assert page.locator(".advice").count() >= 1
    page.get_by_role("button", name="Retry now").click()
    page.wait_for_load_state()
    assert "due now" in page.get_by_role("status").inner_text()
    log_id(admin_server, subject, status="failed")
    page.goto(f"/admin/messages/{msg}")
    page.get_by_role("link", name="Delete…").click()
    assert page.get_by_role("heading", name="Delete this message?").is_visible()
    assert axe(page) == []
    shot(page, "message-delete")
    page.get_by_role("button", name="Delete the message").click()
    page.wait_for_load_state()
    assert page.url.endswith("/admin/log?done=deleted")
    assert admin_server.proc.cli("show", msg).returncode != 0
    assert [r for r in audit_rows(admin_server, "message.retry") if r["object"] == msg]
    assert [r for r in audit_rows(admin_server, "message.delete") if r["object"] == msg]


def test_json_endpoints(admin_server: AdminServer, hostile: str) -> None:
    token = api_token(admin_server, "admin")
    base = f"/api/v1/admin/messages/{hostile}"
    with api(admin_server) as c:
        m = c.get(base, headers=token).json()
        assert m["id"] == hostile and m["may_see_body"] is True
        assert {"name": "X-Evil", "value": f"<script>{XSS}</script>"} in m["headers"]
        assert m["recipient_states"][0]["address"] == MAILBOX
        assert "html" not in m and "raw" not in m
        assert c.get("/api/v1/admin/messages/ffffffffffff", headers=token).status_code == 404
        bad = c.post(base + "/resend", headers=token, json={"to": ["no address"]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "address.malformed"
        extra = c.post(base + "/resend", headers=token, json={"cc": ["x@example.test"]})
        assert extra.status_code == 422
        sent = c.post(base + "/resend", headers=token, json={"to": [OTHER]})
        assert sent.status_code == 201 and sent.json()["copy_of"] == hostile
        copy = sent.json()["id"]
        wait_status(admin_server, copy, "sent")
        again = c.post(f"/api/v1/admin/messages/{copy}/retry", headers=token)
        assert again.status_code == 400 and again.json()["error"]["code"] == "queue.retry.sent"
        gone = c.delete(f"/api/v1/admin/messages/{copy}", headers=token)
        assert gone.json() == {"id": copy, "deleted": True}
        assert c.delete(f"/api/v1/admin/messages/{copy}", headers=token).status_code == 404
        assert [r for r in audit_rows(admin_server, "message.delete") if r["object"] == copy]
        # A session needs X-CSRF-Token on a change.
        c.post("/admin/login", data={"name": ADMIN[0], "password": ADMIN[1]})
        r = c.post(base + "/retry")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin.csrf"
        paths = c.get("/api/v1/openapi.json").json()["paths"]
        assert {"/api/v1/admin/messages/{msg_id}", "/api/v1/admin/messages/{msg_id}/body",
                "/api/v1/admin/messages/{msg_id}/resend"} <= set(paths)
