"""The Connections pages: the list with routes, the wizard (address -> candidates and probe
results -> recommended settings and password -> login check -> save -> test send), the
connection page (test send, probe, OAuth sign-in, edit, delete) and the routes form.

Every action is a plain form POST answered by a page or a 303 back; the work is in
postroom.ops.connections (one implementation with the JSON API and the CLI). Connections
defined in postroom.toml are shown locked: no control to change them, and a POST is refused.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.exceptions import DeliveryError, PostroomError
from postroom.ops import connections as ops
from postroom.web import auth, fence, forms
from postroom.web.dashboard import instance
from postroom.web.ops_errors import Refused, attempt, outcome, submit
from postroom.web.render import page, translator

if TYPE_CHECKING:
    from postroom.runtime import Instance

pages = APIRouter(prefix=fence.PAGES, include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
BASE = fence.PAGES + "/connections"
_SMTP_KEYS = ("host", "port", "security", "username", "tls_server_name", "ca_file")
_NOTICES = ("saved", "deleted", "routes", "signin")
_OAUTH_PROVIDERS = ("google", "microsoft", "yahoo", "generic")
_OAUTH_KEYS = ("provider", "client_id", "authorize_url", "token_url", "scopes", "mech")


def _back(where: str) -> Response:
    return RedirectResponse(where, status_code=303)


# -- the list ----------------------------------------------------------------------------------
@pages.get("/connections")
async def list_page(request: Request, actor: Viewer, done: str = "") -> Response:
    return await _list(request, actor, notice=done if done in _NOTICES else "")


async def _list(request: Request, actor: Actor, *, notice: str = "", error: str = "",
                status: int = 200) -> Response:
    inst = instance(request)
    conns = await asyncio.to_thread(ops.list_connections, inst, actor)
    routes = await asyncio.to_thread(ops.routes, inst, actor)
    return page(request, "connections/list.html", status=status, connections=conns,
                routes=routes, notice=notice, error=error, may_change=actor.may(Role.ADMIN))


# -- the wizard --------------------------------------------------------------------------------
@pages.get("/connections/new")
async def new_page(request: Request, actor: Admin) -> Response:
    return page(request, "connections/new.html", error="", address="", server="", ca_file="")


@pages.post("/connections/new")
async def plan_step(request: Request, actor: Admin) -> Response:
    """Steps 2 and 3: the candidates with their probe results, and the recommended entry."""
    inst = instance(request)
    form = await forms.form(request)
    address, server = form.text("address", limit=320), form.text("server", limit=300)
    ca_file = form.text("ca_file", limit=1000)
    # plan() is bounded by its own deadline (discovery and probes together)
    plan = await attempt(ops.wizard_plan, inst, actor, address, server=server, ca_file=ca_file)
    if isinstance(plan, Refused):
        return page(request, "connections/new.html", status=plan.status, error=plan.message,
                    address=address, server=server, ca_file=ca_file)
    from postroom.diagnostics.wizard import OAUTH_MECHS, default_name, entry_for

    entry = entry_for(plan, default_name(address, plan.provider)) if plan.chosen else {}
    offered = plan.chosen.auth if plan.chosen else []
    mech = "oauthbearer" if "OAUTHBEARER" in offered and "XOAUTH2" not in offered else \
        "xoauth2"
    provider = plan.provider.oauth if plan.provider and plan.provider.oauth else "generic"
    return _plan_page(request, plan=plan.to_dict(), address=address, server=server,
                      entry=entry, ca_file=str(entry.get("ca_file", "")),
                      concerns=plan.concerns, cert_name=plan.cert_name or "",
                      oauth_offered=plan.oauth_possible or any(m in offered
                                                               for m in OAUTH_MECHS),
                      oauth={"mech": mech, "provider": provider})


def _plan_page(request: Request, *, status: int = 200, **values: Any) -> Response:
    """Step 3's page (the recommended settings), first shown or shown again with an error."""
    inst = instance(request)
    defaults: dict[str, Any] = {
        "plan": None, "entry": {}, "error": "", "advice": None, "transcript": "",
        "concerns": [], "cert_name": "", "ca_file": "", "oauth_offered": False,
        "oauth": {}, "login": "password", "providers": _OAUTH_PROVIDERS,
        "redirect_uri": ops.oauth_redirect_uri(inst)}
    return page(request, "connections/plan.html", status=status, **{**defaults, **values})


@pages.post("/connections/new/save")
async def save_step(request: Request, actor: Admin) -> Response:
    """Step 4: the concerns confirmed, then the login check; saved only when it works (or
    no login is needed). With OAuth there is no login to check before the sign-in: it is
    saved, and the connection's page offers the sign-in."""
    inst = instance(request)
    form = await forms.form(request)
    entry = _smtp_entry(form)
    concerns = [c for c in form.text("concerns", limit=4000).split("\n") if c.strip()]
    cert_name = form.text("cert_name", limit=300)
    login = "oauth" if form.text("login") == "oauth" else "password"
    values: dict[str, Any] = {
        "address": form.text("address", limit=320), "server": form.text("server"),
        "entry": entry, "ca_file": entry.get("ca_file", ""), "concerns": concerns,
        "cert_name": cert_name, "login": login, "oauth_offered": bool(form.text("offered")),
        "oauth": {k: form.text(f"oauth_{k}", limit=1000) for k in _OAUTH_KEYS}}
    if concerns and form.text("confirm") != "yes":
        gettext = translator(request)  # a named call, so that Babel extracts the message
        return _plan_page(request, status=400, error=gettext(
            "This server needs your confirmation: read the concerns, check the server with "
            "your provider, then tick the box."), **values)
    if concerns and cert_name and "tls_server_name" not in entry:
        entry["tls_server_name"] = cert_name
    secret = form.text("password", limit=1024, strip=False) or None

    async def save() -> tuple[str, DeliveryError | None]:
        """("signin" or "saved", None) when saved; ("", why) when the login failed."""
        if login == "oauth":
            entry.update(_oauth_entry(form))
            await asyncio.to_thread(ops.save_connection, inst, actor, entry, new=True,
                                    oauth_client_secret=form.text(
                                        "oauth_client_secret", limit=1024) or None)
            return "signin", None
        failed = await ops.check_login(inst, actor, entry, secret)
        if failed is not None:
            return "", failed
        await asyncio.to_thread(ops.save_connection, inst, actor, entry, secret=secret, new=True)
        return "saved", None

    saved = await outcome(save())
    if isinstance(saved, Refused):
        return _plan_page(request, status=saved.status, error=saved.message, **values)
    notice, err = saved
    if err is None:
        return _back(f"{BASE}/{entry['name']}?done={notice}")
    from postroom.diagnostics.advice import advise_error

    adv = advise_error(err, host=str(entry.get("host")), security=entry.get("security"))
    return _plan_page(request, status=400, error=err.message,
                      advice=adv.to_dict() if adv else None, transcript=err.transcript or "",
                      **values)


def _smtp_entry(form: forms.Form) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": form.text("name", limit=64), "transport": "smtp"}
    for key in _SMTP_KEYS:
        value = form.text(key, limit=1000)
        if value:
            entry[key] = value
    return entry


def _oauth_entry(form: forms.Form) -> dict[str, Any]:
    """The ``auth`` and ``oauth`` keys of the wizard's OAuth choice (the client secret is
    given apart: stored encrypted). The transport's model validates the rest."""
    provider = form.text("oauth_provider")
    if provider not in _OAUTH_PROVIDERS:
        raise forms.FormError(f"OAuth provider {provider!r}: choose one of "
                              f"{', '.join(_OAUTH_PROVIDERS)}")
    client_id = form.text("oauth_client_id", limit=1000)
    if not client_id:
        raise forms.FormError("OAuth needs your app's client id: register an app at the "
                              "provider (with the redirect URI shown) and paste its id")
    table: dict[str, Any] = {"provider": provider, "client_id": client_id}
    if provider == "generic":
        for key in ("authorize_url", "token_url"):
            table[key] = form.text(f"oauth_{key}", limit=1000) or None
        scopes = form.text("oauth_scopes", limit=1000).split()
        if scopes:
            table["scopes"] = scopes
    mech = form.text("oauth_mech")
    return {"auth": mech if mech in ("xoauth2", "oauthbearer") else "xoauth2", "oauth": table}


# -- the advanced form: any transport by its settings ------------------------------------------
@pages.get("/connections/new/advanced")
async def advanced_page(request: Request, actor: Admin, transport: str = "smtp") -> Response:
    return _advanced(request, {"transport": transport}, error="")


def _advanced(request: Request, entry: dict[str, Any], *, error: str,
              status: int = 200) -> Response:
    from postroom.transports import REGISTRY

    transport = str(entry.get("transport", "smtp"))
    if transport not in REGISTRY:
        gettext = translator(request)
        transport, error = "smtp", error or gettext("Unknown transport.")
    keys = _plain_fields(transport)
    values = {k["name"]: str(entry.get(k["name"]) or "") for k in keys}
    return page(request, "connections/advanced.html", status=status, transport=transport,
                transports=sorted(REGISTRY), keys=keys, values=values,
                name=str(entry.get("name") or ""), error=error)


@pages.post("/connections/new/advanced")
async def advanced_action(request: Request, actor: Admin) -> Response:
    """Save the advanced form: the fields left empty take their defaults."""
    form = await forms.form(request)
    transport = form.text("transport", limit=32)
    entry: dict[str, Any] = {"name": form.text("name", limit=64), "transport": transport}
    inst = instance(request)

    def save() -> None:
        for key in _plain_fields(transport):
            value = form.text(key["name"], limit=1000)
            if value:
                entry[key["name"]] = value
        secret = form.text("password", limit=1024, strip=False) or None
        ops.save_connection(inst, actor, entry, secret=secret, new=True)

    refused = await attempt(save)
    if isinstance(refused, Refused):
        return _advanced(request, entry, error=refused.message, status=refused.status)
    return _back(f"{BASE}/{entry['name']}?done=saved")


def _plain_fields(transport: str) -> list[dict[str, Any]]:
    """The keys of ``transport`` a text field can hold (tables such as oauth or dkim are
    for postroom.toml or the JSON API)."""
    return [k for k in ops.fields(transport) if k["type"] in ("str", "int", "float", "bool")
            or k["type"].startswith(("str |", "int |", "Literal", "float |", "Optional",
                                      "pathlib.Path"))]


# -- one connection ----------------------------------------------------------------------------
def _find(inst: Instance, actor: Actor, name: str) -> ops.ConnectionView:
    for conn in ops.list_connections(inst, actor):
        if conn.name == name:
            return conn
    raise auth.PageRefusal("not_found", 404)


async def _detail(request: Request, actor: Actor, name: str, *, status: int = 200,
                  **values: Any) -> Response:
    inst = instance(request)
    conn = await asyncio.to_thread(_find, inst, actor, name)
    defaults: dict[str, Any] = {"notice": "", "error": "", "test": None, "probe": None,
                                "redirect_uri": ops.oauth_redirect_uri(inst) if conn.oauth
                                else "", "signin": ""}
    if conn.oauth and actor.may(Role.ADMIN):
        # a link, not a form: the CSP's form-action 'self' stops a form's redirect to the
        # provider; the ticket in it is single-use and valid 15 minutes
        started = await attempt(ops.oauth_start, inst, actor, name)
        if isinstance(started, Refused):
            defaults["error"] = started.message
        else:
            defaults["signin"] = started["link"]
    return page(request, "connections/detail.html", status=status, conn=conn,
                may_change=actor.may(Role.ADMIN), **{**defaults, **values})


async def _refused_detail(request: Request, actor: Actor, name: str,
                          refused: Refused) -> Response:
    return await _detail(request, actor, name, status=refused.status, error=refused.message)


@pages.get("/connections/{name}")
async def detail_page(request: Request, actor: Viewer, name: str, done: str = "") -> Response:
    return await _detail(request, actor, name, notice=done if done in _NOTICES else "")


@pages.post("/connections/{name}/test")
async def test_action(request: Request, actor: Admin, name: str) -> Response:
    inst = instance(request)
    form = await forms.form(request)
    ctx = request.app.state.ctx
    result = await outcome(ops.test_send(inst, actor, name, form.text("to", limit=320),
                                         on_enqueued=ctx.on_enqueued))
    if isinstance(result, Refused):
        return await _refused_detail(request, actor, name, result)
    return await _detail(request, actor, name, test=result)


@pages.post("/connections/{name}/probe")
async def probe_action(request: Request, actor: Admin, name: str) -> Response:
    report = await outcome(ops.probe_connection(instance(request), actor, name))
    if isinstance(report, Refused):
        return await _refused_detail(request, actor, name, report)
    return await _detail(request, actor, name, probe=report)


@pages.post("/connections/{name}/delete")
async def delete_action(request: Request, actor: Admin, name: str) -> Response:
    if (await forms.form(request)).text("confirm") != "yes":
        gettext = translator(request)
        return await _detail(request, actor, name, status=400, error=gettext(
            "Tick the box to confirm the deletion."))
    gone = await attempt(ops.delete_connection, instance(request), actor, name)
    if isinstance(gone, Refused):
        return await _refused_detail(request, actor, name, gone)
    return _back(f"{BASE}?done=deleted")


@pages.get("/connections/{name}/edit")
async def edit_page(request: Request, actor: Admin, name: str) -> Response:
    inst = instance(request)
    entry = await attempt(ops.entry_of, inst, actor, name)
    if isinstance(entry, Refused):
        return await _refused_detail(request, actor, name, entry)
    return _edit(request, entry, error="")


def _edit(request: Request, entry: dict[str, Any], *, error: str,
          status: int = 200) -> Response:
    transport = str(entry.get("transport", "smtp"))
    try:
        shown = _plain_fields(transport)
    except PostroomError as err:
        shown, error = [], err.message
    values = {k["name"]: "" if entry.get(k["name"]) is None else str(entry[k["name"]])
              for k in shown}
    return page(request, "connections/edit.html", status=status, entry=entry, keys=shown,
                values=values, error=error)


@pages.post("/connections/{name}/edit")
async def edit_action(request: Request, actor: Admin, name: str) -> Response:
    """Save the edit form: empty fields are left out (their default), a blank password
    keeps the stored one; keys the form does not show (e.g. an oauth table) are kept."""
    inst = instance(request)
    form = await forms.form(request)

    def save() -> None:
        entry = ops.entry_of(inst, actor, name)
        shown = {k["name"] for k in _plain_fields(str(entry.get("transport", "smtp")))}
        kept = {k: v for k, v in entry.items() if k not in shown}
        for key in shown:
            value = form.text(key, limit=1000)
            if value:
                kept[key] = value
        secret = form.text("password", limit=1024, strip=False) or None
        ops.save_connection(inst, actor, kept, secret=secret)

    refused = await attempt(save)
    if isinstance(refused, Refused):
        return _edit(request, {**dict(form), "name": name}, error=refused.message,
                     status=refused.status)
    return _back(f"{BASE}/{name}?done=saved")


# -- routes ------------------------------------------------------------------------------------
@pages.post("/routes")
async def routes_action(request: Request, actor: Admin) -> Response:
    """One change to the stored routes: add (match + chain), delete, up or down (by index)."""
    inst = instance(request)

    def change(form: forms.Form) -> None:
        stored = ops.routes(inst, actor)["stored"]
        action, index = form.text("action"), form.text("index")
        i = int(index) if index.isdigit() else -1
        if action == "add":
            stored.append(_route(form))
        elif 0 <= i < len(stored) and action == "delete":
            stored.pop(i)
        elif 0 <= i < len(stored) and action in ("up", "down"):
            j = i - 1 if action == "up" else i + 1
            if 0 <= j < len(stored):
                stored[i], stored[j] = stored[j], stored[i]
        ops.save_routes(inst, actor, stored)

    refused = await submit(request, change)
    if isinstance(refused, Refused):
        return await _list(request, actor, error=refused.message, status=refused.status)
    return _back(f"{BASE}?done=routes#routes")


def _route(form: forms.Form) -> dict[str, Any]:
    route: dict[str, Any] = {"chain": [c.strip() for c in form.text("chain").split(",")
                                       if c.strip()]}
    if form.text("route_name", limit=64):
        route["name"] = form.text("route_name", limit=64)
    match: dict[str, Any] = {}
    for key in ("sender", "sender_domain", "app", "recipient_domain", "tag"):
        value = [v.strip() for v in form.text(key, limit=1000).split(",") if v.strip()]
        if value:
            match[key] = value
    if match:
        route["match"] = match
    return route
