"""Commands imported only when they run. `postroom.cli` registers each command of
postroom.commands.registry as a placeholder carrying the registry's help, in its place among
the others (so `postroom --help` lists them, in the same order, without importing them);
`LazyGroup`, the root command group, swaps a placeholder for the real command when it is
run, asked for its own --help, completed by the shell, or introspected
(scripts/docs_gen.py).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import typer
import typer.core
import typer.main

from postroom.commands.registry import COMMANDS, help_of


class _Markdown:
    """Stands in for rich.markdown.Markdown in typer.rich_utils: Typer draws help as
    Markdown only in its "markdown" markup mode, which Postroom does not use; should it
    ever, the real class is imported then."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from rich.markdown import Markdown

        return Markdown(*args, **kwargs)


class _Traceback:
    """Stands in for rich.traceback.Traceback in typer.rich_utils (pretty exceptions,
    disabled in postroom.cli)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from rich.traceback import Traceback

        return Traceback(*args, **kwargs)

    @classmethod
    def from_exception(cls, *args: Any, **kwargs: Any) -> Any:
        from rich.traceback import Traceback

        return Traceback.from_exception(*args, **kwargs)


def import_help_lean() -> None:
    """Import typer.rich_utils, which draws every help page, without the modules it
    imports for Markdown help and tracebacks (with Pygments: over a hundred modules, a
    fifth of `postroom --help`'s time); the output is the same. The stand-ins are in
    sys.modules only while rich_utils is imported: any other importer gets Rich's own."""
    if "typer.rich_utils" in sys.modules:
        return
    stand_ins = {"rich.markdown": ("Markdown", _Markdown),
                 "rich.traceback": ("Traceback", _Traceback)}
    placed = []
    for name, (attr, cls) in stand_ins.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            setattr(module, attr, cls)
            sys.modules[name] = module
            placed.append(name)
    try:
        importlib.import_module("typer.rich_utils")
    finally:
        for name in placed:
            del sys.modules[name]


def group(app: typer.Typer, name: str) -> None:
    """Register the registry's command group ``name`` on ``app``, unloaded."""
    app.add_typer(typer.Typer(help=help_of(name)), name=name)


def command(app: typer.Typer, name: str) -> None:
    """Register the registry's command ``name`` on ``app``, unloaded."""
    app.command(name, help=help_of(name))(_unloaded)


def _unloaded() -> None:
    """Never runs: LazyGroup replaces the placeholder before Click invokes it."""


def load(name: str) -> Any:
    """The Click command of ``name``, built as `app.add_typer`/`app.command` would have."""
    module, _, attr = COMMANDS[name].target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    holder = typer.Typer()
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name, help=help_of(name))(obj)
    return typer.main.get_group(holder).commands[name]


class LazyGroup(typer.core.TyperGroup):
    """The root group: placeholders stand in while the group's own help is drawn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listing = False  # True while format_help lists the commands
        self.loaded: set[str] = set()

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if (cmd_name in COMMANDS and cmd_name in self.commands and cmd_name not in self.loaded
                and not self.listing):
            self.commands[cmd_name] = load(cmd_name)
            self.loaded.add(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False

    def shell_complete(self, ctx: Any, incomplete: str) -> Any:
        """`postroom <TAB>`: the names and their help, from the placeholders too (a
        sub-command's own completion, `postroom queue <TAB>`, loads that one alone)."""
        self.listing = True
        try:
            return super().shell_complete(ctx, incomplete)
        finally:
            self.listing = False
