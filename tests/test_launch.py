"""`postroom serve` and `postroom worker` start without Typer (postroom.launch, issue 19.4).

The long-running processes never import the command-line toolkit: a command line in one
of the forms Click reads the same way starts them directly; any other goes to Typer, so
help, option errors and messages stay Typer's. The server's modules are read from the
process itself (POSTROOM_DEBUG_MODULES, written on SIGUSR1), as in
tests/test_memory_imports.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom
from test_memory_imports import modules_of

from postroom.launch import lean_command

# The toolkit and the modules that exist for it alone.
TOOLKIT = ("typer", "click", "rich", "shellingham", "postroom.cli", "postroom.commands")


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve"], ("serve", None)),
    (["serve", "--config", "a.toml"], ("serve", Path("a.toml"))),
    (["serve", "-c", "a.toml"], ("serve", Path("a.toml"))),
    (["serve", "--config=a b.toml"], ("serve", Path("a b.toml"))),
    (["worker", "-c", "/etc/postroom/postroom.toml"],
     ("worker", Path("/etc/postroom/postroom.toml"))),
    # Typer's: help, other spellings, mistakes, other commands, the root's own options
    (["serve", "--help"], None),
    (["serve", "-ca.toml"], None),
    (["serve", "--config"], None),
    (["serve", "--config", ""], None),
    (["serve", "--config=-x"], None),
    (["serve", "--config", "a.toml", "--config", "b.toml"], None),
    (["serve", "--confg", "a.toml"], None),
    (["serve", "a.toml"], None),
    (["log", "--config", "a.toml"], None),
    (["--version"], None),
    ([], None),
])
def test_which_command_lines_start_without_typer(argv: list[str],
                                                  expected: tuple[str, Path | None] | None
                                                  ) -> None:
    assert lean_command(argv, {}) == expected


def test_a_shell_completion_request_goes_to_typer() -> None:
    assert lean_command(["serve"], {"_POSTROOM_COMPLETE": "bash_complete"}) is None


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_installed_entry_reports_a_bad_configuration_as_typer_did(
        tmp_path: Path, command: str) -> None:
    """The function the `postroom` script runs: `error (code): message`, exit status 2,
    no traceback, nothing created; and no Typer loaded on the way."""
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[sever]\nhostname = "x"\n')
    probe = ("import sys; from postroom.launch import main\n"
             "try:\n    main()\nfinally:\n"
             "    print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('typer', 'click')), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    out = subprocess.run([sys.executable, "-c", probe, command, "--config", str(cfg)],
                         capture_output=True, text=True, env={**env, "COLUMNS": "200"},
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error (config.invalid): unknown section(s) sever"), out.stderr
    assert out.stderr.rstrip().endswith("[]"), out.stderr  # neither typer nor click
    assert not (tmp_path / "postroom-data").exists()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postroom, Path]]:
    root = tmp_path_factory.mktemp("launch")
    dump = root / "modules.txt"
    # `python -m postroom.cli serve --config ...`, as every test starts a server
    server = Postroom(root, env={"POSTROOM_DEBUG_MODULES": str(dump)})
    server.start()
    try:
        yield server, dump
    finally:
        server.stop()


def test_serve_holds_no_command_line_toolkit(served: tuple[Postroom, Path]) -> None:
    modules = modules_of(*served)
    held = sorted(m for m in modules if any(m == t or m.startswith(t + ".") for t in TOOLKIT))
    assert held == []
    assert "postroom.launch" in modules and "postroom.server" in modules


def test_serve_stops_on_sigterm_with_status_0(served: tuple[Postroom, Path]) -> None:
    server, _ = served
    assert server.stop() == 0
    assert "shutting down" in server.log.read_text()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_what_starting_made_is_set_aside_from_the_collector(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """serve and worker freeze their start-up heap (launch.settle_heap) before running, so
    the full collections under load do not walk every module again."""
    import asyncio
    import gc

    from postroom import launch

    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    frozen: list[int] = []

    def run(coro: Any) -> None:
        frozen.append(gc.get_freeze_count())
        coro.close()

    monkeypatch.setattr(asyncio, "run", run)
    monkeypatch.chdir(tmp_path)
    try:
        launch.run(command, cfg)
    finally:
        gc.unfreeze()  # this test process keeps collecting its own garbage
    assert frozen and frozen[0] > 1000
