"""docs/reference/cli.md: every `postroom` command and subcommand, from the Typer app
(postroom.cli.app) through Click's own introspection: the command tree, each command's help,
its arguments and its options with their defaults. Never the --help text, whose layout Rich
decides.

Typer (0.29 on) carries its own copy of Click, whose classes are not the ``click``
package's: commands and parameters are told apart by what they have (``list_commands``,
``param_type_name``), and contexts are ``typer.Context``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import typer
import typer.main

from docsgen.markdown import GENERATED, cell, code, heading, paragraphs, prose
from postroom.cli import app


def render() -> str:
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="postroom")
    commands = list(_walk(root, ctx, ["postroom"]))
    lines = [
        "# Command line", "",
        GENERATED.format(source="the Typer app (`postroom.cli`)"), "",
        "Every `postroom` command. `postroom COMMAND --help` prints the same help in the "
        "terminal. Most commands read the configuration named by `--config`, else "
        "`$POSTROOM_CONFIG`, else `./postroom.toml`. A command that fails prints "
        "`error (code): message` and exits 1 (2 for a configuration error).", "",
        "| command | what it does |", "|---|---|",
        *(f"| [{cell(code(' '.join(path)))}](#{_anchor(path)}) | "
          f"{cell(prose(cmd.get_short_help_str(limit=120)))} |" for path, cmd, _ in commands),
        "",
    ]
    for path, cmd, sub in commands:
        lines += _command(path, cmd, sub)
    return "\n".join(lines).rstrip() + "\n"


def _walk(cmd: Any, ctx: Any, path: list[str]) -> Iterator[tuple[list[str], Any, Any]]:
    """(path, command, its context) for ``cmd`` and every visible command below it."""
    yield path, cmd, ctx
    for name in _subcommands(cmd, ctx):
        sub = cmd.get_command(ctx, name)
        yield from _walk(sub, typer.Context(sub, info_name=name, parent=ctx), [*path, name])


def _subcommands(cmd: Any, ctx: Any) -> list[str]:
    if not hasattr(cmd, "list_commands"):
        return []
    return [n for n in cmd.list_commands(ctx)
            if (c := cmd.get_command(ctx, n)) is not None and not c.hidden]


def _anchor(path: list[str]) -> str:
    return "-".join(path)


def _command(path: list[str], cmd: Any, ctx: Any) -> list[str]:
    usage = " ".join([*path, *cmd.collect_usage_pieces(ctx)])
    lines = [heading(2 if len(path) < 3 else 3, " ".join(path), _anchor(path)), "",
             "```", usage, "```", ""]
    if cmd.help:
        lines += [paragraphs(cmd.help), ""]
    subs = _subcommands(cmd, ctx)
    if subs:
        lines += ["Subcommands: " + ", ".join(f"[`{n}`](#{_anchor([*path, n])})"
                                              for n in subs) + ".", ""]
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    args = [p for p in params if p.param_type_name == "argument"]
    opts = [p for p in params if p.param_type_name == "option" and p.name != "help"]
    if args:
        lines += ["| argument | what it is |", "|---|---|"]
        lines += [f"| {cell(code(p.metavar or p.name.upper()))} | {cell(_param_help(p, ctx))} |"
                  for p in args]
        lines.append("")
    if opts:
        lines += ["| option | what it does | default |", "|---|---|---|"]
        lines += [f"| {cell(_option_names(p, ctx))} | {cell(_param_help(p, ctx))} | "
                  f"{cell(_default(p, ctx))} |" for p in opts]
        lines.append("")
    return lines


def _param_help(p: Any, ctx: Any) -> str:
    text = getattr(p, "help", None) or ""
    if p.param_type_name == "argument" and not p.required:
        text = f"{text} (optional)".strip()
    return paragraphs(text) or "—"


def _option_names(p: Any, ctx: Any) -> str:
    """"--from TEXT", "-c, --config PATH": the names and the value's placeholder, as
    Click's own help record gives them."""
    record = p.get_help_record(ctx)
    names = record[0] if record else ", ".join([*p.opts, *p.secondary_opts])
    # Typer names a repeatable option's value by its annotation ("<list[str]>"): the value
    # is one item, the help says "(repeat)".
    names = re.sub(r"<list\[(\w+)\]>", lambda m: f"<{m.group(1).lower()}>", names)
    return ", ".join(code(n.strip()) for n in names.split(", "))


def _default(p: Any, ctx: Any) -> str:
    if p.required:
        return "required"
    if p.show_default is False:
        return "—"
    if p.is_flag and p.secondary_opts:
        value = p.get_default(ctx, call=False)
        return code(p.opts[0] if value else p.secondary_opts[0])
    value = p.get_default(ctx, call=False)
    if value is None or callable(value) or value == () or value is False or value == []:
        return "—"
    if value is True and p.is_flag:
        return "on"
    return code(str(value)) if value != "" else '`""`'
