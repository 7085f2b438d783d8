"""The Audit page (``/admin/audit``): who did what, when, to which object, from where; newest
first, filtered by actor, action, object and age, a page at a time (postroom.audit.read)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from postroom.audit import Action, Actor, Role
from postroom.web import auth, fence
from postroom.web.api_audit import read_page
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt
from postroom.web.render import page

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
HOME = fence.PAGES + "/audit"
# The age filter's choices: the value in the URL, its length in seconds.
SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DETAIL_SHOWN = 400  # characters of a row's detail shown in the table


def groups() -> list[str]:
    """The action filter's choices: each group ("account") then each action."""
    return sorted({a.value.partition(".")[0] for a in Action} | {a.value for a in Action})


def detail_text(detail: dict[str, Any]) -> str:
    text = json.dumps(detail, ensure_ascii=False, sort_keys=True) if detail else ""
    return text if len(text) <= DETAIL_SHOWN else text[:DETAIL_SHOWN] + "…"


@pages.get(HOME)
async def index(request: Request, actor: Viewer,
                who: Annotated[str, Query(alias="actor", max_length=160)] = "",
                action: Annotated[str, Query(max_length=48)] = "",
                obj: Annotated[str, Query(alias="object", max_length=200)] = "",
                since: Annotated[str, Query(max_length=4)] = "",
                before: int | None = None) -> Response:
    params = {"actor": who.strip(), "action": action.strip(), "object": obj.strip(),
              "since": since if since in SINCE else ""}
    start = time.time() - SINCE[params["since"]] if params["since"] else None
    found = await attempt(read_page, instance(request), actor, since=start,
                          who=params["actor"], action=params["action"], obj=params["object"],
                          before=before)
    error = found.message if isinstance(found, Refused) else ""
    rows, nxt = ([], None) if isinstance(found, Refused) else found
    kept = {k: v for k, v in params.items() if v}
    older = f"{HOME}?{urlencode({**kept, 'before': nxt})}" if nxt is not None else ""
    return page(request, "audit/index.html", rows=rows, params=params, older=older,
                first=f"{HOME}?{urlencode(kept)}" if before is not None else "",
                error=error, actions=groups(), since_choices=list(SINCE), utc=utc,
                detail_text=detail_text)
