"""The fast path's option tables (postroom.control: LOG_OPTIONS, SHOW_OPTIONS, QUEUE_OPTIONS)
hold to the Typer commands they stand for: `postroom log`, `show` and `queue list` are read
there without Typer when a running serve answers, so an option added to one of those
commands must be read there alike (same names, same kind, same default) or be listed below
as left to Typer, for which the fast path declines the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from postroom import control
from postroom.cli import app

# Per command: its option table, the options the fast path leaves to Typer (each name), and
# the positional arguments it takes.
COMMANDS: dict[tuple[str, ...], tuple[dict[str, str], dict[str, str], int]] = {
    ("log",): (control.LOG_OPTIONS, {
        # The actions change state (serve answers reads only) and may ask first.
        "--id": "an action's message", "--retry": "an action", "--resend": "an action",
        "--delete": "an action", "--yes": "an action's confirmation", "-y": "--yes",
        # An export streams every match to a file or stdout, not a page of rows.
        "--export": "an export", "--out": "where an export goes",
        "--help": "Click prints the help",
    }, 0),
    ("show",): (control.SHOW_OPTIONS, {
        "--raw": "the stored bytes, written as they are by the command itself",
        "--help": "Click prints the help",
    }, 1),
    ("queue", "list"): (control.QUEUE_OPTIONS, {
        "--help": "Click prints the help",
    }, 0),
}
# Defaults a command applies itself to an option whose Typer default is None (the fast path
# must apply the same), with the words of its help that say so.
COMMAND_DEFAULTS = {("log", "--limit"): (50, "default 50")}


# Typer (0.29 on) carries its own copy of Click, whose classes are not the click package's:
# parameters are told apart by what they have (scripts/docsgen/cli_ref.py alike).
def command(path: tuple[str, ...]) -> tuple[Any, typer.Context]:
    """The real Click command of ``postroom PATH`` (lazy groups loaded) and its context."""
    cmd: Any = typer.main.get_command(app)
    ctx = typer.Context(cmd, info_name="postroom")
    for name in path:
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, path
        ctx = typer.Context(cmd, info_name=name, parent=ctx)
    return cmd, ctx


def kind(opt: Any) -> str:
    """The fast path's kind for ``opt``, from what Click reads and the annotation."""
    annotation = opt.type_descriptor.annotation
    if opt.count or opt.nargs != 1:
        pytest.fail(f"{opt.opts}: a kind the fast path does not read")
    if opt.multiple:
        assert annotation == list[str], (opt.opts, annotation)
        return control.MULTI
    if opt.is_flag:
        return control.FLAG
    if annotation is int:
        return control.NUMBER
    assert annotation in (str, Path), (opt.opts, annotation)
    return control.VALUE


def argv_with(path: tuple[str, ...], arguments: int, *extra: str) -> list[str]:
    return [*path, *["abc"] * arguments, *extra]


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_option_is_read_alike_or_left_to_typer(path: tuple[str, ...]) -> None:
    table, left, arguments = COMMANDS[path]
    cmd, ctx = command(path)
    params = cmd.get_params(ctx)
    assert sum(p.param_type_name == "argument" for p in params) == arguments, path
    bare = control.request_from(argv_with(path, arguments), 0.0)
    assert bare is not None, path
    seen: set[str] = set()
    for opt in params:
        if opt.param_type_name != "option":
            continue
        names = [*opt.opts, *opt.secondary_opts]
        seen.update(names)
        if all(n in left for n in names):
            # Declined with a value or without, wherever it comes.
            for extra in ([names[0]], [names[0], "x"]):
                assert control.request_from(argv_with(path, arguments, *extra), 0.0) is None
            continue
        assert not any(n in left for n in names), (path, names, "partly left to Typer")
        missing = [n for n in names if n not in table]
        assert not missing, (f"`postroom {' '.join(path)}` {missing}: read it in control.py's "
                             "table or list it here as left to Typer")
        assert {table[n] for n in names} == {kind(opt)}, (path, names)
        default = opt.get_default(ctx, call=False)
        if kind(opt) == control.FLAG:
            assert default is False, (path, names)
        elif kind(opt) == control.NUMBER:
            if (path[0], names[0]) in COMMAND_DEFAULTS:
                assert default is None
                default, says = COMMAND_DEFAULTS[path[0], names[0]]
                assert says in (opt.help or ""), (path, names)
            assert bare["limit"] == default, (path, names)
            # What Click refuses (out of the option's range), the fast path never takes.
            low, high = opt.min, opt.max
            for value in (None if low is None else low - 1, None if high is None else high + 1):
                if value is not None and value >= 0:
                    assert control.request_from(
                        argv_with(path, arguments, names[0], str(value)), 0.0) is None, value
        else:  # a value or repeated values: none unless given
            assert default in (None, ()), (path, names, default)
    assert set(table) <= seen, (path, set(table) - seen, "not options of the command")
    assert set(left) <= seen, (path, set(left) - seen, "not options of the command")
