"""The Deliverability page (``/admin/deliverability``): the doctor's SPF, DKIM, DMARC and MX
verdicts for a sending domain with the records to publish, and DKIM key generation
(postroom.ops.deliverability).

A check runs in the background (it asks DNS, dozens of queries): the page answers at once
with "checking", and asks again, by htmx every two seconds (``/result``, the result's part of
the page) or, without JavaScript, by the "Check again" link.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from postroom.audit import Actor, Role
from postroom.ops import deliverability as ops
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt
from postroom.web.render import page, translator

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
HOME = fence.PAGES + "/deliverability"
STATUS_ORDER = ("fail", "warn", "info", "ok")


def grouped(report: dict[str, Any] | None) -> list[tuple[str, list[dict[str, Any]]]]:
    """The findings by subject (a domain, a connection), in the doctor's order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in (report or {}).get("findings", []):
        out.setdefault(f["subject"], []).append(f)
    return list(out.items())


async def _check(request: Request, actor: Actor, domain: str) -> tuple[ops.Check | None, str]:
    found = await attempt(ops.check, instance(request), actor, domain.strip())
    return (None, found.message) if isinstance(found, Refused) else (found, "")


async def _page(request: Request, actor: Actor, domain: str, *, status_code: int = 200,
                **values: Any) -> Response:
    inst = instance(request)
    found, error = await _check(request, actor, domain)
    keys = await asyncio.to_thread(ops.dkim_keys, inst, actor)
    ctx: dict[str, Any] = {"domain": domain.strip(), "check": found, "error": error,
                           "groups": grouped(found.report if found else None), "keys": keys,
                           "new_key": None, "dkim_error": "", "utc": utc,
                           "dkim_form": {"domain": domain.strip(), "selector": ""}}
    return page(request, "deliverability/index.html", status=status_code, **{**ctx, **values})


@pages.get(HOME)
async def index(request: Request, actor: Viewer, domain: str = "") -> Response:
    return await _page(request, actor, domain[:253])


@pages.get(HOME + "/result")
async def result(request: Request, actor: Viewer, domain: str = "") -> Response:
    """The result's part of the page alone, for htmx to swap in while a check runs."""
    found, error = await _check(request, actor, domain[:253])
    return page(request, "deliverability/result.html", domain=domain[:253].strip(),
                check=found, error=error, groups=grouped(found.report if found else None),
                utc=utc)


@pages.post(HOME + "/dkim")
async def dkim(request: Request, actor: Admin) -> Response:
    try:
        form = await forms.form(request)
        domain = form.text("domain", limit=253)
        selector = form.text("selector", limit=253)
        bits = int(form.text("bits", limit=5) or 2048)
        force = form.text("force", limit=8) == "1"
    except (forms.FormError, ValueError):
        gettext = translator(request)
        return await _page(request, actor, "", status_code=400, dkim_error=gettext(
            "The form could not be read. Reload the page and send it again."))
    info = await attempt(ops.generate_dkim, instance(request), actor, domain, selector,
                         bits=bits, force=force)
    if isinstance(info, Refused):
        return await _page(request, actor, "", status_code=info.status, dkim_error=info.message,
                           dkim_form={"domain": domain, "selector": selector})
    return await _page(request, actor, info.domain, new_key=info)
