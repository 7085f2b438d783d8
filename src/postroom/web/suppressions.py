"""The Suppressions page (``/admin/suppressions``): the addresses no mail is sent to, newest
first, searched by part of the address, a page at a time; admins add and remove entries
(postroom.ops.suppressions). Imports of whole files are the command's and the API's."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.ops import suppressions as ops
from postroom.suppression import GLOBAL, Entry, decode_cursor, encode_cursor
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt, submit
from postroom.web.render import page

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
HOME = fence.PAGES + "/suppressions"
PAGE = 50
_DONE = ("added", "removed")


def _entries(inst: Any, actor: Actor, contains: str, after: str
             ) -> tuple[list[Entry], str | None]:
    """One page and the cursor of the next (None: this is the last)."""
    rows = ops.list_entries(inst, actor, contains=contains or None,
                            after=decode_cursor(after) if after else None, limit=PAGE + 1)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return rows, encode_cursor(rows[-1].cursor) if more and rows else None


async def _index(request: Request, actor: Actor, *, contains: str = "", after: str = "",
                 status_code: int = 200, **values: Any) -> Response:
    inst = instance(request)
    found = await attempt(_entries, inst, actor, contains, after)
    rows, nxt = ([], None) if isinstance(found, Refused) else found
    kept = {"contains": contains} if contains else {}
    ctx: dict[str, Any] = {
        "rows": rows, "utc": utc, "contains": contains, "done": "", "address": "",
        "error": found.message if isinstance(found, Refused) else "",
        "older": f"{HOME}?{urlencode({**kept, 'after': nxt})}" if nxt else "",
        "first": f"{HOME}?{urlencode(kept)}" if after else "",
        "form": {"address": "", "scope": GLOBAL, "reason": ""}, "global_scope": GLOBAL}
    return page(request, "suppressions/index.html", status=status_code, **{**ctx, **values})


@pages.get(HOME)
async def index(request: Request, actor: Viewer,
                contains: Annotated[str, Query(max_length=320)] = "",
                after: Annotated[str, Query(max_length=2000)] = "",
                done: Annotated[str, Query(max_length=16)] = "",
                address: Annotated[str, Query(max_length=320)] = "") -> Response:
    return await _index(request, actor, contains=contains.strip(), after=after,
                        done=done if done in _DONE else "", address=address)


def _back(done: str, address: str) -> Response:
    return RedirectResponse(f"{HOME}?{urlencode({'done': done, 'address': address})}",
                            status_code=303)


def _given(form: forms.Form) -> dict[str, str]:
    return {"address": form.text("address", limit=320),
            "scope": form.text("scope", limit=255) or GLOBAL,
            "reason": form.text("reason", limit=500)}


@pages.post(HOME)
async def add(request: Request, actor: Admin) -> Response:
    given = await submit(request, _given)
    if isinstance(given, Refused):
        return await _index(request, actor, status_code=given.status, error=given.message)
    made = await attempt(ops.add_entry, instance(request), actor, given["address"],
                         given["scope"], given["reason"])
    if isinstance(made, Refused):  # the form is shown again as it was filled in
        return await _index(request, actor, status_code=made.status, error=made.message,
                            form=given)
    return _back("added", made.address)


def _remove(inst: Any, actor: Actor, form: forms.Form) -> str:
    given = _given(form)
    ops.remove_entry(inst, actor, given["address"], given["scope"])
    return given["address"]


@pages.post(HOME + "/remove")
async def remove(request: Request, actor: Admin) -> Response:
    inst = instance(request)
    gone = await submit(request, lambda form: _remove(inst, actor, form))
    if isinstance(gone, Refused):
        return await _index(request, actor, status_code=gone.status, error=gone.message)
    return _back("removed", gone)
