"""`postroom oauth login|status|revoke|check`: OAuth 2.0 sign-in and the state of each grant
(postroom.oauth)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance, relative, when
from postroom.commands.registry import help_of

cli = typer.Typer(help=help_of("oauth"), no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="The connection's name", show_default=False)]


@cli.command()
def login(
    name: NameArg,
    device: Annotated[bool, typer.Option(
        "--device", help="Sign in with a code on another device (no browser needed here)")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print the link that signs the connection in (or, with --device, a code to enter at the
    provider), then store the tokens encrypted once the user has agreed."""
    from rich.markup import escape

    from postroom.oauth import flows
    from postroom.oauth.web import ticket

    inst = instance(config)
    tm = inst.oauth
    _, cfg = guard(lambda: tm.config(name))
    ep = guard(lambda: tm.endpoints(name))
    con = console()
    if device:
        code = guard(lambda: flows.device_start(tm, name))
        url = code.verification_uri_complete or code.verification_uri
        con.print(f"On any device, open [bold]{escape(code.verification_uri)}[/] and enter the "
                  f"code [bold cyan]{escape(code.user_code)}[/]", soft_wrap=True)
        if code.verification_uri_complete:
            con.print(f"(or open {escape(url)})", soft_wrap=True)
        con.print(f"Waiting for you to agree (the code expires in "
                  f"{relative(code.expires_at, time.time()).removeprefix('in ')})...")
        done = guard(lambda: flows.device_wait(tm, name, code))
        _signed_in(done.connection, done.grant.account, done.grant.scopes, done.warnings)
        return
    if cfg.grant != "user":
        guard(lambda: flows.start(tm, name))  # explains that nobody signs in
    if not tm.sign_in_link(name):
        # No Postroom serves the link nor receives the provider's callback: printing it
        # would send the user to an address where nothing answers.
        con.print("server.http_listen is off and [oauth] public_url is not set, so no "
                  "Postroom serves the sign-in link or receives the provider's callback. Sign "
                  f"in with a code instead: `postroom oauth login {escape(name)} --device`; or "
                  "turn on server.http_listen (or set [oauth] public_url to a node that has "
                  "it) and run this again", soft_wrap=True)
        raise typer.Exit(1)
    link = f"{tm.start_link(name)}?ticket={ticket(tm.key, name)}"
    redirect = tm.redirect_uri(name)
    con.print(f"1. Register this redirect URI for the app at {escape(ep.provider.title)} "
              f"({escape(ep.provider.console or 'its developer console')}), exactly as written:",
              soft_wrap=True)
    con.print(f"     {escape(redirect)}", soft_wrap=True, highlight=False)
    con.print("   (a different one there makes the provider refuse with "
              "redirect_uri_mismatch; set [oauth] public_url if browsers reach Postroom by "
              "another address)", soft_wrap=True)
    con.print("2. With `postroom serve` running, open this link in a browser (it starts one "
              "sign-in, within 15 minutes) and sign in as the mailbox's account:",
              soft_wrap=True)
    con.print(f"     {escape(link)}", soft_wrap=True, highlight=False)
    con.print(f"3. Check with `postroom oauth status`. No browser here? `postroom oauth login "
              f"{escape(name)} --device`", soft_wrap=True)


def _signed_in(name: str, account: str | None, scopes: tuple[str, ...],
               warnings: list[str]) -> None:
    from rich.markup import escape

    con = console()
    con.print(f"[green]signed in[/]: connection {escape(name)} as "
              f"{escape(account or 'an account the provider did not name')} "
              f"(scopes: {escape(' '.join(scopes))}); the tokens are stored encrypted",
              soft_wrap=True)
    for w in warnings:
        con.print(f"[yellow]warning[/]: {escape(w)}", soft_wrap=True)


def oauth_rows(inst: Any) -> list[dict[str, Any]]:
    tm = inst.oauth
    grants = {g.connection: g for g in tm.store.all()}
    rows = []
    for conn in tm.connections():
        g = grants.get(conn.name)
        cfg = conn.oauth
        assert cfg is not None
        row: dict[str, Any] = {"connection": conn.name, "provider": cfg.provider,
                               "grant": cfg.grant, "signed_in": g is not None}
        if g is not None:
            row.update(account=g.account, scopes=list(g.scopes), state=g.state,
                       granted_at=g.granted_at, expires_at=g.expires_at,
                       last_refresh_at=g.last_refresh_at, refreshes=g.refreshes,
                       last_used_at=g.last_used_at, last_error=g.last_error,
                       last_error_at=g.last_error_at,
                       missing_scopes=tm.missing_scopes(conn.name, g),
                       account_mismatch=tm.account_mismatch(conn.name, g))
            if g.state == "dead":  # its access token is refused too, whatever its expiry
                row["expires_at"] = None
        else:
            row.update(state="no_grant" if cfg.grant == "user" else "not_fetched_yet",
                       sign_in=tm.sign_in_link(conn.name) or None)
        rows.append(row)
    return rows


@cli.command()
def status(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Each OAuth connection: account, scopes, access-token expiry, last refresh, state."""
    from rich.markup import escape
    from rich.table import Table

    inst = instance(config)
    rows = guard(lambda: oauth_rows(inst))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    con = console()
    if not rows:
        con.print("no connection has an oauth table; see README \"OAuth 2.0\"", markup=False)
        return
    now = time.time()
    table = Table("connection", "provider", "account", "scopes", "access token", "last refresh",
                  "state")
    for r in rows:
        state = r["state"]
        style = {"ok": "green", "dead": "red", "no_grant": "yellow"}.get(state, "white")
        text = f"[{style}]{state}[/]"
        if r.get("missing_scopes"):
            text += f" [yellow]missing {escape(' '.join(r['missing_scopes']))}[/]"
        if r.get("account_mismatch"):
            text += f"\n[yellow]{escape(r['account_mismatch'])}[/]"
        if r.get("last_error") and state != "ok":
            text += f"\n{escape(r['last_error'][:300])}"
        if state == "no_grant":
            text += f"\nsign in: postroom oauth login {escape(r['connection'])}"
        exp = r.get("expires_at")
        expiry = "-" if not r["signed_in"] else "unusable: sign in again" if state == "dead" else (
            "no expiry" if exp is None else f"expires {relative(exp, now)}" if exp > now
            else f"expired {when(exp)}")
        table.add_row(escape(r["connection"]), escape(r["provider"]),
                      escape(r.get("account") or ("not named by the provider" if r["signed_in"]
                                                   else "-")),
                      escape(" ".join(r.get("scopes", []))),
                      expiry, when(r.get("last_refresh_at")), text)
    con.print(table)


@cli.command()
def revoke(name: NameArg, config: ConfigOpt = None) -> None:
    """Withdraw the grant at the provider (where it has a revocation endpoint) and delete the
    stored tokens. Mail for the connection then waits until someone signs in again."""
    from rich.markup import escape

    from postroom.oauth import flows

    inst = instance(config)
    console().print(escape(guard(lambda: flows.revoke(inst.oauth, name))), soft_wrap=True)


@cli.command()
def check(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Run the health check of every OAuth connection now (the workers run it every
    [oauth] check_interval): refresh works, the send permission is there. Exit 1 if not."""
    import asyncio

    from rich.markup import escape

    from postroom.oauth.checks import run_checks

    inst = instance(config)
    results = asyncio.run(run_checks(inst.oauth))
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            style = "green" if r.ok else "red"
            console().print(f"[{style}]{r.state}[/] {escape(r.connection)}: {escape(r.detail)}",
                            soft_wrap=True)
    if not all(r.ok for r in results):
        raise typer.Exit(1)
