"""Web Push from the web admin: the service worker, and the account page's "Send alerts to
this browser" (postroom.alerts.webpush sends them).

- ``GET /admin/push-worker.js``: the service worker (web/static/push-worker.js), at the top
  of /admin so its scope is /admin/ (a worker's scope cannot be above its own folder). It
  shows each push as a notification that opens the admin page the alert names.
- ``POST /admin/account/push``: the browser's PushSubscription as JSON (``X-CSRF-Token``,
  same origin: web.auth), stored for the signed-in account (alerts.subscriptions checks
  it: https endpoint, sizes, keys; at most 10 per account).
- ``POST /admin/account/push/remove``: a plain form, by ``id`` (the list's button) or by
  ``endpoint`` (the page's "Stop" after the browser unsubscribed); only the account's own.

A viewer may subscribe too: an alert says what the events page already shows a viewer
(read-only data), and subscribing changes nothing but where that account's own alerts go.
Which accounts a channel reaches is the configuration's choice (``webpush://admins`` leaves
viewers out).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from postroom.alerts import subscriptions, vapid
from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import PostroomError
from postroom.secrets import SecretStore
from postroom.web import assets, auth, fence, forms
from postroom.web.dashboard import utc

router = APIRouter(prefix=fence.PAGES, include_in_schema=False)
Signed = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
WORKER = "push-worker.js"


def _store(request: Request) -> SecretStore:
    ctx = request.app.state.ctx
    return SecretStore(ctx.queue.engine, auth.of(ctx).key())


def _panel(store: SecretStore, account: str) -> dict[str, Any]:
    key = vapid.public_key(vapid.private_key(store))
    subs = [s.info() for s in subscriptions.of_account(store.engine, account)]
    return {"key": key, "subs": subs, "max": subscriptions.MAX_PER_ACCOUNT, "utc": utc}


async def panel(request: Request, actor: Actor) -> dict[str, Any]:
    """What the account page's Web Push section shows: the VAPID public key (made on this
    first need) and the account's subscribed browsers."""
    return await asyncio.to_thread(_panel, _store(request), actor.name)


@router.get("/" + WORKER)
async def worker() -> Response:
    found = assets.asset(WORKER)
    if found is None:  # pragma: no cover - shipped in the package
        return Response(status_code=404)
    # Revalidated each time: a browser checks its worker for updates itself, and an old one
    # must not outlive an upgrade.
    return Response(found.body, media_type=found.content_type,
                    headers={"Cache-Control": "no-cache"})


def _label(request: Request) -> str:
    """Which browser, for the list: the User-Agent's product tokens, shortened."""
    agent = request.headers.get("user-agent", "")
    for name in ("Edg/", "Firefox/", "Chrome/", "Safari/"):
        if name in agent:
            system = next((s for s in ("Android", "iPhone", "Windows", "Mac OS", "Linux")
                           if s in agent), "")
            return f"{name[:-1].replace('Edg', 'Edge')} {system}".strip()
    return agent[:40] or "?"


def _add(store: SecretStore, actor: Actor, body: bytes, label: str) -> subscriptions.Subscription:
    sub = subscriptions.add(store.engine, store.vault, actor.name, body, label)
    record(store.engine, actor, Action.ACCOUNT_PUSH, f"account:{actor.name}",
           {"added": sub.service, "browser": sub.label})
    return sub


@router.post("/account/push")
async def subscribe(request: Request, actor: Signed) -> Response:
    body = await request.body()
    try:
        sub = await asyncio.to_thread(_add, _store(request), actor, body, _label(request))
    except PostroomError as err:
        return JSONResponse({"error": {"code": err.code, "message": err.message}},
                            status_code=400)
    return JSONResponse({"id": sub.id, "service": sub.service}, status_code=201)


def _remove(store: SecretStore, actor: Actor, sub_id: int | None, endpoint: str) -> bool:
    done = subscriptions.remove(store.engine, actor.name, sub_id=sub_id,
                                endpoint=endpoint or None)
    if done:
        record(store.engine, actor, Action.ACCOUNT_PUSH, f"account:{actor.name}",
               {"removed": sub_id if sub_id is not None else "this browser"})
    return done


@router.post("/account/push/remove")
async def unsubscribe(request: Request, actor: Signed) -> Response:
    try:
        form = await forms.form(request)
        raw_id = form.text("id", limit=20)
        endpoint = form.text("endpoint", limit=subscriptions.MAX_ENDPOINT)
    except forms.FormError:
        raw_id, endpoint = "", ""
    sub_id = int(raw_id) if raw_id.isdigit() else None
    await asyncio.to_thread(_remove, _store(request), actor, sub_id, endpoint)
    return RedirectResponse(fence.PAGES + "/account?done=push_off", status_code=303)
