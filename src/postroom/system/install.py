"""`postroom install-service`: the service user, the standard layout
(/etc/postroom/postroom.toml, /var/lib/postroom) and the systemd units, each made only when
missing, so that running it again changes nothing and says so.

With ``--prefix DIR`` every path is under DIR (a throw-away root for tests, a staging root
for packagers) and the system is never touched: the service user and the ownership of the
layout, which cannot be given to a user that does not exist yet, are recorded as a
sysusers.d and a tmpfiles.d file, which systemd applies on the target machine.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.exceptions import InstallError
from postroom.system.steps import Steps, entry_point, require_root, system_tool
from postroom.system.unit import (
    MIN_OPEN_FILES,
    SERVICE_NAME,
    STOP_MARGIN_SEC,
    WORKER_NAME,
    UnitSpec,
    service_unit,
    worker_unit,
)

if TYPE_CHECKING:
    from postroom.settings import Settings

DEFAULT_USER = "postroom"
CONFIG = Path("/etc/postroom/postroom.toml")
DATA_DIR = Path("/var/lib/postroom")
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/usr/lib/sysusers.d/postroom.conf")
TMPFILES = Path("/usr/lib/tmpfiles.d/postroom.conf")
# useradd's own rule for portable names, and systemd's for User=.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
# Where the entry point must not be for ProtectHome=yes: the service could not start it.
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))


def starter_config(data_dir: Path = DATA_DIR) -> str:
    """The commented first-run configuration, with the data directory of the layout."""
    from postroom.bootstrap import CONFIG_TEMPLATE

    return CONFIG_TEMPLATE.replace('# data_dir = "postroom-data"', f'data_dir = "{data_dir}"',
                                   1)


def install_service(steps: Steps, *, user: str = DEFAULT_USER, config: Path = CONFIG,
                    bin_dir: Path | None = None) -> UnitSpec:
    """Make everything missing; the unit description it wrote (or would write)."""
    require_root(steps, "install-service")
    if not _USER_NAME.fullmatch(user):
        raise InstallError(f"--user {user!r}: use lower-case letters, digits, '_' and '-', "
                           "starting with a letter, at most 31", code="install.user")
    if not config.is_absolute():
        raise InstallError(f"--config {config}: give the absolute path the service will read "
                           "(default /etc/postroom/postroom.toml)", code="install.config")
    exe = entry_point("postroom", "install-service", bin_dir)
    _service_user(steps, user)
    _config(steps, config, user)
    settings = _settings(steps, config)
    data_dir = _target_path(steps, settings.data_dir)
    _data_dir(steps, data_dir, user)
    spec = UnitSpec(
        executable=exe, config=config, user=user, data_dir=data_dir,
        open_files=max(MIN_OPEN_FILES, _open_files_needed(settings)),
        low_ports=_low_ports(settings),
        stop_timeout=int(settings.delivery.shutdown_grace) + STOP_MARGIN_SEC,
        protect_home=_protect_home(steps, exe))
    _reachable(steps, exe)
    units = steps.path(UNIT_DIR)
    _replaceable(steps, units / SERVICE_NAME, service_unit(spec))
    _replaceable(steps, units / WORKER_NAME, worker_unit(spec))
    if steps.prefix is not None:
        _record(steps, TMPFILES, (
            f"# Written by `postroom install-service`: the layout's owners and modes.\n"
            f"d {data_dir} 0700 {user} {user} -\n"
            f"z {config.parent} 0750 root {user} -\n"
            f"z {config} 0640 root {user} -\n"))
    return spec


def _service_user(steps: Steps, user: str) -> None:
    """A system user without a login shell, whose home is the data directory."""
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()),
                 "/bin/false")
    if steps.prefix is not None:  # never the real /etc/passwd: systemd-sysusers makes it
        _record(steps, SYSUSERS, (
            "# Written by `postroom install-service`: the service user.\n"
            f'u {user} - "Postroom mail gateway" {DATA_DIR} {shell}\n'))
        return
    if _account(user) is not None:
        steps.already(f"user {user}")
        return
    useradd = system_tool("useradd")
    if useradd is not None:
        steps.run([useradd, "--system", "--user-group", "--home-dir", str(DATA_DIR),
                   "--no-create-home", "--shell", shell, "--comment", "Postroom mail gateway",
                   user])
        return
    adduser = system_tool("adduser")
    if adduser is None:
        raise InstallError(f"neither useradd nor adduser is installed: create the system user "
                           f"{user} yourself, then run this again", code="install.tool")
    steps.run([adduser, "--system", "--group", "--home", str(DATA_DIR), "--no-create-home",
               "--shell", shell, user])


def _config(steps: Steps, config: Path, user: str) -> None:
    """/etc/postroom (0750) and the starter postroom.toml (0640), readable by the service's
    group and written by root only; an existing file is never rewritten."""
    folder, path = steps.path(config.parent), steps.path(config)
    if folder.is_dir():
        steps.already(str(folder))
    else:
        steps.do(f"create {folder} (0750, root:{user})",
                 lambda: _make_dir(folder, 0o750, _owner(steps, user), group_only=True))
    if path.exists():
        steps.already(f"{path} (kept as it is)")
        _group_can_read(steps, path, user)
        return
    steps.do(f"create {path} (a commented starter, data_dir {DATA_DIR}; 0640, root:{user})",
             lambda: _write(path, starter_config(), 0o640, _owner(steps, user),
                            group_only=True))


def _settings(steps: Steps, config: Path) -> Settings:
    """The configuration the service will run with; in a dry run that did not write it yet,
    the starter's."""
    from postroom import settings as settings_mod

    path = steps.path(config)
    if path.exists():  # the service's environment, not this shell's POSTROOM_* variables
        return settings_mod.load(path, environ={})
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "postroom.toml"
        staged.write_text(starter_config(), encoding="utf-8")
        return settings_mod.load(staged, environ={})


def _target_path(steps: Steps, here: Path) -> Path:
    """A path of this machine as the target system sees it (outside of the prefix)."""
    if steps.prefix is not None and here.is_relative_to(steps.prefix):
        return Path("/") / here.relative_to(steps.prefix)
    return here


def _data_dir(steps: Steps, data_dir: Path, user: str) -> None:
    """The data directory, 0700, owned by the service user: the only place it writes."""
    if data_dir == Path("/"):
        raise InstallError("data_dir is /: give the service a directory of its own, such as "
                           f"{DATA_DIR}", code="install.data_dir")
    path = steps.path(data_dir)
    if path.is_dir():
        steps.already(str(path))
        account = _account(user) if steps.prefix is None else None
        if account is not None and path.stat().st_uid != account.pw_uid:
            # Not changed here: what is inside (a database made by hand, as root) goes too.
            steps.note(f"warning: {path} is not owned by {user}: the service could not write "
                       f"it; `chown -R {user}: {path}` if it is the service's")
        return
    steps.do(f"create {path} (0700, {user})",
             lambda: _make_dir(path, 0o700, _owner(steps, user)))


def _replaceable(steps: Steps, path: Path, text: str) -> None:
    """A file Postroom owns (a unit): written when missing, left when the same, replaced
    when different with the previous one kept beside it."""
    if not path.exists():
        steps.do(f"create {path}", lambda: _write(path, text, 0o644))
        return
    if path.read_text(encoding="utf-8") == text:
        steps.already(str(path))
        return
    backup = path.with_name(path.name + ".bak")

    def replace() -> None:
        shutil.copy2(path, backup)
        _write(path, text, 0o644)

    steps.do(f"update {path} (the previous one kept as {backup.name})", replace)


def _record(steps: Steps, where: Path, text: str) -> None:
    _replaceable(steps, steps.path(where), text)


def _owner(steps: Steps, user: str) -> str | None:
    """Who gets the files made: the service user, but not in a --prefix root, even when a
    user of that name exists here (the tmpfiles.d record gives them on the target)."""
    return None if steps.prefix is not None else user


def _make_dir(path: Path, mode: int, user: str | None, *, group_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if user is not None:
        _chown(path, user, group_only=group_only)


def _write(path: Path, text: str, mode: int, user: str | None = None, *,
           group_only: bool = False) -> None:
    """Whole or not at all: a temporary file beside it, then renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.chmod(mode)  # the umask may have narrowed it
    if user is not None:
        _chown(tmp, user, group_only=group_only)
    tmp.replace(path)


def _chown(path: Path, user: str, *, group_only: bool = False) -> None:
    """Give ``path`` to the service user (or to root with the user's group); nothing for a
    user that does not exist (a dry run's: it is not made)."""
    account = _account(user)
    if account is None or os.geteuid() != 0:
        return
    os.chown(path, 0 if group_only else account.pw_uid, account.pw_gid)


def _group_can_read(steps: Steps, path: Path, user: str) -> None:
    """An existing configuration the service user could not read would fail its start."""
    account = _account(user)
    if account is None or steps.prefix is not None:
        return
    st = path.stat()
    if (st.st_uid == account.pw_uid or st.st_mode & stat.S_IROTH
            or (st.st_gid == account.pw_gid and st.st_mode & stat.S_IRGRP)):
        return

    def share() -> None:
        os.chown(path, -1, account.pw_gid)
        path.chmod(stat.S_IMODE(st.st_mode) | 0o040)

    steps.do(f"let {user} read {path} (group {user}, group-readable)", share)


def _account(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _open_files_needed(settings: Settings) -> int:
    from postroom.server import open_files_needed

    return open_files_needed(settings)


def _low_ports(settings: Settings) -> bool:
    """Does a listener need CAP_NET_BIND_SERVICE (a port from 1 to 1023)?"""
    addresses = [settings.smtp_listen, settings.smtps_listen, settings.http_listen]
    if any(name == "metrics" for name, _ in settings.features):
        from postroom.metrics import MetricsSettings

        addresses.append(settings.section(MetricsSettings).address)
    return any(a is not None and 0 < a[1] < 1024 for a in addresses)


def _protect_home(steps: Steps, exe: Path) -> str:
    """ProtectHome=yes hides /home and /root: an installation there needs read-only."""
    if not any(exe.is_relative_to(home) for home in _HOMES):
        return "yes"
    steps.note(f"note: {exe} is in a home folder: the unit says ProtectHome=read-only. An "
               "installation in /opt/postroom is better for a service")
    return "read-only"


def _reachable(steps: Steps, exe: Path) -> None:
    """Warn when a folder on the way to the entry point is closed to other users: the
    service user could not start it."""
    for folder in exe.parents:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            steps.note(f"warning: {folder} is closed to other users (no o+x): the service "
                       f"user cannot start {exe}; `chmod o+x {folder}` or install Postroom "
                       "in /opt/postroom")
            return
