"""`postroom backup FILE` and `postroom restore FILE` (postroom.backup)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from postroom.commands._common import ConfigOpt, console, guard
from postroom.commands.passphrase import PassEnvOpt, PassStdinOpt, read_passphrase


def backup_cmd(file: Annotated[Path, typer.Argument(help="The backup file to write")],
               passphrase_env: PassEnvOpt = None, passphrase_stdin: PassStdinOpt = False,
               config: ConfigOpt = None) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("backup").
    from postroom import backup, settings

    conf = guard(lambda: settings.load(config))
    guard(lambda: backup.sqlite_file(conf, "backup"))  # PostgreSQL: what to run, first
    passphrase = read_passphrase(passphrase_env, passphrase_stdin, confirm=True, missing=(
        "a backup is always encrypted: give its passphrase with --passphrase-env VAR or "
        "--passphrase-stdin (or run this at a terminal to type it)"))
    report = guard(lambda: backup.backup(conf, file, passphrase))
    config_part = f", {report.config}" if report.config else ""
    key_part = {"file": ", the instance key", "environment": ", the instance key (from "
                "POSTROOM_SECRET_KEY)", "none": " (no instance key yet: nothing stored "
                "encrypted)"}[report.key]
    console().print(
        f"backed up {report.messages} message(s) (schema {report.revision}){key_part}"
        f"{config_part} to {report.path} ({report.size:,} bytes, encrypted). Keep the "
        "passphrase apart from the file: without it the backup cannot be read.",
        soft_wrap=True, markup=False)


def restore_cmd(file: Annotated[Path, typer.Argument(help="A file written by postroom backup")],
                force: Annotated[bool, typer.Option(
                    "--force", help="Replace a database that holds data (it is kept beside "
                    "it, renamed .replaced-<time>)")] = False,
                passphrase_env: PassEnvOpt = None, passphrase_stdin: PassStdinOpt = False,
                config: ConfigOpt = None) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("restore").
    from postroom import backup, settings

    conf = guard(lambda: settings.load(config))
    guard(lambda: backup.sqlite_file(conf, "restore"))
    passphrase = read_passphrase(passphrase_env, passphrase_stdin, confirm=False, missing=(
        "give the backup's passphrase with --passphrase-env VAR or --passphrase-stdin (or run "
        "this at a terminal to type it)"))
    report = guard(lambda: backup.restore(conf, file, passphrase, force=force))
    con = console()
    made = dt.datetime.fromtimestamp(report.created_at).strftime("%Y-%m-%d %H:%M:%S")
    con.print(f"restored {report.messages} message(s) (schema {report.revision}, backed up "
              f"{made}) into {report.database}", soft_wrap=True, markup=False)
    if report.key_file:
        con.print(f"instance key: {report.key_file}", soft_wrap=True, markup=False)
    for path in report.set_aside:
        con.print(f"kept the one it replaced as {path}", soft_wrap=True, markup=False)
    if report.config:
        con.print(f"the backup's configuration is in {report.config}: compare it with "
                  "yours (connections, routes)", soft_wrap=True, markup=False)
    for warning in report.warnings:
        console(stderr=True).print(f"warning: {warning}", soft_wrap=True, markup=False)
    con.print("start Postroom: an older schema is migrated at start", soft_wrap=True)
