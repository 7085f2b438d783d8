"""The passphrase of the commands that encrypt what leaves the instance (`postroom config
export|import`, `backup`, `restore`): from an environment variable, standard input's first
line, or typed at a terminal — never from an argument, which other users see in ``ps``."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from postroom.commands._common import fail
from postroom.exceptions import ConfigError

PassEnvOpt = Annotated[str | None, typer.Option(
    "--passphrase-env", metavar="VAR", help="Read the passphrase from this environment "
    "variable", show_default=False)]
PassStdinOpt = Annotated[bool, typer.Option(
    "--passphrase-stdin", help="Read the passphrase from the first line of standard input")]


def read_passphrase(env: str | None, stdin: bool, *, confirm: bool, missing: str) -> str:
    """The passphrase the options give, else typed at a terminal (twice with ``confirm``);
    without a terminal, the error ``missing`` (what the command needs and the fix)."""
    if env and stdin:
        fail(ConfigError("give only one of --passphrase-env, --passphrase-stdin",
                         code="cli.passphrase"))
    if env:
        value = os.environ.get(env)
        if not value:
            fail(ConfigError(f"--passphrase-env {env}: that environment variable is not set",
                             code="cli.passphrase"))
        return value
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        fail(ConfigError(missing, code="cli.passphrase"))
    typed: str = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    return typed
