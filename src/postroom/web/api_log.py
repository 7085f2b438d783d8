"""``/api/v1/admin/log``: the log as JSON (same filters as the page, cursor pages), its count,
bulk actions on ids or a filter, and the export (CSV, or EML in a zip). The same service
functions as the page (postroom.ops.bulk)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError
from postroom.ingress.http_errors import HttpError
from postroom.ops import bulk
from postroom.store.log import LogFilter
from postroom.web import auth, fence
from postroom.web.api import ERRORS
from postroom.web.dashboard import instance
from postroom.web.log import cursor_text, download, parse_cursor
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]
FILTER_KEYS = ("status", "app", "connection", "sender", "to", "text", "tag", "source",
               "since", "until")


def _filter(request: Request) -> LogFilter:
    try:
        return LogFilter.from_mapping({k: request.query_params.get(k) for k in FILTER_KEYS})
    except MessageError as err:
        raise HttpError(422, err.code, err.message, "fix the query parameter") from None


class LogRow(BaseModel):
    id: str
    created_at: float = Field(description="Epoch seconds.")
    updated_at: float
    status: str
    sender: str = Field(description="The envelope sender.")
    from_header: str
    recipients: list[str]
    to_header: str
    subject: str
    source: str = Field(description="The door it came in by, e.g. smtp:shop, api:shop.")
    app: str | None
    connection: str | None = Field(description="The connection that last tried it.")
    attempts: int
    last_error: str | None
    tags: list[str]
    size: int


class LogPage(BaseModel):
    messages: list[LogRow]
    next: str | None = Field(description="Give it as `before` for the next (older) page; "
                             "null on the last page.")


class Count(BaseModel):
    count: int = Field(description="Matches, counted up to the cap.")
    capped: bool = Field(description="True: there are more than `count`.")


class LogFilterIn(BaseModel):
    """The log filter: every field optional; since/until in epoch seconds."""

    model_config = ConfigDict(extra="forbid")
    status: str | None = None
    app: str | None = None
    connection: str | None = None
    sender: str | None = None
    to: str | None = None
    text: str | None = None
    tag: str | None = None
    source: str | None = None
    since: float | None = None
    until: float | None = None


class BulkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["retry", "resend", "delete"]
    ids: list[str] | None = Field(default=None, max_length=bulk.MAX_IDS,
                                  description="These messages; or give `filter`.")
    filter: LogFilterIn | None = Field(default=None, description="Every match of this "
                                       "filter ({} = the whole log); or give `ids`.")


class BulkOut(BaseModel):
    action: str
    done: int = Field(description="Messages acted on.")
    skipped: int = Field(description="Messages that could not be (being sent, delivered "
                         "already for retry, body purged...).")
    errors: list[str] = Field(description="Why, for the first few skipped.")


def _row(r: dict[str, Any]) -> LogRow:
    return LogRow(id=r["id"], created_at=r["created_at"], updated_at=r["updated_at"],
                  status=r["status"], sender=r["sender"], from_header=r["from_header"],
                  recipients=list(r["recipients"]), to_header=r["to_header"],
                  subject=r["subject"], source=r["source"], app=r.get("app"),
                  connection=r.get("via"), attempts=r["attempt_count"],
                  last_error=r.get("last_error"), tags=list(r.get("tags") or []),
                  size=r["size"])


@router.get("/log", summary="The email log")
async def log_page(request: Request, actor: Viewer,
                   before: Annotated[str | None, Query(max_length=100)] = None,
                   limit: Annotated[int, Query(ge=1, le=500)] = 50) -> LogPage:
    """Messages newest first (no bodies), filtered by the query parameters status, app,
    connection, sender, to, text, tag, source, since, until (epoch seconds)."""
    flt = _filter(request)
    try:
        cursor = parse_cursor(before)
    except MessageError as err:
        raise HttpError(422, err.code, err.message, "give the `next` of the previous page",
                        field="before") from None
    rows = await call(bulk.page, instance(request), actor, flt, before=cursor, limit=limit)
    return LogPage(messages=[_row(r) for r in rows],
                   next=cursor_text(rows[-1]) if len(rows) == limit else None)


@router.get("/log/count", summary="Count the log's matches")
async def log_count(request: Request, actor: Viewer,
                    cap: Annotated[int, Query(ge=1, le=1_000_000)] = bulk.COUNT_CAP) -> Count:
    """How many messages the filter matches, counting at most `cap`."""
    flt = _filter(request)
    n = await call(bulk.count, instance(request), actor, flt, cap=cap + 1)
    return Count(count=min(n, cap), capped=n > cap)


@router.post("/log/bulk", summary="Retry, resend or delete many messages")
async def log_bulk(request: Request, actor: Admin, body: BulkIn) -> BulkOut:
    """On the messages `ids`, or on every match of `filter` (one of the two). Audited once."""
    if (body.ids is None) == (body.filter is None):
        raise HttpError(422, "bulk.target", "give either ids or filter",
                        "send {\"action\": ..., \"ids\": [...]} or {\"action\": ..., "
                        "\"filter\": {...}}")
    flt = None
    if body.filter is not None:
        try:
            flt = LogFilter(**body.filter.model_dump())
        except MessageError as err:
            raise HttpError(422, err.code, err.message, "fix the filter", field="filter"
                            ) from None
    result = await call(bulk.run, instance(request), actor, bulk.BulkAction(body.action),
                        ids=body.ids, flt=flt)
    return BulkOut(action=result.action.value, done=result.done, skipped=result.skipped,
                   errors=result.errors)


@router.get("/log/export", summary="Export the log's matches",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/zip": {}},
                             "description": "CSV, or a zip of .eml files."}})
async def log_export(request: Request, actor: Viewer,
                     format: Literal["csv", "eml"] = "csv") -> StreamingResponse:
    """Every match of the filter, streamed: `csv` (one line per message) or `eml` (a zip of
    the messages as handed in: bodies, so only the roles `[admin] bodies` allows)."""
    flt = _filter(request)
    inst = instance(request)
    fmt = bulk.ExportFormat(format)
    await call(bulk.begin_export, inst, actor, fmt, flt)
    return download(inst, fmt, flt)
