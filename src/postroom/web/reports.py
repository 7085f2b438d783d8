"""The Reports page (``/admin/reports``): the summary report of the last day or week
(postroom.reports), as the email shows it, with a period selector; viewers may read it.

The deliverability part comes from the doctor run the Deliverability page shares: a page
waits at most PAGE_DNS_WAIT seconds for it and otherwise says the checks are still running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from postroom.audit import Actor, Role
from postroom.ops import require
from postroom.web import auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import Refused, attempt
from postroom.web.render import page

if TYPE_CHECKING:
    from postroom.reports.build import Report
    from postroom.runtime import Instance

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
HOME = fence.PAGES + "/reports"
PAGE_DNS_WAIT = 2.0  # seconds a page view waits for the doctor's DNS answers
PERIODS = ("day", "week")


def view(inst: Instance, actor: Actor, kind: str) -> tuple[Report, Any]:
    """The report and the configured time zone (blocking)."""
    from postroom.reports import build
    from postroom.reports.config import ReportsSettings

    require(actor, Role.VIEWER, "read the reports")
    cfg = inst.settings.section(ReportsSettings)
    doctor = build.doctor_part(inst, wait=min(PAGE_DNS_WAIT, cfg.dns_wait),
                               dns_server=cfg.dns_server)
    return build.build(inst, kind, doctor=doctor), cfg.zone


@pages.get(HOME)
async def index(request: Request, actor: Viewer,
                period: Annotated[str, Query(max_length=8)] = "week") -> Response:
    from postroom.reports.build import local_time

    kind = period if period in PERIODS else "week"
    found = await attempt(view, instance(request), actor, kind)
    if isinstance(found, Refused):
        return page(request, "reports/index.html", status=found.status, error=found.message,
                    report=None, kind=kind, periods=PERIODS, when=str)
    report, zone = found

    def when(ts: float | None) -> str:
        return "" if ts is None else local_time(ts, zone)

    return page(request, "reports/index.html", error="", report=report, kind=kind,
                periods=PERIODS, when=when)
