"""The Apps page (``/admin/apps``): every app with its limits; create, rotate, limit and
remove (postroom.ops.apps). A new secret is shown once, in the answer to the form that made
it (never in a URL, never again); the page is not cached (Cache-Control: no-store)."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.ops import apps as ops
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt, submit
from postroom.web.render import page

if TYPE_CHECKING:
    from postroom.runtime import Instance

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
HOME = fence.PAGES + "/apps"
_DONE = ("limits", "removed")
_SPLIT = re.compile(r"[\s,;]+")
MAX_RULES = 500


def split_list(text: str) -> list[str]:
    """A textarea's entries: separated by commas, semicolons, spaces or new lines."""
    return [item for item in _SPLIT.split(text) if item][:MAX_RULES]


def checked(form: forms.Form, prefix: str) -> list[str]:
    """The names of the checkboxes ``prefix:NAME`` that were ticked (a form keeps one value
    per field name, so each choice has a field of its own)."""
    return [k[len(prefix) + 1:] for k, v in form.items() if k.startswith(prefix + ":") and v]


async def _index(request: Request, actor: Actor, *, status_code: int = 200,
                 **values: Any) -> Response:
    inst = instance(request)
    rows = await asyncio.to_thread(ops.list_apps, inst, actor)
    ctx: dict[str, Any] = {"apps": rows, "utc": utc, "error": "", "done": "", "name": "",
                           "connections": sorted(c.name for c in inst.settings.connections),
                           "form": {"name": "", "senders": [], "connections": [], "rate": ""}}
    return page(request, "apps/index.html", status=status_code, **{**ctx, **values})


@pages.get(HOME)
async def index(request: Request, actor: Viewer, done: str = "", name: str = "") -> Response:
    return await _index(request, actor, done=done if done in _DONE else "", name=name[:64])


async def _fail(request: Request, actor: Actor, refused: Refused, **values: Any) -> Response:
    return await _index(request, actor, status_code=refused.status, error=refused.message,
                        **values)


def _back(done: str, name: str) -> Response:
    return RedirectResponse(f"{HOME}?{urlencode({'done': done, 'name': name})}",
                            status_code=303)


def _limits(form: forms.Form) -> dict[str, Any]:
    return {"senders": split_list(form.text("senders", limit=20_000)),
            "connections": checked(form, "conn"), "rate": form.text("rate", limit=40)}


@pages.post(HOME)
async def create(request: Request, actor: Admin) -> Response:
    inst = instance(request)
    given = await submit(request, lambda form: {"name": form.text("name", limit=64),
                                                **_limits(form)})
    if isinstance(given, Refused):
        return await _fail(request, actor, given)
    made = await attempt(ops.add_app, inst, actor, given["name"], senders=given["senders"],
                         connections=given["connections"], rate=given["rate"] or None)
    if isinstance(made, Refused):  # the form is shown again as it was filled in
        return await _fail(request, actor, made, form=given)
    return page(request, "apps/credentials.html", made=made, rotated=False)


@pages.post(HOME + "/{name}/rotate")
async def rotate(request: Request, actor: Admin, name: str) -> Response:
    made = await attempt(ops.rotate_app, instance(request), actor, name)
    if isinstance(made, Refused):
        return await _fail(request, actor, made)
    return page(request, "apps/credentials.html", made=made, rotated=True)


def _set_limits(inst: Instance, actor: Actor, name: str, form: forms.Form) -> None:
    given = _limits(form)
    ops.set_limits(inst, actor, name, senders=given["senders"],
                   connections=given["connections"], rate=given["rate"] or None,
                   clear_rate=not given["rate"])


@pages.post(HOME + "/{name}/limits")
async def limits(request: Request, actor: Admin, name: str) -> Response:
    inst = instance(request)
    done = await submit(request, lambda form: _set_limits(inst, actor, name, form))
    if isinstance(done, Refused):
        return await _fail(request, actor, done)
    return _back("limits", name)


@pages.get(HOME + "/{name}/remove")
async def confirm_remove(request: Request, actor: Admin, name: str) -> Response:
    rows = await asyncio.to_thread(ops.list_apps, instance(request), actor)
    if not any(r["name"] == name for r in rows):
        raise auth.PageRefusal("not_found", 404)
    return page(request, "apps/remove.html", name=name)


@pages.post(HOME + "/{name}/remove")
async def remove(request: Request, actor: Admin, name: str) -> Response:
    gone = await attempt(ops.remove_app, instance(request), actor, name)
    if isinstance(gone, Refused):
        return await _fail(request, actor, gone)
    if not gone:
        raise auth.PageRefusal("not_found", 404)
    return _back("removed", name)
