"""The `postroom` command (Typer + Rich)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m postroom.cli` starts as the installed command does (postroom.launch):
    # `serve` and `worker` without loading Typer, every other command through it.
    from postroom.launch import main as launch_main

    launch_main()
    sys.exit(0)

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from postroom import launch
from postroom.commands import lazy, views
from postroom.exceptions import MessageError, PostroomError

# Every import here is paid by each command and by --help: the command modules are loaded by
# name when they run (postroom.commands.lazy), the heavy modules inside the functions.
app = typer.Typer(
    cls=lazy.LazyGroup,
    help="Postroom: the mail room for your applications. Apps hand mail in; Postroom keeps it "
    "safe, delivers it through your provider, logs every attempt and explains failures.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion (lazy.LazyGroup)
    pretty_exceptions_enable=False,
)
conn_cli = typer.Typer(help="Connections to your providers.", no_args_is_help=True)
lazy.group(app, "app")
app.add_typer(conn_cli, name="connection")
for _name in ("queue", "connections", "routes", "oauth", "config", "settings", "admin",
              "suppressions", "alerts"):
    lazy.group(app, _name)
for _name in ("audit", "events", "report"):
    lazy.command(app, _name)
lazy.command(app, "wordpress-plugin")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(*launch.CONFIG_OPTION, help="Configuration file (default: $POSTROOM_CONFIG or "
                 "./postroom.toml)", show_default=False),
]


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    from importlib.metadata import version  # here: a bug report's first line, nothing more

    print(f"postroom {version('postroom')} (Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option(
        "--version", "-V", is_eager=True, callback=_print_version,
        help="Print Postroom's version (and Python's) and exit")] = False,
) -> None:
    # No docstring: the group's help is the Typer's above.
    pass
T = TypeVar("T")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _fail(err: PostroomError) -> None:
    launch.print_error(err)  # the same line as `serve` and `worker` started without Typer
    raise typer.Exit(launch.exit_status(err))


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PostroomError as err:
        _fail(err)
        raise  # unreachable: _fail exits


def _instance(config: Path | None, *, create: bool = False) -> Any:
    from postroom import settings as settings_mod
    from postroom.runtime import Instance

    return _guard(lambda: Instance(settings_mod.load(config, create=create)))


_when = views.when  # one format for every command (postroom.commands.views)
_parse_since = views.parse_since


# -- long-running processes ------------------------------------------------------------------
@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Accept mail over SMTP and deliver it (creates config, data, key and certificate on first
    run)."""
    # Usually started by postroom.launch without this module; here for --help, the forms
    # it leaves to Typer, and a program that calls this app itself.
    _guard(lambda: launch.run("serve", config))


@app.command()
def worker(config: ConfigOpt = None) -> None:
    """Run a delivery worker alone, sharing the queue with `serve` (scale-out)."""
    _guard(lambda: launch.run("worker", config))  # as `serve`: usually postroom.launch's


# -- sending ------------------------------------------------------------------------------
NOW_HOLD = 60.0  # `send --now` / `test`: seconds a running worker leaves the message to us
# A test is tried once, here, and recorded; it is never left queued for `serve` (or an OAuth
# sign-in) to send later, to an address typed for a test, perhaps long ago.
TEST_NOT_RETRIED = "a test send is not retried"


def one_try_expiry() -> float:
    """Expiry of a test message: its hold. Should the process that tries it die first, a
    worker tries it once after the hold, and then it is sent or failed, never retried."""
    return time.time() + NOW_HOLD


def _deliver_and_report(inst: Any, msg_id: str, no_retry: str | None = None) -> None:
    """Deliver a just-queued message in this process, print every attempt (one per
    connection tried) and exit 1 unless it was sent."""
    attempts = _deliver_now(inst, msg_id, no_retry)
    for attempt in attempts:
        _print_attempt(attempt, inst.settings)
    row = inst.queue.log.get(msg_id) or {}
    if row.get("status") != "sent":
        if no_retry is not None:
            _console().print(f"not sent: {no_retry}; nothing is left in the queue", markup=False)
        if not attempts:
            state = "not sent" if row.get("status") == "failed" else "not sent yet"
            _console().print(f"{state}: {row.get('last_error') or 'waiting'}", markup=False)
        raise typer.Exit(1)


def _deliver_now(inst: Any, msg_id: str, no_retry: str | None = None) -> list[dict[str, Any]]:
    """One delivery run of ``msg_id`` in this process; ``no_retry``: the reason it gets no
    other (a test send), see queue.sql.Claimed."""
    import asyncio

    async def go() -> list[dict[str, Any]]:
        transports = inst.transports()
        w = inst.worker(transports)
        try:
            claimed = await inst.queue.claim(w.owner, 1, inst.settings.delivery.lease_seconds,
                                             only=msg_id)
            if not claimed:
                raise MessageError(f"message {msg_id} is not waiting for delivery",
                                   code="message.not_waiting")
            claimed[0].no_retry = no_retry
            attempts: list[dict[str, Any]] = await w.deliver(claimed[0])
            return attempts
        finally:
            for t in transports.values():
                await t.aclose()
            await inst.queue.writer.aclose()

    result: list[dict[str, Any]] = _guard(lambda: asyncio.run(go()))
    return result


def _print_attempt(a: dict[str, Any], settings: Any = None) -> None:
    """One attempt; with ``settings`` (`show` and `test`), what its failure means and how to
    fix it."""
    advice = None
    if settings is not None:
        from postroom.diagnostics.advice import advice_for_attempt

        advice = advice_for_attempt(a, settings=settings)
    views.print_attempt(a, advice)


@app.command()
def send(
    to: Annotated[list[str] | None, typer.Option("--to", help="Recipient (repeat)")] = None,
    sender: Annotated[str | None, typer.Option("--from", help="Sender address")] = None,
    cc: Annotated[list[str] | None, typer.Option("--cc")] = None,
    bcc: Annotated[list[str] | None, typer.Option("--bcc")] = None,
    subject: Annotated[str, typer.Option("--subject", "-s")] = "",
    text: Annotated[str | None, typer.Option("--text", help="Plain-text body")] = None,
    html: Annotated[str | None, typer.Option("--html", help="HTML body")] = None,
    attach: Annotated[list[Path] | None, typer.Option("--attach", help="File (repeat)")] = None,
    inline: Annotated[list[Path] | None, typer.Option(
        "--inline", help="Image shown in the HTML as <img src=\"cid:FILE NAME\"> (repeat)")]
    = None,
    reply_to: Annotated[list[str] | None, typer.Option("--reply-to", help="Reply-To (repeat)")]
    = None,
    header: Annotated[list[str] | None, typer.Option(
        "--header", help="Extra header 'Name: value' (repeat)")] = None,
    connection: Annotated[str | None, typer.Option("--connection",
                                                   help="Deliver through this connection")] = None,
    now: Annotated[bool, typer.Option("--now", help="Deliver at once and show the transcript")]
    = False,
    config: ConfigOpt = None,
) -> None:
    """Queue a message composed from flags, or raw MIME from stdin (with --to/--from).
    Addresses may be "Name <addr>"; non-ASCII names, subjects and file names are fine."""
    from postroom.envelope import Envelope
    from postroom.headers import parse_mailbox
    from postroom.idn import check_address
    from postroom.ingress.accept import crlf
    from postroom.message import Attachment, Draft
    from postroom.message import build as build_envelope

    inst = _instance(config)
    rcpts = [*(to or []), *(cc or []), *(bcc or [])]

    def build() -> Envelope:
        if not sender:
            raise MessageError("--from is required", code="cli.from")
        if not rcpts:
            raise MessageError("give at least one --to, --cc or --bcc", code="cli.to")
        if connection:
            inst.settings.connection(connection)
        composed = text is not None or html is not None or attach or inline or header
        if not composed and not sys.stdin.isatty():
            raw = sys.stdin.buffer.read()
            addrs = [check_address(parse_mailbox(a)[1]) for a in [sender, *rcpts]]
            # sendmail-style input: lone LFs become CRLF (a bare CR is refused at intake)
            return Envelope(addrs[0], addrs[1:], crlf(raw), source="cli",
                            connection=connection)
        extra: dict[str, str] = {}
        for item in header or []:
            name, colon, value = item.partition(":")
            if not colon or not name.strip():
                raise MessageError(f"--header {item!r}: write it as 'Name: value'",
                                   code="cli.header")
            if name.strip().lower() in (k.lower() for k in extra):
                raise MessageError(f"--header {name.strip()} is given twice",
                                   code="cli.header")
            extra[name.strip()] = value.strip()
        files = [*(Attachment.from_path(p) for p in attach or []),
                 *(Attachment.from_path(p, content_id=p.name) for p in inline or [])]
        draft = Draft(from_=sender, to=to or [], cc=cc or [], bcc=bcc or [],
                      reply_to=reply_to or [], subject=subject, text=text, html=html,
                      attachments=files, headers=extra)
        return build_envelope(draft, source="cli", connection=connection,
                              max_size=inst.settings.server.max_message_size)

    env = _guard(build)
    _guard(lambda: inst.intake.check(env))
    # With --now, held back from running workers, so that this process is the one to deliver.
    msg_id = _guard(lambda: inst.queue.enqueue_sync(env, hold=NOW_HOLD if now else 0.0))
    _console().print(f"queued {msg_id}")
    if now:
        _deliver_and_report(inst, msg_id)


@app.command()
def test(
    connection: Annotated[str, typer.Argument(help="Connection name")],
    to: Annotated[str, typer.Option("--to", help="Where the test message goes")],
    sender: Annotated[str | None, typer.Option("--from", help="Sender (default: the "
                                                "connection's username)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Send a test message through CONNECTION now and show the transcript."""
    from postroom.ops.connections import test_envelope

    inst = _instance(config)
    env = _guard(lambda: test_envelope(inst.settings, connection, to, sender,
                                       source="cli:test", expires_at=one_try_expiry()))
    _guard(lambda: inst.intake.check(env))
    msg_id = _guard(lambda: inst.queue.enqueue_sync(env, hold=NOW_HOLD))
    _deliver_and_report(inst, msg_id, TEST_NOT_RETRIED)


@app.command()
def probe(
    host: Annotated[str, typer.Argument(help="The SMTP server: host name or IP address")],
    port: Annotated[list[int] | None, typer.Option(
        "--port", "-p", min=1, max=65535,
        help="Port to probe (repeat; default 25, 465, 587 and 2525)")] = None,
    timeout: Annotated[float, typer.Option(
        min=0.1, max=3600, help="Overall deadline in seconds, all ports together")] = 10.0,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="CA bundle to trust (as a connection's ca_file)")] = None,
    server_name: Annotated[str | None, typer.Option(
        "--server-name", help="Name the certificate must carry (default: HOST)")] = None,
    banner_wait: Annotated[float, typer.Option(
        min=0.1, help="Seconds of silence after which a port is tried as implicit TLS")] = 3.0,
    https: Annotated[bool, typer.Option(
        "--https/--no-https", help="Also check the API providers' HTTPS endpoints")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report")] = False,
) -> None:
    """Probe HOST's SMTP ports in parallel (connect, greeting, EHLO, TLS, certificate, AUTH)
    and say which one to use. Sends no credentials. Exit 1 when no port is usable."""
    from postroom.diagnostics.probe import DEFAULT_PORTS
    from postroom.diagnostics.render import ca_file_option, probe_command

    code = _guard(lambda: probe_command(
        host, port or DEFAULT_PORTS, as_json=as_json, console=_console(), timeout=timeout,
        ca_file=ca_file_option(ca_file), server_name=server_name, banner_wait=banner_wait,
        https=https))
    raise typer.Exit(code)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                      "help_option_names": []},
    add_help_option=False,
)
def sendmail(ctx: typer.Context) -> None:
    """sendmail(8)-compatible: [-t] [-i] [-f SENDER] [-F NAME] [-C FILE] [recipient ...]
    (also installed as `postroom-sendmail`; --help lists every option)."""
    from postroom.ingress.sendmail import run

    # Click drops a "--" (which ends sendmail's options): take the arguments as given.
    argv = sys.argv[1:]
    args = argv[argv.index("sendmail") + 1:] if "sendmail" in argv else list(ctx.args)
    raise typer.Exit(run(args, prog="postroom sendmail"))


# -- the log ----------------------------------------------------------------------------------
@app.command("log")
def log_cmd(
    status: Annotated[str | None, typer.Option(help="queued|sending|sent|partial|deferred|failed")]
    = None,
    to: Annotated[str | None, typer.Option(
        "--to", help="Recipient: a whole address exactly, or part of one")] = None,
    sender: Annotated[str | None, typer.Option(
        "--from", help="Sender: a whole address exactly, or part of one")] = None,
    connection: Annotated[str | None, typer.Option(
        "--connection", help="Last tried on this connection")] = None,
    since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or a date")] = None,
    event: Annotated[str | None, typer.Option(
        "--event", help="Had this delivery event: bounced, complained, delivered...")] = None,
    text: Annotated[str | None, typer.Option(
        "--text", help="In the subject, From, To or Message-ID (as the admin's search)")]
    = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Tagged so by its app")] = None,
    app_name: Annotated[str | None, typer.Option("--app", help="Handed in by this app")] = None,
    source: Annotated[str | None, typer.Option(
        "--source", help="Came in by this door: smtp:shop, api:shop, cli...")] = None,
    until: Annotated[str | None, typer.Option(help="Created before: 30m, 2h, 7d or a date")]
    = None,
    ids: Annotated[list[str] | None, typer.Option(
        "--id", help="With an action: this message (repeat) instead of a filter")] = None,
    retry: Annotated[bool, typer.Option(
        "--retry", help="Retry every match now (failed recipients only)")] = False,
    resend_all: Annotated[bool, typer.Option(
        "--resend", help="Queue a new copy of every match to its recipients")] = False,
    delete: Annotated[bool, typer.Option(
        "--delete", help="Delete every match and its attempts (never one being sent)")]
    = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Act without asking")] = False,
    limit: Annotated[int | None, typer.Option(
        min=1, help="At most this many (default 50; with --export: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    export: Annotated[str | None, typer.Option(
        "--export", help="csv (to stdout or --out FILE) or eml (--out FOLDER or FILE.zip)")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where --export writes")] = None,
    config: ConfigOpt = None,
) -> None:
    """List messages, newest first; export them (--export csv|eml); or act on every match
    (--retry, --resend, --delete: prints the count, asks unless --yes)."""
    from postroom.store.schema import STATUSES

    if status and status not in STATUSES:
        _fail(MessageError(f"--status {status!r}: use one of {', '.join(STATUSES)}",
                           code="cli.status"))
    action = None
    if retry or resend_all or delete:  # a plain listing loads no command module (startup)
        from postroom.commands.bulk import chosen_action

        action = chosen_action(retry=retry, resend=resend_all, delete=delete)
    if ids and action is None:
        _fail(MessageError("--id goes with --retry, --resend or --delete; to see one message: "
                           "`postroom show ID`", code="cli.usage"))
    inst = _instance(config)
    since_ts = _guard(lambda: _parse_since(since)) if since else None
    until_ts = _guard(lambda: _parse_since(until)) if until else None
    from postroom.store.log import LogFilter

    wanted = _guard(lambda: LogFilter(status=status, to=to, sender=sender,
                                      connection=connection, since=since_ts, event=event,
                                      text=text, tag=tag, app=app_name, source=source,
                                      until=until_ts))
    if export is not None:  # postroom.commands.export: streams every match, not a page
        import dataclasses

        from postroom.audit import Actor
        from postroom.commands.export import export_log
        from postroom.ops import bulk

        if action is not None:
            _fail(MessageError(f"--export and --{action}: one at a time", code="cli.usage"))
        fmt = _guard(lambda: bulk.parse_format(export))
        _guard(lambda: bulk.begin_export(inst, Actor.cli(), fmt, wanted))
        export_log(inst, export, out, limit=limit, **dataclasses.asdict(wanted))
        return
    if action is not None:  # postroom.commands.bulk: the admin's bulk actions
        from postroom.commands import bulk as bulk_cmd

        bulk_cmd.act(inst, action, wanted, ids or [], yes=yes, filtered=any(
            v is not None for v in (status, to, sender, connection, since, event, text, tag,
                                    app_name, source, until)))
        return
    from postroom import control  # what a running `postroom serve` answers this with

    rows = _guard(lambda: control.log_rows(inst, wanted, limit or 50, as_json))
    if as_json:
        views.json_lines(rows)
        return
    views.log_table(rows)


@app.command()
def show(
    msg_id: Annotated[str, typer.Argument(metavar="ID", help="Message id (or a unique prefix)")],
    raw: Annotated[bool, typer.Option("--raw", help="Print the MIME message as stored")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """A message with its recipients, attempts and transcripts."""
    inst = _instance(config)
    unknown = MessageError(f"no message {msg_id!r}; list them with `postroom log`",
                           code="message.unknown")
    if raw:
        m = _guard(lambda: inst.queue.log.get(msg_id))
        if m is None:
            _fail(unknown)
        sys.stdout.buffer.write(m["raw"] or b"")
        return
    from postroom import control  # what a running `postroom serve` answers this with

    found = _guard(lambda: control.show_data(inst, msg_id, as_json))
    if found is None:
        _fail(unknown)
        return
    views.show_message(found, as_json)


@app.command()
def resend(
    msg_id: Annotated[str, typer.Argument(metavar="ID")],
    to: Annotated[list[str] | None, typer.Option("--to", help="Other recipient(s)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Queue a logged message again (as a new log entry), optionally to other recipients."""
    from postroom.audit import Actor
    from postroom.ops import messages

    inst = _instance(config)
    new_id = _guard(lambda: messages.resend(inst, Actor.cli(), msg_id, to or None))
    _console().print(f"queued {new_id} (copy of {msg_id})")


# -- connections -----------------------------------------------------------------------
@conn_cli.command("list")
def conn_list(config: ConfigOpt = None) -> None:
    """Same as `postroom connections`: each connection with its health and limits."""
    from postroom.commands.connections import show as show_connections

    show_connections(config)


@conn_cli.command("set-password")
def conn_set_password(
    name: str,
    password_stdin: Annotated[bool, typer.Option("--stdin", help="Read it from stdin")] = False,
    webhook_key: Annotated[bool, typer.Option(
        "--webhook-key", help="Store the provider's webhook signing key (or user:password) "
        "instead")] = False,
    config: ConfigOpt = None,
) -> None:
    """Store a connection's password (SMTP) or api key (HTTPS API providers) encrypted in
    the database; with --webhook-key, the key its provider signs delivery events with."""
    from postroom.secrets import Secret, secret_name
    from postroom.transports import password_secret

    inst = _instance(config)
    what, secret_kind = password_secret(_guard(lambda: inst.settings.connection(name)))
    if webhook_key:  # checked by postroom.ingress.webhooks_http
        what, secret_kind = "webhook key", Secret.WEBHOOK_KEY
    if password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        secret = getpass.getpass(f"{what} for {name}: ")
    if not secret:
        _fail(MessageError(f"empty {what}; nothing stored", code="cli.password"))
    _guard(lambda: inst.secrets.set(secret_name(name, secret_kind), secret))
    _console().print(f"{what} for {name} stored encrypted")


lazy.command(app, "wizard")
lazy.command(app, "doctor")
lazy.command(app, "backup")
lazy.command(app, "restore")
lazy.command(app, "install-service")
lazy.command(app, "install-sendmail")
lazy.command(app, "reload")  # postroom.commands.config: SIGHUP to the running serve
lazy.group(app, "dkim")


def main() -> None:
    if len(sys.argv) < 2 or "--help" in sys.argv[1:]:  # a help page: Typer's rich_utils
        lazy.import_help_lean()
    app()


if __name__ == "__main__":
    main()
