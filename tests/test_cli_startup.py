"""The `postroom` command starts with what it runs, nothing more (issue 16, the CLI point).

Start-up time is noisy on a shared box (figures: docs/benchmarks.md); these tests check the
cause instead: which modules a command's process imports. `--help` lists every command from
postroom.commands.registry without importing a command module, SQLAlchemy or pydantic; a
command imports its own module only; and the registry is the one copy of each help text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from postroom.cli import app
from postroom.commands import lazy
from postroom.commands.registry import COMMANDS

HEAVY = ("sqlalchemy", "pydantic", "asyncio")
PROBE = """
import json, sys
from postroom.launch import main  # the installed command's entry
sys.argv = ["postroom", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def imported(*args: str, cwd: Path | None = None) -> set[str]:
    """The modules a `postroom ARGS` process holds when it ends."""
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                         text=True, timeout=120, cwd=cwd)
    return set(json.loads(res.stderr.strip().splitlines()[-1]))


def loaded_commands(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith("postroom.commands.")
                  and m.rsplit(".", 1)[1] not in ("lazy", "registry", "_common", "views"))


def test_help_imports_no_command_module_nor_database_nor_pydantic() -> None:
    modules = imported("--help")
    assert loaded_commands(modules) == []
    for package in HEAVY:
        assert package not in modules, package


def test_a_command_imports_its_own_module_only(tmp_path: Path) -> None:
    modules = imported("queue", "--help", cwd=tmp_path)
    assert loaded_commands(modules) == ["postroom.commands.queue"]
    assert "sqlalchemy" not in modules  # its help needs no database either


def test_log_loads_no_command_module(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text("", encoding="utf-8")
    modules = imported("log", "--limit", "1", "--config", str(cfg), cwd=tmp_path)
    assert "postroom.store.log" in modules  # it did run
    assert loaded_commands(modules) == []
    for absent in ("postroom.transports.base", "postroom.apps", "postroom.ingress.accept"):
        assert absent not in modules, absent


def test_the_root_help_lists_every_registry_command_with_its_help() -> None:
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250"}).output
    for name, entry in COMMANDS.items():
        first_line = entry.help.split("\n")[0]
        assert f" {name} " in out and first_line in out, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_registry_command_loads_with_the_registry_help(name: str) -> None:
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="postroom")
    cmd = root.get_command(ctx, name)  # type: ignore[attr-defined]
    assert cmd is not None and cmd.name == name
    assert cmd.help == COMMANDS[name].help
    assert cmd.params or getattr(cmd, "commands", None), "the real command, not the stand-in"
    # one copy of the text: the module's own function or group carries no other
    module, _, attr = COMMANDS[name].target.partition(":")
    obj = getattr(sys.modules[module], attr)
    assert (obj.info.help if isinstance(obj, typer.Typer) else obj.__doc__) in (
        None, COMMANDS[name].help)


def test_a_loaded_command_runs_through_the_root_group(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text("", encoding="utf-8")
    res = CliRunner().invoke(app, ["events", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "no event recorded yet" in res.output
    assert lazy.load("events").name == "events"


HELP_PAGE = """
import sys
sys.argv = ["postroom", *sys.argv[1:]]
if sys.argv[-1] == "full":
    sys.argv.pop()
    import typer.rich_utils  # with Rich's Markdown and traceback, as Typer imports it
from postroom.cli import main
try:
    main()
except SystemExit:
    pass
"""


@pytest.mark.parametrize("args", [["--help"], ["queue", "list", "--help"], ["log", "--help"]])
def test_help_is_drawn_without_markdown_nor_pygments_and_the_same(args: list[str]) -> None:
    def page(*extra: str) -> str:
        res = subprocess.run([sys.executable, "-c", HELP_PAGE, *args, *extra],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "100"})
        return res.stdout

    assert page() == page("full") and "Usage: postroom" in page()
    modules = imported(*args)
    assert "typer.rich_utils" in modules
    for heavy in ("rich.markdown", "rich.traceback", "pygments", "markdown_it"):
        assert heavy not in modules, heavy
