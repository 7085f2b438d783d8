"""The Settings page (``/admin/settings``): retention and the message policy (a key the file
or the environment sets is shown locked, with where it comes from), and the configuration's
export (a file download, secrets encrypted or left out) and import (the export pasted or
read into a text field: page forms are urlencoded, there is no upload parser), through
postroom.ops.settings.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.ops import settings as ops
from postroom.store.dbconfig import Kind
from postroom.web import auth, fence, forms
from postroom.web.apps import split_list
from postroom.web.dashboard import instance
from postroom.web.ops_errors import Refused, submit
from postroom.web.render import page

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
HOME = fence.PAGES + "/settings"
_DONE = ("retention", "policy")
# The form's fields per section, and how each is read (the ConfigStore validates them).
RETENTION_KEYS = ("keep_bodies_days", "keep_rows_days", "interval", "batch")
POLICY_TEXT = ("envelope_sender", "from", "from_mode")
POLICY_LISTS = ("to", "cc", "bcc")
MAX_IMPORT = 1024 * 1024  # characters of an export pasted into the import form


def show(value: Any) -> str:
    """A value as its form field shows it: lists one per line, headers "Name: value"."""
    if isinstance(value, dict):
        return "\n".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def headers_of(text: str) -> dict[str, str]:
    """ "Name: value" lines as a mapping (a line without a colon is kept as a name with an
    empty value, for the policy's check to refuse with its own words)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            name, _, value = line.partition(":")
            out[name.strip()] = value.strip()
    return out


def section_values(kind: Kind, form: forms.Form) -> dict[str, Any]:
    """The keys to store from a section's form: the fields filled in. A locked key is never
    in the page's form; one sent anyway is passed on, for the ConfigStore to refuse."""
    values: dict[str, Any] = {}
    if kind is Kind.RETENTION:
        for key in RETENTION_KEYS:
            if form.text(key, limit=32):
                values[key] = form.text(key, limit=32)
        return values
    for key in POLICY_TEXT:
        if form.text(key, limit=1000):
            values[key] = form.text(key, limit=1000)
    for key in POLICY_LISTS:
        if form.text(key, limit=20_000):
            values[key] = split_list(form.text(key, limit=20_000))
    if form.text("headers", limit=20_000):
        values["headers"] = headers_of(form.text("headers", limit=20_000))
    return values


async def _index(request: Request, actor: Actor, *, status_code: int = 200,
                 **values: Any) -> Response:
    inst = instance(request)
    views = {k.value: await asyncio.to_thread(ops.view, inst, actor, k) for k in ops.SECTIONS}
    ctx: dict[str, Any] = {"views": views, "show": show, "done": "", "error": "",
                           "error_at": "", "report": None, "api_key": inst.apps.api_key}
    return page(request, "settings/index.html", status=status_code, **{**ctx, **values})


@pages.get(HOME)
async def index(request: Request, actor: Viewer, done: str = "") -> Response:
    return await _index(request, actor, done=done if done in _DONE else "")


async def _fail(request: Request, actor: Actor, refused: Refused, where: str) -> Response:
    return await _index(request, actor, status_code=refused.status, error=refused.message,
                        error_at=where)


def _secrets(form: forms.Form) -> dict[str, Any]:
    """The export's and the import's secret choice: a passphrase, or none at all."""
    return {"passphrase": form.text("passphrase", limit=1024, strip=False) or None,
            "without_secrets": form.text("without_secrets", limit=8) == "1"}


@pages.post(HOME + "/export")
async def export(request: Request, actor: Admin) -> Response:
    """The export as a file download (never shown in the page)."""
    inst = instance(request)
    doc = await submit(request, lambda form: ops.export(inst, actor, **_secrets(form)))
    if isinstance(doc, Refused):
        return await _fail(request, actor, doc, "export")
    name = time.strftime("postroom-config-%Y%m%d-%H%M%S.json", time.gmtime())
    return Response(json.dumps(doc, indent=2) + "\n", media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{name}"',
                             "Cache-Control": "no-store"})


@pages.post(HOME + "/import")
async def import_(request: Request, actor: Admin) -> Response:
    inst = instance(request)
    report = await submit(request, lambda form: ops.import_(
        inst, actor, form.text("document", limit=MAX_IMPORT), **_secrets(form)))
    if isinstance(report, Refused):
        return await _fail(request, actor, report, "import")
    return await _index(request, actor, report=report)


# Last: /export and /import above are not sections.
@pages.post(HOME + "/{section}")
async def change(request: Request, actor: Admin, section: str) -> Response:
    if section not in _DONE:
        raise auth.PageRefusal("not_found", 404)
    kind = Kind(section)
    inst = instance(request)
    done = await submit(request, lambda form: ops.change(inst, actor, kind,
                                                         section_values(kind, form)))
    if isinstance(done, Refused):
        return await _fail(request, actor, done, section)
    return RedirectResponse(f"{HOME}?done={section}", status_code=303)
