"""The queue page (``/admin/queue``): what waits, in the order the workers take it; retry
one message or every deferred one now; pause and resume the queue and each connection.
Every action is a form POST (``csrf``) answered by a 303 back here with a notice."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.ops import bulk
from postroom.ops import queue as queue_ops
from postroom.store.log import LogFilter
from postroom.store.schema import DEFERRED, QUEUED, SENDING
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, utc
from postroom.web.labels import duration
from postroom.web.ops_errors import Refused, attempt

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
SHOWN = (QUEUED, SENDING, DEFERRED)
NOTICES = ("paused", "resumed", "retried", "conn_paused", "conn_resumed", "error")


def _back(notice: str, **extra: str) -> Response:
    from urllib.parse import urlencode

    return RedirectResponse(f"{fence.PAGES}/queue?" + urlencode({"done": notice, **extra}),
                            status_code=303)


@pages.get(fence.PAGES + "/queue")
async def queue_page(request: Request, actor: Viewer, status: str = "", done: str = "",
                     n: str = "", name: str = "") -> Response:
    from postroom.web.render import page, translator

    inst = instance(request)
    wanted = status if status in SHOWN else None
    view = await asyncio.to_thread(queue_ops.queue_view, inst, actor, status=wanted)
    rows = [{**r, "when": utc(r["created_at"]), "due": utc(r["next_attempt_at"]),
             "to": ", ".join(r.get("recipients") or [])} for r in view.rows]
    return page(request, "queue/index.html", view=view, rows=rows, wanted=wanted or "",
                statuses=SHOWN, oldest=duration(translator(request), view.oldest_age),
                notice=done if done in NOTICES else "", n=n[:12], name=name[:64])


@pages.post(fence.PAGES + "/queue/pause")
async def pause(request: Request, actor: Admin) -> Response:
    await asyncio.to_thread(queue_ops.pause, instance(request), actor)
    return _back("paused")


@pages.post(fence.PAGES + "/queue/resume")
async def resume(request: Request, actor: Admin) -> Response:
    await asyncio.to_thread(queue_ops.resume, instance(request), actor)
    return _back("resumed")


@pages.post(fence.PAGES + "/queue/connections/{name}/{switch}")
async def connection_switch(request: Request, actor: Admin, name: str,
                            switch: str) -> Response:
    """``switch``: pause or resume the connection ``name``."""
    if switch not in ("pause", "resume"):
        raise auth.PageRefusal("not_found", 404)
    fn = queue_ops.pause if switch == "pause" else queue_ops.resume
    done = await attempt(fn, instance(request), actor, name)
    if isinstance(done, Refused):
        return _back("error", name=done.message[:200])
    return _back("conn_paused" if switch == "pause" else "conn_resumed", name=name)


@pages.post(fence.PAGES + "/queue/retry")
async def retry(request: Request, actor: Admin) -> Response:
    """Retry now: the message ``id`` of the form, or (``all=deferred``) every deferred one."""
    inst = instance(request)
    form = await forms.form(request)
    msg_id = form.text("id", limit=64)
    if form.text("all") == DEFERRED:
        result = await asyncio.to_thread(bulk.run, inst, actor, bulk.BulkAction.RETRY,
                                         flt=LogFilter(status=DEFERRED))
    elif msg_id:
        result = await asyncio.to_thread(bulk.run, inst, actor, bulk.BulkAction.RETRY,
                                         ids=[msg_id])
    else:
        return _back("error", name="no message given")
    if result.errors and not result.done:
        return _back("error", name=result.errors[0][:200])
    return _back("retried", n=str(result.done))
