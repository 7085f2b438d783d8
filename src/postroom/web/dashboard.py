"""The dashboard (``/admin/``): sent / failed / deferred / fallback use over 24 h, 7 d and 30 d,
an hourly chart of the last day (inline SVG drawn here, with a table for screen readers),
the queue's depth and oldest waiting message, each connection's health and OAuth state, the
latest failures with their advice. Also the helpers the other pages of this slice share.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from postroom.audit import Actor, Role
from postroom.exceptions import ConfigError
from postroom.ops import queue as queue_ops
from postroom.web import auth, fence

if TYPE_CHECKING:
    from postroom.runtime import Instance

pages = APIRouter(include_in_schema=False)
Signed = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]

# The chart's drawing box (SVG user units; it scales to the width it is given).
CHART_W = 720
CHART_H = 160
CHART_PAD = 4


def instance(request: Request) -> Instance:
    """The Instance `postroom serve` runs, for the pages and the admin API."""
    inst = request.app.state.ctx.instance
    if inst is None:
        raise ConfigError("the web admin needs the server's instance: it is served by "
                          "`postroom serve` only", code="admin.no_instance")
    return inst  # type: ignore[no-any-return]


def utc(ts: float | None) -> str:
    """A time as shown on the pages: "2026-12-07 04:49 UTC" ("" for None)."""
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Bar:
    """One hour of the chart: sent (bottom) and failed (on top), as SVG rectangles."""

    at: float
    label: str
    sent: int
    failed: int
    x: float
    width: float
    sent_y: float
    sent_h: float
    failed_y: float
    failed_h: float


def chart(series: list[tuple[float, dict[str, int]]]) -> list[Bar]:
    """The hourly series as bars scaled to the drawing box (computed here: the template
    only places them; no inline style, so the CSP holds)."""
    if not series:
        return []
    peak = max((b.get("sent", 0) + b.get("partial", 0) + b.get("failed", 0)
                for _, b in series), default=0) or 1
    slot = CHART_W / len(series)
    usable = CHART_H - 2 * CHART_PAD
    bars = []
    for i, (at, counts) in enumerate(series):
        sent = counts.get("sent", 0) + counts.get("partial", 0)
        failed = counts.get("failed", 0)
        sent_h = usable * sent / peak
        failed_h = usable * failed / peak
        base = CHART_H - CHART_PAD
        bars.append(Bar(at=at, label=dt.datetime.fromtimestamp(at, dt.UTC).strftime("%H:00"),
                        sent=sent, failed=failed, x=round(i * slot + 1, 2),
                        width=round(max(slot - 2, 1), 2),
                        sent_y=round(base - sent_h, 2), sent_h=round(sent_h, 2),
                        failed_y=round(base - sent_h - failed_h, 2),
                        failed_h=round(failed_h, 2)))
    return bars


def connection_rows(data: queue_ops.Dashboard) -> list[dict[str, Any]]:
    out = []
    for c in data.connections:
        grant = data.oauth.get(c.name)
        out.append({"name": c.name, "transport": c.transport, "server": c.server or "",
                    "health": c.health, "paused": c.paused, "failures": c.failures,
                    "last_success": utc(c.last_success_at), "last_error": c.last_error or "",
                    "last_error_at": utc(c.last_error_at),
                    # skipped until then: circuit open, or held for the provider's Retry-After
                    "circuit_until": utc(max((t for t in (c.circuit_open_until, c.held_until)
                                              if t is not None), default=None)),
                    "oauth": None if grant is None else {
                        "state": str(grant.get("state", "")),
                        "expires": utc(grant.get("expires_at")),
                        "account": str(grant.get("account") or "")}})
    return out


@pages.get(fence.PAGES + "/")
async def dashboard_page(request: Request, actor: Signed) -> Response:
    from postroom.web.labels import duration
    from postroom.web.ops_errors import Refused, attempt
    from postroom.web.render import page, translator

    data = await attempt(queue_ops.dashboard, instance(request), actor)
    if isinstance(data, Refused):
        return page(request, "dashboard/index.html", status=data.status, error=data.message,
                    data=None, bars=[], chart_w=CHART_W, chart_h=CHART_H, conns=[],
                    failures=[])
    failures = [{**row, "when": utc(row["created_at"]),
                 "to": ", ".join(row.get("recipients") or [])} for row in data.failures]
    return page(request, "dashboard/index.html", error="", data=data, bars=chart(data.series),
                chart_w=CHART_W, chart_h=CHART_H, conns=connection_rows(data),
                failures=failures,
                oldest=duration(translator(request), data.depth.get("oldest_age")),
                windows=queue_ops.WINDOWS)
