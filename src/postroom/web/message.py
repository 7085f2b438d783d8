"""The message page (``/admin/messages/{id}``): the log entry, its attempts and events, the
body for the roles allowed to see it, the HTML preview in a sandboxed frame, attachment
downloads, and the single-message actions (resend, retry now, delete).

The preview and the attachments are a message's own bytes, written by whoever sent it:
they are never served as part of an admin page. The preview comes from its own route with
a ``sandbox`` CSP (no script, an opaque origin, no remote images until asked for), framed
by the message page only; attachments only download (``attachment``, octet-stream,
``nosniff``, sandboxed). Every action is a plain form POST with the CSRF field that answers
303 back to the page (postroom.ops.messages does the work).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError, PermissionDenied
from postroom.ops import messages as ops
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt, submit
from postroom.web.render import page

if TYPE_CHECKING:
    from postroom.runtime import Instance

pages = APIRouter(prefix=fence.PAGES + "/messages", include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]

# The preview is its own document: no script, no plugin, no form, an opaque origin
# (sandbox without allow-*), inline styles only (mail is styled inline), images from the
# message itself (cid: parts are turned into data: URIs) until remote ones are asked for.
# frame-ancestors 'self': the message page may frame it, no other site may.
_PREVIEW_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; "
                "font-src data:; frame-ancestors 'self'; form-action 'none'; base-uri 'none'")
_PREVIEW_CSP_IMAGES = _PREVIEW_CSP.replace("img-src data: cid:", "img-src data: https: http:")
# Were the part ever rendered (a browser ignoring the disposition), it would have no script
# and no origin; allow-downloads because Chromium drops a download whose answer is
# sandboxed without it.
_PART_CSP = "sandbox allow-downloads; default-src 'none'; frame-ancestors 'none'"
_DONE = ("resent", "retried")
_ID = re.compile(r"[0-9a-f]{6,32}")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|;]+")
MAX_NAME = 120


def safe_filename(name: str, index: int) -> tuple[str, str]:
    """(ASCII fallback, UTF-8 name) for a Content-Disposition: no path, no control or
    quoting characters, no leading dot, at most MAX_NAME characters (RFC 6266)."""
    clean = _UNSAFE_NAME.sub("_", name).strip(" ._")[:MAX_NAME] or f"attachment-{index}"
    ascii_name = clean.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return ascii_name, clean


def _refused(inst: Instance) -> auth.PageRefusal:
    return auth.PageRefusal("forbidden", 403, need=ops.bodies_role(inst))


def _not_found() -> auth.PageRefusal:
    return auth.PageRefusal("not_found", 404)


async def _show(request: Request, actor: Actor, msg_id: str, *, status: int = 200,
                error: str = "", done: str = "", copy: str = "") -> Response:
    inst = instance(request)
    try:
        m = await asyncio.to_thread(ops.detail, inst, actor, msg_id)
    except MessageError as err:
        if err.code == "message.unknown":
            raise _not_found() from err
        raise
    body = None
    if m["may_see_body"] and not m["purged"]:
        body = await asyncio.to_thread(ops.body_parts, inst, actor, m["id"])
    text = body.text if body is not None else None
    cut = text is not None and len(text) > ops.MAX_TEXT
    return page(request, "message/show.html", status=status, m=m, body=body,
                text=text[:ops.MAX_TEXT] if text is not None else None, text_cut=cut,
                when=utc, error=error, done=done if done in _DONE else "",
                copy=copy if _ID.fullmatch(copy) else "",
                images=request.query_params.get("images") == "1")


@pages.get("/{msg_id}")
async def show(request: Request, actor: Viewer, msg_id: str, done: str = "",
               copy: str = "") -> Response:
    return await _show(request, actor, msg_id, done=done, copy=copy)


@pages.get("/{msg_id}/preview")
async def preview(request: Request, actor: Viewer, msg_id: str, images: str = "") -> Response:
    inst = instance(request)
    try:
        html = await asyncio.to_thread(ops.preview, inst, actor, msg_id)
    except PermissionDenied as err:
        raise _refused(inst) from err
    except MessageError as err:
        raise _not_found() from err
    if html is None:
        raise _not_found()
    return Response(html, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": _PREVIEW_CSP_IMAGES if images == "1" else _PREVIEW_CSP,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "SAMEORIGIN",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })


@pages.get("/{msg_id}/parts/{index}")
async def download(request: Request, actor: Viewer, msg_id: str, index: int) -> Response:
    inst = instance(request)
    try:
        part, data = await asyncio.to_thread(ops.attachment, inst, actor, msg_id, index)
    except PermissionDenied as err:
        raise _refused(inst) from err
    except MessageError as err:
        raise _not_found() from err
    fallback, name = safe_filename(part.filename, index)
    disposition = f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": disposition,
        "Content-Security-Policy": _PART_CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    })


def _back(msg_id: str, **query: str) -> Response:
    from urllib.parse import urlencode

    suffix = f"?{urlencode(query)}" if query else ""
    return RedirectResponse(f"{fence.PAGES}/messages/{quote(msg_id, safe='')}{suffix}",
                            status_code=303)


def _notify(request: Request, msg_id: str) -> None:
    """Wake this server's worker for a message just queued (else it waits a poll)."""
    hook = request.app.state.ctx.on_enqueued
    if hook is not None:
        hook(msg_id)


def _resend_to(form: forms.Form) -> list[str] | None:
    """The "other address" choice: its addresses, or None for the original recipients."""
    to_field = form.text("to", limit=8192)
    return [a for a in re.split(r"[\s,;]+", to_field) if a] if form.text("other") else None


async def _refused_page(request: Request, actor: Actor, msg_id: str,
                        refused: Refused) -> Response:
    return await _show(request, actor, msg_id, status=refused.status, error=refused.message)


@pages.post("/{msg_id}/resend")
async def resend(request: Request, actor: Admin, msg_id: str) -> Response:
    inst = instance(request)
    new_id = await submit(request, lambda form: ops.resend(inst, actor, msg_id,
                                                           _resend_to(form)))
    if isinstance(new_id, Refused):
        return await _refused_page(request, actor, msg_id, new_id)
    _notify(request, new_id)
    return _back(msg_id, done="resent", copy=new_id)


@pages.post("/{msg_id}/retry")
async def retry(request: Request, actor: Admin, msg_id: str) -> Response:
    done = await attempt(ops.retry, instance(request), actor, msg_id)
    if isinstance(done, Refused):
        return await _refused_page(request, actor, msg_id, done)
    _notify(request, done.id)
    return _back(done.id, done="retried")


@pages.get("/{msg_id}/delete")
async def confirm_delete(request: Request, actor: Admin, msg_id: str) -> Response:
    inst = instance(request)
    try:
        m = await asyncio.to_thread(ops.detail, inst, actor, msg_id)
    except MessageError as err:
        raise _not_found() from err
    return page(request, "message/delete.html", m=m, when=utc, error="")


@pages.post("/{msg_id}/delete")
async def delete(request: Request, actor: Admin, msg_id: str) -> Response:
    gone = await attempt(ops.delete, instance(request), actor, msg_id)
    if isinstance(gone, Refused):
        return await _refused_page(request, actor, msg_id, gone)
    if not gone:
        raise _not_found()
    return RedirectResponse(f"{fence.PAGES}/log?done=deleted", status_code=303)
