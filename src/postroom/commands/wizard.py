"""`postroom wizard you@example.com`: find the provider's submission server, probe and rank
the candidates, log in once to prove the password, store it encrypted, append the
connection to postroom.toml and send a test message showing the transcript
(postroom.diagnostics.wizard does the finding; this module does the talking).

Interactive on a terminal (confirmation, hidden password prompt); for scripts every answer
has a flag: ``--yes --name N --password-env VAR | --password-stdin --test-to A --no-test
--json``. Nothing is written unless the login worked (or no login is needed), and a name
already in use is refused.

What only a person may decide is never decided by ``--yes``: a server that no authenticated
source vouches for (plain-HTTP autoconfig, a guess, an SRV target outside the domain), or a
certificate issued for another name, is shown and asked about on a terminal, and refused
unattended (the message says how to go on: confirm on a terminal, or ``--server``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from postroom.commands._common import ConfigOpt, console, fail
from postroom.exceptions import ConfigError, CredentialsError, MessageError

MAX_PASSWORD_TRIES = 3


class _Out:
    """Rich text for people, or collected into one JSON document (--json)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {}
        self.con = console(stderr=as_json)

    def say(self, text: str, **kw: Any) -> None:
        if not self.as_json:
            self.con.print(text, soft_wrap=True, **kw)

    def done(self, code: int) -> NoReturn:
        if self.as_json:
            self.data["ok"] = code == 0
            print(json.dumps(self.data, indent=2, default=str))
        raise typer.Exit(code)

    def fail(self, err: ConfigError | MessageError | CredentialsError) -> NoReturn:
        if self.as_json:
            self.data["error"] = {"code": err.code, "message": err.message}
            self.done(2 if isinstance(err, ConfigError) else 1)
        fail(err)


def wizard(
    address: Annotated[str, typer.Argument(help="The mailbox to send as, e.g. you@example.com",
                                           show_default=False)],
    name: Annotated[str | None, typer.Option(
        "--name", help="Connection name (default: the provider, e.g. gmail)")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="No questions: take the best "
                                      "server (scripts)")] = False,
    password_env: Annotated[str | None, typer.Option(
        "--password-env", help="Read the password (or app password) from this environment "
        "variable; it is then stored encrypted", metavar="VAR")] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of stdin")] = False,
    oauth: Annotated[bool | None, typer.Option(
        "--oauth/--password", help="Log in with OAuth 2.0 (where the provider offers it) or "
        "with a password (default: ask, or a password with --yes)")] = None,
    client_id: Annotated[str | None, typer.Option(
        "--client-id", help="OAuth: your app's client id at the provider")] = None,
    client_secret_env: Annotated[str | None, typer.Option(
        "--client-secret-env", help="OAuth: environment variable holding the client secret",
        metavar="VAR")] = None,
    test_to: Annotated[str | None, typer.Option(
        "--test-to", help="Where the test message goes (default: the address itself)")] = None,
    no_test: Annotated[bool, typer.Option("--no-test", help="Do not send a test message")]
    = False,
    dns_server: Annotated[str | None, typer.Option(
        "--dns-server", help="DNS server for MX/SRV lookups and server names, IP[:PORT] "
        "(default: this machine's resolver)")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="Also trust this CA (a private server's or a bridge's certificate)")]
    = None,
    timeout: Annotated[float, typer.Option(min=1, max=300, help="Seconds for looking up and "
                                           "probing all candidates together")] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report on stdout (implies "
                                          "--yes)")] = False,
    server: Annotated[list[str] | None, typer.Option(
        "--server", help="Probe only this server, HOST or HOST:PORT (repeatable): you vouch "
        "for it, so it needs no other source", metavar="HOST[:PORT]")] = None,
    api: Annotated[str | None, typer.Option(
        "--api", help="Set up this HTTPS API transport (mailgun, sendgrid...) instead of "
        "SMTP; offered by itself when SMTP is blocked. The key: --password-env / "
        "--password-stdin, or asked", metavar="KIND")] = None,
    setting: Annotated[list[str] | None, typer.Option(
        "--setting", help="A setting of the API connection, KEY=VALUE (repeatable), e.g. "
        "region=eu", metavar="KEY=VALUE")] = None,
    config: ConfigOpt = None,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("wizard").
    from postroom import config_load
    from postroom.diagnostics.dns import Resolver
    from postroom.diagnostics.wizard import default_name, entry_for, plan
    from postroom.idn import check_address

    out = _Out(as_json)
    yes = yes or as_json
    interactive = not yes and sys.stdin.isatty()
    try:
        check_address(address)
    except MessageError as err:
        out.fail(MessageError(f"{address!r} is not an email address: {err.message}",
                              code="wizard.address"))
    if ca_file is not None and not ca_file.is_file():
        out.fail(ConfigError(f"--ca-file {ca_file}: no such file", code="config.ca_file"))
    if password_env and password_stdin:
        out.fail(ConfigError("give --password-env or --password-stdin, not both",
                             code="wizard.password"))
    servers = [_guard(out, lambda s=s: _server_arg(s)) for s in server or []]
    cfg_path = config_load.config_path_from(config, os.environ)

    def https_api(provider: Any, kind: str | None) -> NoReturn:
        from postroom.commands.wizard_api import offer, parse_settings

        values = _guard(out, lambda: parse_settings(setting or []))
        send = None if no_test else (
            lambda conn: _send_test(out, cfg_path, conn, test_to or address))
        _guard(out, lambda: offer(
            out, address=address, provider=provider, cfg_path=cfg_path, kind=kind,
            settings=values, name=name, interactive=interactive, key_env=password_env,
            key_stdin=password_stdin, send_test=send, ehlo_name=_hostname()))
        raise AssertionError("unreachable")

    if api is not None:
        https_api(None, api)
    resolver = _guard(out, lambda: Resolver(dns_server, timeout=min(timeout, 5.0)))
    out.say(f"Looking for the submission server of [bold]{address}[/]: built-in table, SRV, "
            f"autoconfig, MX (DNS: {resolver.describe()})..." if not servers else
            f"Probing the server(s) you named for [bold]{address}[/]...")
    p = _guard(out, lambda: plan(address, resolver, timeout=timeout, ca_file=ca_file,
                                 oauth=oauth, unattended=not interactive, servers=servers))
    out.data.update(address=address, plan=p.to_dict())
    _show_plan(out, p)
    if p.chosen is None and p.refused:
        out.data["error"] = {"code": "wizard.unauthenticated", "message": p.explanation[0]}
        out.say("[bold red]Nothing chosen:[/] every working server needs your confirmation "
                "(see above). Run `postroom wizard` on a terminal without --yes to confirm, "
                "or name the server with --server HOST[:PORT].")
        out.done(1)
    if p.chosen is None:
        out.say("[bold red]No server works from here.[/] `postroom probe HOST` shows more.")
        https_api(p.provider, None)
    confirmed_name = _confirm_concerns(out, p)
    conn_name = name or default_name(address, p.provider)
    from postroom.configedit import existing_names

    if conn_name in _guard(out, lambda: existing_names(cfg_path)):
        out.fail(ConfigError(
            f"{cfg_path} already has a connection named {conn_name!r}; choose another name "
            f"with --name, or remove that [[connections]] entry first", code="config.dupe"))
    use_oauth = _choose_oauth(out, p, oauth, interactive)
    entry = entry_for(p, conn_name, cert_name=confirmed_name)
    if use_oauth:
        entry.update(_oauth_entry(out, p, client_id, client_secret_env, interactive))
        entry["auth"] = "oauthbearer" if "OAUTHBEARER" in p.chosen.auth and \
            "XOAUTH2" not in p.chosen.auth else "xoauth2"
    if interactive and not typer.confirm(f"Save connection {conn_name!r} "
                                         f"({p.chosen.label}) to {cfg_path}?", default=True):
        out.say("nothing written")
        out.done(1)
    password: str | None = None
    if p.needs_password and not use_oauth:
        password = _password(out, p, entry, address, password_env, password_stdin, interactive)
    _save(out, cfg_path, entry, password, address, p, use_oauth)
    if use_oauth:
        out.say(f"Next: sign in once, then test.\n  postroom oauth login {conn_name}     "
                f"(with `postroom serve` running; or add --device)\n  postroom test "
                f"{conn_name} --to {test_to or address}", highlight=False)
        out.data["next"] = [f"postroom oauth login {conn_name}",
                            f"postroom test {conn_name} --to {test_to or address}"]
        out.done(0)
    if no_test:
        out.done(0)
    out.done(_send_test(out, cfg_path, conn_name, test_to or address))


def _server_arg(text: str) -> tuple[str, int | None]:
    """``--server`` HOST, HOST:PORT, [IPv6] or [IPv6]:PORT."""
    from postroom.diagnostics.wizard import parse_server

    return parse_server(text)


def _confirm_concerns(out: _Out, p: Any) -> str | None:
    """Ask about each of the chosen server's concerns (on a terminal: unattended, the plan
    never chooses a server with one). A no writes nothing. Returns the certificate's name
    when the user accepted it as tls_server_name."""
    from rich.markup import escape

    if not p.concerns:
        return None
    for concern in p.concerns:
        out.say(f"[bold yellow]check[/] {escape(p.chosen.label)}: {escape(concern)}")
        if not typer.confirm("Use it anyway?", default=False):
            out.say("nothing written; `postroom wizard ... --server HOST[:PORT]` probes the "
                    "server your provider's documentation names")
            out.done(1)
    name: str | None = p.cert_name
    return name


def _guard(out: _Out, fn: Any) -> Any:
    from postroom.exceptions import PostroomError

    try:
        return fn()
    except PostroomError as err:
        out.fail(err if isinstance(err, ConfigError | MessageError | CredentialsError)
                 else ConfigError(err.message, code=err.code))


def _show_plan(out: _Out, p: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    if out.as_json:
        return
    for line in p.discovery.log:
        out.say(f"  [dim]{escape(line)}[/]")
    if p.provider is not None:
        out.say(f"Provider: [bold]{escape(p.provider.title)}[/]")
    table = Table("server", "found by", "vouched for by", "verdict", "AUTH",
                  title_justify="left")
    for o in p.options:
        style = "green" if o is p.chosen else ("yellow" if o.usable else "red")
        by = o.candidate.vouched_by(p.discovery.domain)
        table.add_row(escape(o.label), escape("; ".join(o.candidate.sources)),
                      escape(by.kind.words) if by else "[red]nobody authenticated[/]",
                      f"[{style}]{o.result.verdict if o.result else '-'}[/]",
                      escape(" ".join(o.auth)) or "-")
    out.con.print(table)
    for i, line in enumerate(p.explanation):
        out.say(f"[bold green]{escape(line)}[/]" if i == 0 and p.chosen else escape(line))
    for note in p.notes:
        out.say(f"[yellow]note[/]: {escape(note)}")
    if p.provider is not None and p.provider.note:
        out.say(f"[bold]{escape(p.provider.title)}[/]: {escape(p.provider.note)}")


def _choose_oauth(out: _Out, p: Any, oauth: bool | None, interactive: bool) -> bool:
    chosen_auth = p.chosen.auth
    offers = any(m in chosen_auth for m in ("XOAUTH2", "OAUTHBEARER"))
    if oauth is False or not p.oauth_possible:
        if oauth:
            out.say("[yellow]OAuth[/] is not known for this provider: using a password.")
        return False
    if oauth:
        return True
    if not interactive or not offers:
        return False
    prov = p.provider.title if p.provider else "this provider"
    return bool(typer.confirm(f"{prov} offers OAuth 2.0 (no password stored; you need an app "
                              "registered at the provider). Use OAuth?", default=False))


def _oauth_entry(out: _Out, p: Any, client_id: str | None, secret_env: str | None,
                 interactive: bool) -> dict[str, Any]:
    from postroom.oauth.providers import PROVIDERS

    prov_name = p.provider.oauth if p.provider and p.provider.oauth else "generic"
    console_url = PROVIDERS[prov_name].console if prov_name in PROVIDERS else ""
    if not client_id and interactive:
        out.say(f"OAuth needs your app's client id (register one at "
                f"{console_url or 'the provider'}).")
        from rich.prompt import Prompt

        client_id = Prompt.ask("client id", console=console(stderr=True)).strip() or None
    if not client_id:
        out.fail(ConfigError(
            f"OAuth needs your app's client id: give --client-id (and --client-secret-env VAR "
            f"for a confidential client); register the app at "
            f"{console_url or 'the provider'}; or use --password", code="wizard.oauth"))
    table: dict[str, Any] = {"provider": prov_name, "client_id": client_id}
    if secret_env:
        table["client_secret_env"] = secret_env
    if prov_name == "generic" and p.discovery.oauth:
        doc = p.discovery.oauth
        if doc.get("authURL"):
            table["authorize_url"] = doc["authURL"]
        if doc.get("tokenURL"):
            table["token_url"] = doc["tokenURL"]
        if doc.get("scope"):
            table["scopes"] = doc["scope"].split()
    return {"oauth": table}


def _password(out: _Out, p: Any, entry: dict[str, Any], address: str, env: str | None,
              stdin: bool, interactive: bool) -> str:
    """The password, proven by a real login before anything is stored."""
    words = p.provider.password_words if p.provider else "password"
    for attempt in range(MAX_PASSWORD_TRIES):
        from postroom.commands.wizard_api import read_secret

        hint = f" ({p.provider.docs})" if p.provider and p.provider.password == "app" else ""
        secret = read_secret(out, env=env, stdin=stdin, interactive=interactive,
                             prompt=f"{words} for {entry['username']}{hint}",
                             needs=f"{entry['host']} needs a login: give the {words}",
                             what="password")
        out.say("Checking the login (nothing is sent)...")
        err = _check_login(entry, secret)
        if err is None:
            out.say("[green]login works[/]")
            out.data["login"] = "ok"
            return secret
        _show_login_error(out, err, entry)
        if not interactive or env or stdin or attempt == MAX_PASSWORD_TRIES - 1:
            out.data["login"] = {"code": err.code, "message": err.message}
            out.say("nothing written")
            out.done(1)
    raise AssertionError("unreachable")


def _check_login(entry: dict[str, Any], secret: str) -> Any:
    """None when connecting and logging in works, else the DeliveryError."""
    from postroom.diagnostics.wizard import check_login

    return asyncio.run(check_login(entry, secret, ehlo_name=_hostname()))


def _hostname() -> str:
    import socket

    return socket.gethostname() or "localhost"


def _show_login_error(out: _Out, err: Any, entry: dict[str, Any]) -> None:
    from rich.markup import escape

    from postroom.diagnostics.advice import advise_error
    from postroom.diagnostics.render import print_advice

    out.say(f"[bold red]login failed[/] [dim]({escape(err.code)})[/]: {escape(err.message)}")
    adv = advise_error(err, host=entry["host"], security=entry.get("security"))
    if adv is not None:
        out.data["advice"] = adv.to_dict()
        if not out.as_json:
            print_advice(out.con, adv.to_dict())
    if not out.as_json and err.transcript:
        out.say("  [dim]transcript:[/]")
        for line in err.transcript.splitlines():
            out.con.print(f"    {line}", markup=False, highlight=False)


def _save(out: _Out, path: Path, entry: dict[str, Any], password: str | None, address: str,
          p: Any, oauth: bool) -> None:
    from postroom import settings as settings_mod
    from postroom.configedit import append_connection
    from postroom.runtime import Instance

    created = not path.exists()
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    chosen = p.explanation[:p.explanation.index("not chosen:")] if "not chosen:" in \
        p.explanation else p.explanation
    comments = [f"Added by `postroom wizard {address}` on {when}:", *chosen]
    comments += p.notes
    if password is not None:
        comments.append(f"The {p.provider.password_words if p.provider else 'password'} is "
                        f"stored encrypted in the database; change it with `postroom "
                        f"connection set-password {entry['name']}`.")
    if oauth:
        comments.append(f"Sign in once: `postroom oauth login {entry['name']}`.")
    _guard(out, lambda: append_connection(path, entry, comments))
    settings = _guard(out, lambda: settings_mod.load(path))
    if password is not None:
        inst = Instance(settings)
        _guard(out, lambda: inst.secrets.set(f"connection:{entry['name']}:password", password))
        inst.close()
    out.data.update(config=str(path), created_config=created, connection=entry,
                    password_stored=password is not None)
    out.say(f"[green]saved[/] connection [bold]{entry['name']}[/] to {path}"
            + (" (new file)" if created else "")
            + ("; password stored encrypted" if password is not None else ""))
    first = settings.connections[0].name
    if settings.routes:
        out.say(f"[yellow]note[/]: routes are configured; add {entry['name']!r} to a route's "
                "chain to use it")
    elif first != entry["name"]:
        out.say(f"[yellow]note[/]: mail goes through {first!r} by default; this connection is "
                f"used when a route or `--connection {entry['name']}` picks it")


def _send_test(out: _Out, path: Path, name: str, to: str) -> int:
    """`postroom test NAME --to TO`, with the same delivery path and transcript."""
    from postroom import cli
    from postroom import settings as settings_mod
    from postroom.ops.connections import test_envelope
    from postroom.runtime import Instance

    inst = Instance(_guard(out, lambda: settings_mod.load(path)))
    conn = inst.settings.connection(name)
    frm = getattr(conn, "username", None) or to
    if "@" not in frm:
        frm = to

    def build() -> Any:
        return test_envelope(inst.settings, name, to, frm, source="cli:wizard",
                             expires_at=cli.one_try_expiry(),
                             how=", set up by `postroom wizard`")

    env = _guard(out, build)
    msg_id = _guard(out, lambda: inst.queue.enqueue_sync(env, hold=cli.NOW_HOLD))
    out.say(f"Sending a test message to {to} (message {msg_id})...")
    attempts = cli._deliver_now(inst, msg_id, cli.TEST_NOT_RETRIED)
    if not out.as_json:
        for a in attempts:
            cli._print_attempt(a, inst.settings)
    row = inst.queue.log.get(msg_id) or {}
    status = row.get("status")
    out.data["test"] = {"id": msg_id, "to": to, "status": status, "attempts": attempts}
    if status == "sent":
        out.say(f"[bold green]test message sent[/]: connection {name} works. Check {to}'s "
                "inbox (and spam folder); `postroom doctor` checks SPF/DKIM/DMARC.")
        return 0
    out.say(f"[bold red]the test message was not sent[/] ({status}): the connection is saved; "
            f"fix what the advice says, then `postroom test {name} --to {to}`")
    return 1
