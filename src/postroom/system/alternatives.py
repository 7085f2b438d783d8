"""`postroom install-sendmail`: make `postroom-sendmail` the system's /usr/sbin/sendmail,
keeping the one there restorable (``--undo``).

Debian's MTAs (Postfix, Exim, msmtp-mta) install /usr/sbin/sendmail as a plain file or
symlink of their package, not as an alternative. It is first moved aside to
/usr/sbin/sendmail.postroom-orig with a dpkg diversion (so that an upgrade of the MTA
writes its new sendmail there, not over ours), registered as a low-priority alternative,
and Postroom's registered above it: `update-alternatives --display sendmail` shows both.
Without dpkg-divert the file is renamed; without update-alternatives (not Debian) the
link is a plain symlink. ``--undo`` removes our alternative and puts the original back.

Under ``--prefix`` the alternatives and diversion databases are the prefix's own
(--altdir/--admindir/--log, dpkg-divert --root), never the system's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from postroom.exceptions import InstallError
from postroom.system.steps import Steps, ask, entry_point, require_root, system_tool

LINK = Path("/usr/sbin/sendmail")
ORIGINAL = Path("/usr/sbin/sendmail.postroom-orig")
NAME = "sendmail"  # the alternatives group
PRIORITY = 100  # ours, above the original's
ORIGINAL_PRIORITY = 10
PACKAGE = "postroom"  # who the diversion is by


@dataclass(frozen=True)
class Tools:
    """The Debian tools, with the options that point them at the prefix's databases."""

    alternatives: list[str] | None  # update-alternatives and its options; None: symlinks
    divert: list[str] | None  # dpkg-divert and its options; None: rename
    altdir: Path  # where the alternatives' own symlinks are (/etc/alternatives)

    @classmethod
    def find(cls, steps: Steps) -> Tools:
        ua, dd = system_tool("update-alternatives"), system_tool("dpkg-divert")
        altdir = steps.path("/etc/alternatives")
        alternatives = divert = None
        if ua is not None:
            alternatives = [ua]
            if steps.prefix is not None:
                alternatives += ["--altdir", str(altdir),
                                 "--admindir", str(steps.path("/var/lib/dpkg/alternatives")),
                                 "--log", str(steps.path("/var/log/alternatives.log"))]
        if dd is not None:
            divert = [dd, *(["--root", str(steps.prefix)] if steps.prefix else [])]
        return cls(alternatives, divert, altdir)

    def prepare(self, steps: Steps) -> None:
        """A prefix's databases are folders the tools expect to exist."""
        if steps.prefix is None or steps.dry_run:
            return
        folders = ["/usr/sbin", *(["/var/lib/dpkg"] if self.divert else [])]
        if self.alternatives:
            folders += ["/etc/alternatives", "/var/lib/dpkg/alternatives", "/var/log"]
        for folder in folders:
            steps.path(folder).mkdir(parents=True, exist_ok=True)


def install_sendmail(steps: Steps, *, tools: Tools | None = None,
                     bin_dir: Path | None = None) -> None:
    """Point /usr/sbin/sendmail at postroom-sendmail (``tools``: found on this system)."""
    require_root(steps, "install-sendmail")
    program = entry_point("postroom-sendmail", "install-sendmail", bin_dir)
    tools = tools or Tools.find(steps)
    tools.prepare(steps)
    link, original = steps.path(LINK), steps.path(ORIGINAL)
    ua = tools.alternatives
    if ua is None:
        _install_symlink(steps, tools, link, original, program)
        return
    registered = _query(ua, link)
    if registered is not None and registered.value == str(program):
        steps.already(f"{link} is postroom-sendmail ({program})")
        return
    if (link.exists() or link.is_symlink()) and not _is_alternative(tools, link):
        _move_aside(steps, tools, link, original)
        steps.run([*ua, "--install", str(link), NAME, str(original), str(ORIGINAL_PRIORITY)])
    steps.run([*ua, "--install", str(link), NAME, str(program), str(PRIORITY)])
    after = None if steps.dry_run else _query(ua, link)
    if after is not None and after.value != str(program):  # the group is in manual mode
        steps.run([*ua, "--set", NAME, str(program)])
    if steps.dry_run:
        return
    steps.note(f"{link} now runs postroom-sendmail; undo with `postroom install-sendmail "
               "--undo`.\nIt reads /etc/postroom/postroom.toml, which only root and the "
               "service's group may read: set\n[sendmail] server = \"smtp://127.0.0.1:2525\" "
               "there (your smtp_listen) so that root hands mail to the\nrunning server "
               "instead of writing the store; other users need a configuration of their own "
               "(docs/apps/sendmail.md)")


def uninstall_sendmail(steps: Steps, *, tools: Tools | None = None,
                       bin_dir: Path | None = None) -> None:
    """Put back the sendmail there was before ``install_sendmail``."""
    require_root(steps, "install-sendmail --undo")
    program = entry_point("postroom-sendmail", "install-sendmail", bin_dir)
    tools = tools or Tools.find(steps)
    link, original = steps.path(LINK), steps.path(ORIGINAL)
    ua = tools.alternatives
    undone = False
    if ua is None:
        if link.is_symlink() and os.readlink(link) == str(program):
            steps.do(f"remove the link {link}", link.unlink)
            undone = True
    else:
        registered = _query(ua, link)
        for path in (str(program), str(original)):
            if registered is not None and path in registered.alternatives:
                steps.run([*ua, "--remove", NAME, path])
                undone = True
    if _put_back(steps, tools, link, original, undone) or undone:
        return
    steps.note(f"nothing to undo: {link} is not postroom-sendmail")


@dataclass(frozen=True)
class Registered:
    value: str  # what the link points at now
    alternatives: list[str]


def _query(update_alternatives: list[str], link: Path) -> Registered | None:
    """The sendmail group (``--query``), or None when there is none."""
    out = ask([*update_alternatives, "--query", NAME])
    if out is None:
        return None
    value, paths = "", []
    for line in out.splitlines():
        key, _, rest = line.partition(": ")
        if key == "Value":
            value = rest.strip()
        elif key == "Alternative":
            paths.append(rest.strip())
        elif key == "Link" and rest.strip() != str(link):
            raise InstallError(f"the alternatives group {NAME} links {rest.strip()}, not "
                               f"{link}: look at `update-alternatives --display {NAME}`",
                               code="install.alternatives")
    return Registered(value, paths)


def _is_alternative(tools: Tools, link: Path) -> bool:
    return link.is_symlink() and os.readlink(link) == str(tools.altdir / NAME)


def _move_aside(steps: Steps, tools: Tools, link: Path, original: Path) -> None:
    """The MTA's own sendmail to ``original``: diverted (upgrades follow it) or renamed."""
    if original.exists() or original.is_symlink():
        raise InstallError(f"{original} is in the way: it would be overwritten by {link}; "
                           "move it somewhere else first", code="install.in_the_way")
    if tools.divert is not None:
        steps.run([*tools.divert, "--package", PACKAGE, "--rename", "--divert", str(ORIGINAL),
                   "--add", str(LINK)])
        return
    steps.do(f"move {link} to {original}", lambda: link.rename(original))


def _put_back(steps: Steps, tools: Tools, link: Path, original: Path, unlinked: bool) -> bool:
    """The original back in its place, if it was moved aside; whether it was. ``unlinked``:
    the link to us was removed (in a dry run: would have been)."""
    if tools.divert is not None and _diverted_by_us(tools.divert):
        steps.run([*tools.divert, "--package", PACKAGE, "--rename", "--remove", str(LINK)])
        return True
    if not (original.exists() or original.is_symlink()):
        return False
    if (link.exists() or link.is_symlink()) and not (steps.dry_run and unlinked):
        raise InstallError(f"{link} exists: not moving {original} back over it; look at "
                           f"`update-alternatives --display {NAME}`", code="install.in_the_way")
    steps.do(f"move {original} back to {link}", lambda: original.rename(link))
    return True


def _diverted_by_us(dpkg_divert: list[str]) -> bool:
    return (ask([*dpkg_divert, "--listpackage", str(LINK)]) or "").strip() == PACKAGE


def _install_symlink(steps: Steps, tools: Tools, link: Path, original: Path,
                     program: Path) -> None:
    """No alternatives system: a plain symlink, the original moved aside first."""
    if link.is_symlink() and os.readlink(link) == str(program):
        steps.already(f"{link} -> {program}")
        return
    if link.exists() or link.is_symlink():
        _move_aside(steps, tools, link, original)
    steps.do(f"link {link} -> {program}", lambda: link.symlink_to(program))
