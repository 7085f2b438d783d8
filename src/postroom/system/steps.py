"""The actions of `postroom install-service` and `install-sendmail`, said one line each as
they are done, or only said with ``--dry-run``; paths taken under ``--prefix`` when given;
the system tools and Postroom commands they use, found or refused clearly.

Both commands go through here, so that a dry run shows exactly the actions a real run would
take (the same code decides them; only the doing is skipped) and the wording is one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from postroom.exceptions import InstallError

TOOL_TIMEOUT = 120.0  # seconds for useradd, update-alternatives, dpkg-divert (a locked dpkg)


class Steps:
    """Where the system is (``prefix``: a throw-away or staging root, else /) and whether
    to act (``dry_run``). ``say`` receives one line per action."""

    def __init__(self, say: Callable[[str], None], *, prefix: Path | None = None,
                 dry_run: bool = False) -> None:
        self.say = say
        self.prefix = prefix.resolve() if prefix is not None else None
        self.dry_run = dry_run

    def path(self, absolute: str | Path) -> Path:
        """``absolute`` (a path on the target system) where it is on this one."""
        target = Path(absolute)
        if not target.is_absolute():
            raise InstallError(f"{target}: expected an absolute path", code="install.path")
        return self.prefix / target.relative_to("/") if self.prefix is not None else target

    def do(self, what: str, action: Callable[[], object]) -> None:
        """Say ``what`` ("create /etc/postroom") and, unless dry-running, do it."""
        if self.dry_run:
            self.say(f"would {what}")
            return
        try:
            action()
        except OSError as err:
            raise InstallError(f"could not {what}: {err.strerror or err}",
                               code="install.file") from err
        self.say(what)

    def already(self, what: str) -> None:
        self.say(f"already there: {what}")

    def note(self, text: str) -> None:
        self.say(text)

    def run(self, argv: list[str], what: str | None = None) -> None:
        """Run a system tool (useradd, update-alternatives...); its failure, with what it
        printed, is an InstallError."""
        self.do(what or f"run {shlex.join(argv)}", lambda: tool(argv))


def tool(argv: list[str]) -> str:
    """Run ``argv``; its standard output. Failing, or not found: an InstallError."""
    done = _run(argv)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise InstallError(f"{shlex.join(argv)} failed: {said}", code="install.tool")
    return done.stdout


def entry_point(name: str, command: str, bin_dir: Path | None = None) -> Path:
    """The command ``name`` (postroom, postroom-sendmail) of the installation running now:
    beside sys.executable, not resolved (the venv's python is a symlink to the system's)."""
    exe = (bin_dir or Path(sys.executable).parent) / name
    if not os.access(exe, os.X_OK):
        raise InstallError(
            f"no `{name}` command next to this Python ({exe}): run {command} with the "
            "postroom of the installation the system should use (e.g. "
            f"/opt/postroom/bin/postroom {command})", code="install.entry_point")
    return exe.absolute()


def system_tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin folders (which a user's PATH may lack)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ask(argv: list[str]) -> str | None:
    """Run a read-only query (``update-alternatives --query``); its standard output, or
    None when it says no (a non-zero exit: "no alternatives for sendmail")."""
    done = _run(argv)
    return done.stdout if done.returncode == 0 else None


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as err:
        raise InstallError(f"{argv[0]} is not installed", code="install.tool") from err
    except subprocess.TimeoutExpired as err:
        raise InstallError(f"{shlex.join(argv)} did not finish in {TOOL_TIMEOUT:.0f} s",
                           code="install.tool") from err


def require_root(steps: Steps, command: str, euid: int | None = None) -> None:
    """Changing the real system needs root; a dry run or a ``--prefix`` does not."""
    if steps.dry_run or steps.prefix is not None:
        return
    if (os.geteuid() if euid is None else euid) != 0:
        raise InstallError(
            f"`postroom {command}` changes the system and must run as root: "
            f"`sudo postroom {command}`; --dry-run shows what it would do, --prefix DIR "
            "does it inside DIR instead", code="install.not_root")
