"""The web admin in the FastAPI application (ingress.http_api.create_app calls
:func:`install`): ``/`` to ``/admin/``, the pages, the static files, the JSON endpoints, and
the pages for a refusal (sign in, 403, 404).

Everything the HTTP front checked before (admin_networks, Host, body limit, security
headers: web.fence) is not checked again here.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.web import (
    account,
    accounts,
    apps,
    assets,
    audit,
    auth,
    connections,
    dashboard,
    deliverability,
    events,
    fence,
    log,
    login,
    message,
    push,
    queue,
    reports,
    settings,
    suppressions,
)

pages = APIRouter(include_in_schema=False)
# The 404 page for any other address under /admin: included after every page router.
fallback = APIRouter(include_in_schema=False)
Signed = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
_YEAR = "public, max-age=31536000, immutable"


@pages.get("/")
async def root() -> Response:
    return RedirectResponse(fence.PAGES + "/", status_code=302)


@pages.get(fence.PAGES)
async def admin_root() -> Response:
    return RedirectResponse(fence.PAGES + "/", status_code=302)


@pages.get(fence.PAGES + "/static/{name}")
async def static(request: Request, name: str, v: str = "") -> Response:
    """One of the package's static files: cached for a year when asked for by its versioned
    URL, else revalidated by ETag."""
    found = assets.asset(name)
    if found is None:
        return await _not_found(request)
    etag = f'"{found.version}"'
    cache = _YEAR if v == found.version else "no-cache"
    headers = {"ETag": etag, "Cache-Control": cache}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.content_type, headers=headers)


async def _not_found(request: Request) -> Response:
    from postroom.web.render import page

    await auth.who(request)  # the layout shows the navigation to a signed-in user
    return page(request, "error.html", status=404, kind="not_found", need="")


@fallback.api_route(fence.PAGES + "/{rest:path}", methods=["GET", "HEAD", "POST"])
async def unknown(request: Request, rest: str) -> Response:
    """Any other address under /admin: the 404 page (registered last)."""
    return await _not_found(request)


async def _refused(request: Request, exc: Exception) -> Response:
    from postroom.web.render import page, translator

    err = cast(auth.PageRefusal, exc)
    if err.login is not None:
        return RedirectResponse(err.login, status_code=303)
    need = ""
    if err.need is not None:
        gettext = translator(request)
        need = gettext("administrator") if err.need is Role.ADMIN else gettext("viewer")
    return page(request, "error.html", status=err.status, kind=err.kind, need=need)


# Every router of the web admin's pages; a new page module adds its router here.
ROUTERS: list[APIRouter] = [pages, login.router, account.router, connections.pages,
                            apps.pages, deliverability.pages, settings.pages, audit.pages,
                            accounts.pages, dashboard.pages, log.pages, queue.pages,
                            message.pages, suppressions.pages, events.pages,
                            reports.pages, push.router]


def json_routers() -> list[APIRouter]:
    """Every router of the admin's JSON API (/api/v1/admin); a new one is added here. The
    pages never call it: their modules are imported only when it is mounted."""
    from postroom.web import (
        api,
        api_accounts,
        api_apps,
        api_audit,
        api_connections,
        api_deliverability,
        api_events,
        api_log,
        api_messages,
        api_queue,
        api_settings,
        api_suppressions,
    )

    return [api.router, api_connections.router, api_apps.router, api_deliverability.router,
            api_settings.router, api_audit.router, api_accounts.router, api_log.router,
            api_queue.router, api_messages.router, api_suppressions.router,
            api_events.router]


def install(app: FastAPI, *, json: bool = True) -> None:
    """Mount the web admin: its pages, its JSON API unless ``json`` is false (the HTTP
    front mounts it on the first request for it, or for the OpenAPI document), then the
    catch-all 404 of /admin."""
    for router in ROUTERS:
        app.include_router(router)
    if json:
        from postroom.web import api

        # Declared here, once for every JSON router: each operation names the admin token
        # in OpenAPI. web.auth.api_actor is what checks the token or the session.
        for router in json_routers():
            app.include_router(router, dependencies=api.DEPENDENCIES)
    app.include_router(fallback)
    app.add_exception_handler(auth.PageRefusal, _refused)
