"""The log page (``/admin/log``): filters as GET parameters (a filtered view is a bookmark),
newest first with an "older" cursor link, live rows (htmx polls ``/admin/log/rows`` for
messages newer than the first shown), selection and bulk actions behind a confirmation page,
and the export of the filter's result as CSV or EML (zip).

Every action is a plain form POST with the ``csrf`` field that ends in a 303 back to the
log; htmx only adds the live rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError, PermissionDenied
from postroom.ops import bulk
from postroom.store.log import Cursor, LogFilter
from postroom.store.schema import STATUSES
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance, iso, utc
from postroom.web.ops_errors import Refused, attempt

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]

PAGE = 50
LIVE_MAX = 100  # new rows one poll brings at most (the rest on a reload)
# The filter fields as the form names them; since/until are dates (YYYY-MM-DD) here.
FIELDS = ("status", "app", "connection", "sender", "to", "text", "tag", "since", "until")
_DATES = ("since", "until")
_SELECTED = "m:"  # a ticked row's checkbox: "m:<id>" (form fields are one value each)
_DAY = 86400.0


def cursor_text(row: Mapping[str, Any]) -> str:
    return f"{row['created_at']!r}:{row['id']}"


def parse_cursor(value: str | None, name: str = "before") -> Cursor | None:
    """``"<created_at>:<id>"`` as made by :func:`cursor_text`; a bad one is a MessageError."""
    if not value:
        return None
    at, _, msg_id = value.partition(":")
    try:
        number = float(at)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not msg_id or len(msg_id) > 64:
        raise MessageError(f"{name} = {value[:80]!r} is not a log position; follow the "
                           "page's links instead of editing them", code="log.cursor")
    return number, msg_id


def _date(value: str, name: str) -> float:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise MessageError(f"{name} = {value[:40]!r}: give a date as YYYY-MM-DD",
                           code="log.filter") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def filter_params(query: Mapping[str, str]) -> dict[str, str]:
    """The filter as the form holds it (the fields set, stripped), for links and fields."""
    return {k: str(query[k]).strip()[:320] for k in FIELDS if str(query.get(k, "")).strip()}


def log_filter(params: Mapping[str, str]) -> LogFilter:
    """The LogFilter of the form's fields: dates are whole UTC days, ``until`` included."""
    values: dict[str, Any] = dict(params)
    for name in _DATES:
        if name in values:
            start = _date(values[name], name)
            values[name] = str(start + _DAY if name == "until" else start)
    return LogFilter.from_mapping(values)


def shown(row: Mapping[str, Any]) -> dict[str, Any]:
    """A log row as the table shows it."""
    return {**row, "when": utc(row["created_at"]), "iso": iso(row["created_at"]),
            "to": ", ".join(row.get("recipients") or []), "via": row.get("via") or "",
            "cursor": cursor_text(row)}


def _query(params: Mapping[str, str], **extra: str) -> str:
    from urllib.parse import urlencode

    return urlencode({**params, **{k: v for k, v in extra.items() if v}})


def newer(inst: Any, flt: LogFilter, after: Cursor, limit: int = LIVE_MAX
          ) -> list[dict[str, Any]]:
    """Matches newer than ``after`` (the first row a page shows), newest first."""
    since = after[0] if flt.since is None else max(flt.since, after[0])
    rows = inst.queue.log.page(dataclasses.replace(flt, since=since), limit=limit + 50)
    return [r for r in rows if (r["created_at"], r["id"]) > after][:limit]


def _cap_text(n: int) -> tuple[int, bool]:
    return min(n, bulk.COUNT_CAP), n > bulk.COUNT_CAP


async def _read(request: Request, actor: Actor, params: dict[str, str], before: str | None
                ) -> dict[str, Any]:
    inst = instance(request)
    flt = log_filter(params)
    cursor = parse_cursor(before)

    def work() -> tuple[list[dict[str, Any]], int]:
        rows = bulk.page(inst, actor, flt, before=cursor, limit=PAGE)
        return rows, bulk.count(inst, actor, flt, cap=bulk.COUNT_CAP + 1)

    rows, total = await asyncio.to_thread(work)
    count, more = _cap_text(total)
    return {"rows": [shown(r) for r in rows], "count": count, "more": more,
            "older": _query(params, before=cursor_text(rows[-1])) if len(rows) == PAGE else "",
            "first": cursor_text(rows[0]) if rows and cursor is None else "",
            "live_query": _query(params, after=cursor_text(rows[0])) if rows and cursor is None
            else _query(params, after=f"{0.0!r}:0") if cursor is None else "",
            "filter_text": flt.query_string(), "paged": cursor is not None}


@pages.get(fence.PAGES + "/log")
async def log_page(request: Request, actor: Viewer) -> Response:
    from postroom.web.render import page

    query = request.query_params
    params = filter_params(query)
    notice = {k: query.get(k, "") for k in ("done", "n", "skipped")}
    base: dict[str, Any] = {"params": params, "statuses": STATUSES, "notice": notice,
                            "query": _query(params), "bodies": actor.may(
                                bulk.body_role(instance(request))), "error": ""}
    try:
        found = await _read(request, actor, params, query.get("before"))
    except MessageError as err:
        empty: dict[str, Any] = {"rows": [], "count": 0, "more": False, "older": "",
                                 "first": "", "live_query": "", "filter_text": "",
                                 "paged": False, "error": str(err)}
        return page(request, "log/list.html", status=400, **{**base, **empty})
    return page(request, "log/list.html", **base, **found)


@pages.get(fence.PAGES + "/log/rows")
async def live_rows(request: Request, actor: Viewer) -> Response:
    """The live fragment: a new poller row, then the messages newer than ``after``; 204
    (htmx leaves the page alone) when there are none."""
    from postroom.web.render import environment, language

    inst = instance(request)
    params = filter_params(request.query_params)
    try:
        flt = log_filter(params)
        after = parse_cursor(request.query_params.get("after"), "after")
    except MessageError as err:
        return Response(str(err), status_code=400, media_type="text/plain")
    if after is None:
        return Response(status_code=204)
    rows = await asyncio.to_thread(newer, inst, flt, after)
    if not rows:
        return Response(status_code=204)
    html = environment(language(request)).get_template("log/rows.html").render(
        rows=[shown(r) for r in rows], live_query=_query(params, after=cursor_text(rows[0])),
        actor=actor, fresh=True)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store"})


def _selected(form: forms.Form) -> list[str]:
    return [k[len(_SELECTED):] for k, v in form.items() if k.startswith(_SELECTED) and v]


@pages.post(fence.PAGES + "/log/bulk")
async def bulk_action(request: Request, actor: Admin) -> Response:
    """Step one (no ``confirm``): the confirmation page with the count and the filter.
    Step two (``confirm=1``): run, then back to the log with what was done."""
    from postroom.web.render import page

    inst = instance(request)
    form = await forms.form(request)
    params = filter_params(form)
    scope = form.text("scope")
    try:
        action = bulk.parse_action(form.text("action"))
        flt = log_filter(params)
        ids = _selected(form) if scope != "filter" else None
        if ids is not None and not ids:
            raise MessageError("no message selected: tick some rows, or choose \"all "
                               "matching the filter\"", code="bulk.empty")
    except (MessageError, forms.FormError) as err:
        return _refused_bulk(request, Refused.of(err), params, scope)
    if form.text("confirm") != "1":
        total = len(ids) if ids is not None else await asyncio.to_thread(
            bulk.count, inst, actor, flt, cap=bulk.COUNT_CAP + 1)
        count, more = _cap_text(total)
        return page(request, "log/confirm.html", error="", action=action.value,
                    params=params, ids=ids or [], count=count, more=more, scope=scope,
                    filter_text=flt.query_string(), query=_query(params))
    result = await attempt(bulk.run, inst, actor, action, ids=ids,
                           flt=flt if ids is None else None)
    if isinstance(result, Refused):
        return _refused_bulk(request, result, params, scope)
    back = _query(params, done=action.value, n=str(result.done),
                  skipped=str(result.skipped))
    return RedirectResponse(f"{fence.PAGES}/log?{back}", status_code=303)


def _refused_bulk(request: Request, refused: Refused, params: dict[str, str],
                  scope: str) -> Response:
    """The confirmation page saying why the bulk action cannot be done."""
    from postroom.web.render import page

    return page(request, "log/confirm.html", status=refused.status, error=refused.message,
                action="", params=params, ids=[], count=0, more=False, scope=scope,
                filter_text="", query=_query(params))


@pages.get(fence.PAGES + "/log/export")
async def export(request: Request, actor: Viewer) -> Response:
    """The filter's result as a download: ``format=csv`` or ``eml`` (a zip; bodies, so only
    the roles [admin] bodies allows)."""
    inst = instance(request)
    params = filter_params(request.query_params)
    try:
        fmt = bulk.parse_format(request.query_params.get("format", "csv"))
        flt = log_filter(params)
        await asyncio.to_thread(bulk.begin_export, inst, actor, fmt, flt)
    except MessageError as err:
        return Response(str(err), status_code=400, media_type="text/plain")
    except PermissionDenied:
        raise auth.PageRefusal("forbidden", 403, need=bulk.body_role(inst)) from None
    return download(inst, fmt, flt)


def download(inst: Any, fmt: bulk.ExportFormat, flt: LogFilter) -> StreamingResponse:
    """The streamed export (a sync iterator: Starlette reads it in a worker thread)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if fmt is bulk.ExportFormat.CSV:
        body, kind, name = bulk.csv_stream(inst, flt), "text/csv; charset=utf-8", "csv"
    else:
        body, kind, name = bulk.eml_zip_stream(inst, flt), "application/zip", "zip"
    return StreamingResponse(body, media_type=kind, headers={
        "Content-Disposition": f'attachment; filename="postroom-log-{stamp}.{name}"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
