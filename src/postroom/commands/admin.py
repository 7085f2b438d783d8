"""`postroom admin ...`: the web admin's accounts and API tokens; `postroom audit`: the audit
log. Each change is made as the OS user running the command (``Actor.cli()``) and audited."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from postroom.commands._common import (
    ConfigOpt,
    JsonOpt,
    console,
    fail,
    guard,
    instance,
    parse_time,
    when,
)
from postroom.commands.registry import help_of
from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from postroom.admin.accounts import Accounts
    from postroom.admin.tokens import AdminTokens
    from postroom.audit import Actor
    from postroom.runtime import Instance

cli = typer.Typer(help=help_of("admin"), no_args_is_help=True)

RoleOpt = Annotated[str, typer.Option("--role", help="admin (everything) or viewer (read "
                                      "only)")]
StdinOpt = Annotated[bool, typer.Option("--password-stdin", help="Read the password from "
                                        "standard input (one line)")]
GenerateOpt = Annotated[bool, typer.Option("--generate", help="Generate a strong password and "
                                           "print it once")]


def _accounts(inst: Instance) -> Accounts:
    from postroom.ops.accounts import accounts_of

    return accounts_of(inst)


def _tokens(inst: Instance) -> AdminTokens:
    from postroom.ops.accounts import tokens_of

    return tokens_of(inst)


def _actor() -> Actor:
    from postroom.audit import Actor

    return Actor.cli()


def _password(name: str, stdin: bool, generate: bool) -> tuple[str, bool]:
    """(the password, whether it was generated): from stdin, generated, or asked twice."""
    import sys

    from postroom.admin.accounts import check_password_rules, generate_password

    if stdin and generate:
        fail(MessageError("give --password-stdin or --generate, not both", code="cli.usage"))
    if generate:
        return generate_password(), True
    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        fail(MessageError("no terminal to ask the password on: pipe it in with "
                          "--password-stdin, or use --generate", code="cli.usage"))
    else:
        password = typer.prompt(f"password for {name}", hide_input=True,
                                confirmation_prompt=True)
    guard(lambda: check_password_rules(password, name=name.strip().lower()))
    return password, False


def _print_generated(name: str, password: str) -> None:
    console().print(f"password for [bold]{name}[/] (shown only now): [bold]{password}[/]",
                    soft_wrap=True)


@cli.command("add")
def add(name: str, role: RoleOpt = "admin", password_stdin: StdinOpt = False,
        generate: GenerateOpt = False, config: ConfigOpt = None) -> None:
    """Create an admin account (password asked twice, read from stdin, or generated)."""
    from postroom.admin.accounts import check_name, check_role

    norm = guard(lambda: check_name(name))
    which = guard(lambda: check_role(role))
    password, generated = _password(norm, password_stdin, generate)
    inst = instance(config)
    account = guard(lambda: _accounts(inst).add(norm, password, which, actor=_actor()))
    console().print(f"admin account {account.name} created ({account.role.value})")
    if generated:
        _print_generated(account.name, password)


@cli.command("list")
def list_accounts(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List admin accounts."""
    from rich.markup import escape
    from rich.table import Table

    inst = instance(config)
    accounts = guard(_accounts(inst).list)
    if json_out:
        print(json.dumps([{"name": a.name, "role": a.role.value, "created_at": a.created_at,
                           "last_login_at": a.last_login_at, "totp": a.totp,
                           "locked_until": a.locked_until} for a in accounts], indent=2))
        return
    table = Table("name", "role", "created", "last login", "totp", "locked until")
    for a in accounts:
        table.add_row(escape(a.name), a.role.value, when(a.created_at), when(a.last_login_at),
                      "yes" if a.totp else "no", when(a.locked_until))
    console().print(table if accounts else "no admin accounts (add one: postroom admin add NAME)")


@cli.command("remove")
def remove(name: str, config: ConfigOpt = None) -> None:
    """Remove an account, its sessions and API tokens (never the last admin)."""
    inst = instance(config)
    if not guard(lambda: _accounts(inst).remove(name, actor=_actor())):
        fail(MessageError(f"no admin account named {name!r}; see `postroom admin list`",
                          code="admin.unknown"))
    console().print(f"admin account {name} removed")


@cli.command("passwd")
def passwd(name: str, password_stdin: StdinOpt = False, generate: GenerateOpt = False,
           config: ConfigOpt = None) -> None:
    """Set an account's password; its open sessions end and a lockout is lifted."""
    inst = instance(config)
    accounts = _accounts(inst)
    if guard(lambda: accounts.get(name)) is None:
        fail(MessageError(f"no admin account named {name!r}; see `postroom admin list`",
                          code="admin.unknown"))
    password, generated = _password(name, password_stdin, generate)
    guard(lambda: accounts.set_password(name, password, actor=_actor()))
    console().print(f"password of {name} changed; its sessions have ended")
    if generated:
        _print_generated(name, password)


@cli.command("role")
def set_role(name: str, role: str, config: ConfigOpt = None) -> None:
    """Change an account's role (admin or viewer); applies to open sessions at once."""
    from postroom.admin.accounts import check_role

    which = guard(lambda: check_role(role))
    inst = instance(config)
    guard(lambda: _accounts(inst).set_role(name, which, actor=_actor()))
    console().print(f"{name} is now {which.value}")


@cli.command("totp")
def totp(name: str, disable: Annotated[bool, typer.Option(
        "--disable", help="Turn the account's second factor off (a lost phone)")] = False,
         config: ConfigOpt = None) -> None:
    """Turn an account's TOTP second factor off. (It is turned on in the web admin, where
    the QR code can be shown.)"""
    if not disable:
        fail(MessageError("TOTP is turned on from the web admin (account menu), which shows "
                          "the QR code; here only --disable is possible", code="cli.usage"))
    inst = instance(config)
    guard(lambda: _accounts(inst).totp_disable(name, actor=_actor()))
    console().print(f"second factor of {name} turned off")


@cli.command("token")
def token(name: str, label: Annotated[str, typer.Option(
        "--label", help="What the token is for (shown in token-list)")] = "",
          config: ConfigOpt = None) -> None:
    """Create an API token for /api/v1/admin acting as NAME (printed once)."""
    inst = instance(config)
    value = guard(lambda: _tokens(inst).create(name, label, actor=_actor()))
    console().print(f"API token for {name} (shown only now):", soft_wrap=True)
    console().print(f"  Authorization: Bearer [bold]{value}[/]", soft_wrap=True)


@cli.command("token-list")
def token_list(name: Annotated[str | None, typer.Argument(help="Only this account's")] = None,
               json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List admin API tokens (never their secrets)."""
    from rich.markup import escape
    from rich.table import Table

    inst = instance(config)
    rows = guard(lambda: _tokens(inst).list(name))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "account", "label", "created", "last used")
    for r in rows:
        table.add_row(r["id"], escape(r["account"]), escape(r["label"]), when(r["created_at"]),
                      when(r["last_used_at"]))
    console().print(table if rows else "no admin API tokens")


@cli.command("token-revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")],
                 config: ConfigOpt = None) -> None:
    """Revoke an admin API token: it stops working at once."""
    inst = instance(config)
    if not guard(lambda: _tokens(inst).revoke(token_id, actor=_actor())):
        fail(MessageError(f"no admin API token with id {token_id!r}; see `postroom admin "
                          "token-list`", code="admin.token_unknown"))
    console().print(f"token {token_id} revoked")


def audit(
    since: Annotated[str | None, typer.Option("--since", help="Newer than: 30m, 2h, 7d, or a "
                                              "date")] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Who: admin:alice, alice, or a "
                                              "kind (cli, token, admin, sso, setup)")] = None,
    action: Annotated[str | None, typer.Option("--action", help="What: account.add, or a "
                                               "group (account)")] = None,
    obj: Annotated[str | None, typer.Option("--object", help="On what: account:alice")] = None,
    before: Annotated[int | None, typer.Option("--before", help="Older than this row id "
                                               "(the next page)")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("audit").
    from rich.markup import escape
    from rich.table import Table

    from postroom.audit import read

    since_ts = guard(lambda: parse_time(since, "--since")) if since else None
    inst = instance(config)
    rows = guard(lambda: read(inst.engine, since=since_ts, actor=actor, action=action, obj=obj,
                              before=before, limit=limit))
    if json_out:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table("id", "when", "who", "action", "object", "detail", "ip")
    for r in rows:
        detail = json.dumps(r["detail"], ensure_ascii=False) if r["detail"] else ""
        table.add_row(str(r["id"]), when(r["at"]), escape(r["actor"]), r["action"],
                      escape(r["object"]), escape(detail), escape(r["ip"] or ""))
    console().print(table if rows else "no audit entries match")
