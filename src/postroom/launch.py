"""The `postroom` command's entry point: `serve` and `worker` start without Typer.

Typer (its own Click, its pydantic adapters, shellingham) is loaded to parse a command
line, and a module Python has imported is never given back: a server started through it
would carry the toolkit for as long as it runs. `serve` and `worker` take one option,
``--config``; when the command line is one of the forms Click reads the same way,

    postroom serve                     postroom serve --config PATH
    postroom serve -c PATH             postroom serve --config=PATH

(or the same with ``worker``), the process is started from here. Any other command line
(``--help``, ``-cPATH``, a mistyped or repeated option, every other command, a shell's
completion request) goes to Typer (postroom.cli), which stays the one documented
interface: the same options, help and messages. Both paths run :func:`run`, print a
Postroom error with :func:`print_error` and exit as Typer's standalone mode does (0; 2 for
a configuration error, 1 for another; 130 on Ctrl-C before the server took the signals).

`postroom log`, `show` and `queue list` are first offered to a running `postroom serve` of
the same instance (postroom.control), which answers them without this process importing
the database layer or Typer; when none answers, they go to Typer as every other command.

`python -m postroom.cli` comes here too (the top of postroom.cli), so the tests that start
a server that way start it as the installed command does.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from postroom.exceptions import ConfigError, PostroomError

# --config's names, for every command (postroom.cli's ConfigOpt) and for the parse below.
CONFIG_OPTION = ("--config", "-c")
LONG_RUNNING = ("serve", "worker")  # the commands started from here
# Commands a running `postroom serve` may answer (postroom.control: some of their forms).
READ_COMMANDS = ("log", "show", "queue")


def lean_command(argv: Sequence[str], environ: Mapping[str, str]
                 ) -> tuple[str, Path | None] | None:
    """(command, --config's value) when ``argv`` (without the program name) is a
    long-running command in a form listed above; None when Typer should read it."""
    if not argv or argv[0] not in LONG_RUNNING:
        return None
    if completing(environ):
        return None
    rest = list(argv[1:])
    if not rest:
        return argv[0], None
    long = CONFIG_OPTION[0]
    if len(rest) == 2 and rest[0] in CONFIG_OPTION:
        value = rest[1]
    elif len(rest) == 1 and rest[0].startswith(long + "="):
        value = rest[0][len(long) + 1:]
    else:
        return None
    # An empty value or one that looks like an option: whatever Click makes of it, say so
    # the way it does.
    if not value or value.startswith("-"):
        return None
    return argv[0], Path(value)


def completing(environ: Mapping[str, str]) -> bool:
    """Click's completion protocol (`_POSTROOM_COMPLETE=...`): Typer answers it."""
    return any(name.startswith("_") and name.endswith("_COMPLETE") for name in environ)


def run(command: str, config: Path | None) -> None:
    """`postroom serve` or `postroom worker` on ``config`` until stopped. ``serve`` writes
    the commented configuration file first when there is none."""
    import asyncio

    from postroom import config_load
    from postroom import settings as settings_mod

    if command == "serve":
        from postroom.server import serve

        cfg = config_load.config_path_from(config, os.environ)
        created = not cfg.exists()
        settings = settings_mod.load(config, create=True)
        if created:
            print(f"created {cfg} (commented; add your provider there)", file=sys.stderr,
                  flush=True)
        settle_heap()
        asyncio.run(serve(settings))
    elif command == "worker":
        from postroom.server import work

        settings = settings_mod.load(config)
        settle_heap()
        asyncio.run(work(settings))
    else:
        raise ValueError(f"not a long-running command: {command!r}")


def settle_heap() -> None:
    """Collect once, then set what starting made aside from the cyclic collector
    (gc.freeze): the modules, classes and settings live as long as the process, yet each
    full collection, every few thousand messages under load, walked all of them again
    (docs/benchmarks.md, session 11, "Garbage collection"). Here, in the process's entry,
    not in serve(): a test process that runs many servers must not keep its garbage."""
    import gc

    gc.collect()
    gc.freeze()


def print_error(err: PostroomError) -> None:
    """``error (code): message`` on stderr, the way every command reports a failure."""
    from rich.console import Console
    from rich.markup import escape

    # Escape: messages quote TOML like "[server]" or "[[connections]]", which Rich would
    # otherwise take for markup tags and drop.
    Console(stderr=True, highlight=False).print(
        f"[bold red]error[/] [dim]({escape(err.code)})[/]: {escape(err.message)}",
        markup=True, soft_wrap=True)


def exit_status(err: PostroomError) -> int:
    return 2 if isinstance(err, ConfigError) else 1


def standalone(command: str, config: Path | None) -> int:
    """:func:`run` with the exit status Typer's standalone mode would give."""
    try:
        run(command, config)
    except PostroomError as err:
        print_error(err)
        return exit_status(err)
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        if err.errno != errno.EPIPE:  # stderr's reader went away: nothing left to tell
            raise
        return 1
    return 0


def main() -> None:
    """The installed `postroom` command."""
    found = lean_command(sys.argv[1:], os.environ)
    if found is None:
        if sys.argv[1:2] and sys.argv[1] in READ_COMMANDS:
            from postroom import control

            if control.answered(sys.argv[1:], os.environ):  # by a running `postroom serve`
                return
        from postroom.cli import main as typer_main

        typer_main()
        return
    sys.exit(standalone(*found))
