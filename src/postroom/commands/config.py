"""`postroom config export|import FILE`: copy a configuration to another instance
(postroom.config_transfer); secrets encrypted with a passphrase, or left out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from postroom.commands._common import ConfigOpt, console, fail, guard, instance
from postroom.commands.registry import help_of
from postroom.exceptions import ConfigError

cli = typer.Typer(help=help_of("config"), no_args_is_help=True)

PassEnvOpt = Annotated[str | None, typer.Option(
    "--passphrase-env", metavar="VAR", help="Read the passphrase from this environment "
    "variable", show_default=False)]
PassStdinOpt = Annotated[bool, typer.Option(
    "--passphrase-stdin", help="Read the passphrase from the first line of standard input")]
NoSecretsOpt = Annotated[bool, typer.Option(
    "--no-secrets", help="Leave the secrets out (passwords, OAuth client secrets and grants)")]


def _passphrase(env: str | None, stdin: bool, no_secrets: bool, *, confirm: bool) -> str | None:
    given = [o for o, on in (("--passphrase-env", env), ("--passphrase-stdin", stdin),
                             ("--no-secrets", no_secrets)) if on]
    if len(given) > 1:
        fail(ConfigError(f"give only one of {', '.join(given)}", code="cli.passphrase"))
    if no_secrets:
        return None
    if env:
        value = os.environ.get(env)
        if not value:
            fail(ConfigError(f"--passphrase-env {env}: that environment variable is not set",
                             code="cli.passphrase"))
        return value
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        fail(ConfigError("secrets are never written in plaintext: give a passphrase "
                         "(--passphrase-env VAR or --passphrase-stdin) or --no-secrets",
                         code="cli.passphrase"))
    typed: str = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    return typed


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
