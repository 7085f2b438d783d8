"""`postroom config export|import FILE`: copy a configuration to another instance
(postroom.config_transfer); secrets encrypted with a passphrase, or left out.
`postroom config check|show` and `postroom reload`: validate a file, print the effective
configuration with each value's origin, make the running server read its file again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, fail, guard, instance
from postroom.commands.passphrase import PassEnvOpt, PassStdinOpt, read_passphrase
from postroom.commands.registry import help_of
from postroom.exceptions import ConfigError, PostroomError

if TYPE_CHECKING:
    from postroom.settings import Settings

cli = typer.Typer(help=help_of("config"), no_args_is_help=True)

NoSecretsOpt = Annotated[bool, typer.Option(
    "--no-secrets", help="Leave the secrets out (passwords, OAuth client secrets and grants)")]


def _passphrase(env: str | None, stdin: bool, no_secrets: bool, *, confirm: bool) -> str | None:
    given = [o for o, on in (("--passphrase-env", env), ("--passphrase-stdin", stdin),
                             ("--no-secrets", no_secrets)) if on]
    if len(given) > 1:
        fail(ConfigError(f"give only one of {', '.join(given)}", code="cli.passphrase"))
    if no_secrets:
        return None
    return read_passphrase(env, stdin, confirm=confirm, missing=(
        "secrets are never written in plaintext: give a passphrase (--passphrase-env VAR or "
        "--passphrase-stdin) or --no-secrets"))


@cli.command("export")
def export(file: Path, passphrase_env: PassEnvOpt = None, passphrase_stdin: PassStdinOpt = False,
           no_secrets: NoSecretsOpt = False, config: ConfigOpt = None) -> None:
    """Write the configuration to FILE (JSON; created readable by you alone)."""
    from postroom.audit import Actor
    from postroom.config_transfer import export_config
    from postroom.fsperm import open_private

    passphrase = _passphrase(passphrase_env, passphrase_stdin, no_secrets, confirm=True)
    inst = instance(config)
    doc = guard(lambda: export_config(inst, passphrase=passphrase, actor=Actor.cli()))
    try:
        with open_private(file, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2)
            out.write("\n")
    except OSError as err:
        fail(ConfigError(f"cannot write {file}: {err.strerror or err}", code="cli.write"))
    secrets = "with secrets (encrypted)" if passphrase else "without secrets"
    console().print(f"exported {len(doc['connections'])} connection(s), "
                    f"{len(doc['routes'])} route(s), {len(doc['apps'])} app(s) {secrets} to "
                    f"{file}. App secrets cannot move: importing creates the apps with new "
                    "ones.", soft_wrap=True)


@cli.command("import")
def import_(file: Path, passphrase_env: PassEnvOpt = None,
            passphrase_stdin: PassStdinOpt = False, no_secrets: NoSecretsOpt = False,
            config: ConfigOpt = None) -> None:
    """Read a configuration written by `postroom config export` into this instance."""
    from postroom.audit import Actor
    from postroom.config_transfer import import_config, parse

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(ConfigError(f"cannot read {file}: {err}", code="cli.read"))
    doc = guard(lambda: parse(text))
    passphrase = None
    if doc.get("secrets") is not None:
        passphrase = _passphrase(passphrase_env, passphrase_stdin, no_secrets, confirm=False)
    inst = instance(config)
    report = guard(lambda: import_config(inst, doc, passphrase=passphrase, actor=Actor.cli(),
                                         skip_secrets=passphrase is None))
    con = console()
    for line in report.imported:
        con.print(f"imported {line}", soft_wrap=True, markup=False)
    for line in report.skipped:
        con.print(f"skipped {line}", soft_wrap=True, markup=False)
    if doc.get("secrets") is not None and not report.secrets:
        con.print("secrets were left out: set the connections' passwords again", soft_wrap=True)
    for name, secret in report.app_secrets.items():
        con.print(f"app {name}: NEW secret (shown only now; app secrets cannot move between "
                  f"instances): SMTP AUTH password {secret}  HTTP API key "
                  f"{inst.apps.api_key(name, secret)}", soft_wrap=True, markup=False)
    con.print("running `postroom serve` and workers pick the change up within seconds",
              soft_wrap=True)


# -- check, show, reload (postroom.config_view, postroom.hup) -------------------------------------
FileArg = Annotated[Path | None, typer.Argument(
    help="The file to check (default: --config, $POSTROOM_CONFIG or ./postroom.toml)",
    show_default=False)]


def _with_database(settings: Settings) -> Settings:
    """``settings`` with the entries stored in its database laid over them, as a server
    would run them; the file's alone when there is no database yet or it cannot be read."""
    from sqlalchemy.exc import SQLAlchemyError

    from postroom.store import dbconfig
    from postroom.store.db import make_engine
    from postroom.store.direct import sqlite_path

    db = sqlite_path(settings.database_url)
    if db is not None and not Path(db).exists():
        return settings
    try:
        engine = make_engine(settings.database_url)
        try:
            return dbconfig.load(settings, engine)[0]
        finally:
            engine.dispose()
    except (PostroomError, SQLAlchemyError):
        return settings


def _file_text(settings: Settings) -> str:
    path = settings.config_path
    try:
        return path.read_text(encoding="utf-8") if path is not None else ""
    except (OSError, UnicodeDecodeError):
        return ""


@cli.command("check")
def check(file: FileArg = None, config: ConfigOpt = None) -> None:
    """Validate a configuration file (errors with file:line and the fix; exit 2), then say
    what would change compared with what the running server uses (the one of --config when
    FILE is a copy elsewhere)."""
    from postroom import config_view
    from postroom.hup import running_pid
    from postroom.settings import load

    new = guard(lambda: load(file or config))
    con = console()
    con.print(f"{new.config_path or 'the defaults'}: valid", soft_wrap=True, markup=False)
    data_dir = guard(lambda: load(config)).data_dir if file and config else new.data_dir
    running = config_view.read_snapshot(data_dir)
    if running is None:
        con.print(f"no running server's configuration in {data_dir} "
                  f"({config_view.SNAPSHOT}): nothing to compare with", soft_wrap=True,
                  markup=False)
        return
    try:
        pid = running_pid(data_dir)
    except OSError:  # not readable by this user: the snapshot is still compared
        pid = None
    state = f"the running server (pid {pid})" if pid else "the last server (not running)"
    after = config_view.items(_with_database(new), text=_file_text(new))
    diff = config_view.changes(config_view.values(running), config_view.values(after))
    if not diff:
        con.print(f"no change from what {state} uses", soft_wrap=True, markup=False)
        return
    con.print(f"would change, compared with {state} (secrets are not compared):",
              soft_wrap=True, markup=False)
    for key, before, now in diff:
        note = " (needs a restart)" if config_view.needs_restart(key) else ""
        con.print(f"  {key}: {json.dumps(before)} -> {json.dumps(now)}{note}",
                  soft_wrap=True, markup=False)


@cli.command("show")
def show(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The effective configuration (file, environment, database, defaults), each value with
    where it came from; secrets masked."""
    from postroom import config_view

    inst = instance(config)
    found = guard(lambda: config_view.items(
        inst.settings, text=_file_text(inst.settings),
        stored={"policy": inst.config.policy(), "retention": inst.config.retention()}))
    if json_out:
        print(json.dumps([{"key": i.key, "value": i.value, "source": i.source}
                          for i in found], indent=1))
        return
    con = console()
    for item in found:
        con.print(f"{item.key} = {json.dumps(item.value)}  # {item.source}", soft_wrap=True,
                  markup=False)


WaitOpt = Annotated[float, typer.Option(
    "--timeout", min=1, help="Seconds to wait for the server's answer")]


def reload_cmd(config: ConfigOpt = None, timeout: WaitOpt = 60.0) -> None:
    from postroom.hup import read_result, running_pid
    from postroom.settings import load

    settings = guard(lambda: load(config))  # refused here first, as `config check` would
    try:
        pid = running_pid(settings.data_dir)
    except OSError as err:
        fail(PostroomError(f"cannot read {settings.data_dir}/serve.pid ({err.strerror}): run "
                           "this as the server's user (or root)", code="cli.reload"))
    if pid is None:
        fail(PostroomError(f"no running postroom serve holds {settings.data_dir}/serve.pid; "
                           "start it (the new file is read at start)", code="cli.reload"))
    seq = (previous.seq if (previous := read_result(settings.data_dir)) else 0)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as err:
        fail(PostroomError(f"cannot signal postroom serve (pid {pid}): {err.strerror}; run "
                           "this as the server's user", code="cli.reload"))
    deadline = time.monotonic() + timeout
    while (result := read_result(settings.data_dir)) is None or result.seq <= seq:
        if time.monotonic() > deadline:
            fail(PostroomError(f"postroom serve (pid {pid}) did not answer within {timeout:g} "
                               "s; see its log", code="cli.reload"))
        time.sleep(0.1)
    if not result.ok:
        fail(PostroomError(f"refused, the running configuration is kept: {result.error}",
                           code="config.reload.refused"))
    con = console()
    con.print(f"reloaded (pid {pid}): " + (", ".join(result.changed) or "nothing changed"),
              soft_wrap=True, markup=False)
    if result.restart:
        con.print("changed but only read at start, needs a restart: "
                  + ", ".join(result.restart), soft_wrap=True, markup=False)
