"""Keep a message that could not be handed off, so that an error never loses it.

As mailx and sendmail do, the message is appended to a ``dead.letter`` file, in mbox format
(mboxrd quoting) so that mail readers open it: ``mail -f ~/dead.letter``. Where, first
writable wins: ``[sendmail] dead_letter`` when set, then ``$HOME/dead.letter`` (else the
password file's home), then ``/var/tmp/dead.letter.<uid>``. The last one exists for users
such as www-data, whose home (/var/www) they usually cannot write; /var/tmp survives a
reboot, unlike /tmp (FHS 3.0, 5.15), and the name carries the uid so users never share one.

Files are created 0600, never followed through a symlink (O_NOFOLLOW), must belong to the
user and have a single link, are appended under an exclusive flock and fsync'ed; a failed
write is cut back so that no half entry stays behind.

The configured file is confined (``confine``): the entry holds text the sender chose, so a
configuration that put it in a web root as ``shell.php`` (or ``.htaccess``) would turn a
refused mail into code the web server runs. It must be inside the data folder, or be
``~/dead.letter`` itself, and its name carries no extension but ``.letter`` or ``.mbox``
(Apache's mod_mime acts on every extension of a name, so ``x.php.letter`` is refused too).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.envelope import split_header
from postroom.exceptions import ConfigError, StoreError

if TYPE_CHECKING:
    from postroom.ingress.sendmail_settings import LightSettings
    from postroom.settings import Settings

# mboxrd: every line that reads as a From_ line, however many '>' it already has, gets one
# more; readers take one off again.
_FROM_ = re.compile(rb"^(>*From )", re.MULTILINE)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.letter|\.mbox)?")


def confine(configured: Path, *, data_dir: Path, home: str) -> Path:
    """``configured`` (absolute) when it is a safe place for dead letters, else ConfigError.

    Safe: a file named as ``_SAFE_NAME`` inside ``data_dir``, or ``home``/dead.letter. The
    folder is compared with symlinks resolved (a link inside the data folder must not lead
    out of it); the file itself is opened with O_NOFOLLOW by ``keep``."""
    path = Path(os.path.normpath(configured))
    folder = Path(os.path.realpath(path.parent))
    data = Path(os.path.realpath(data_dir))
    inside = folder == data or data in folder.parents
    own = bool(home) and path == Path(os.path.normpath(Path(home) / "dead.letter"))
    fix = (f"set it to a file inside the data folder, such as "
           f"\"{data / 'dead.letter'}\", or leave it out (~/dead.letter)")
    if not (inside or own):
        raise ConfigError(f"sendmail.dead_letter: {path} is outside the data folder {data} "
                          f"and is not ~/dead.letter; {fix}", code="config.sendmail.dead_letter")
    if not _SAFE_NAME.fullmatch(path.name):
        raise ConfigError(f"sendmail.dead_letter: the name {path.name!r} may be run or served "
                          "as a page by a web server; use letters, digits, '-' and '_' with at "
                          f"most a .letter or .mbox extension; {fix}",
                          code="config.sendmail.dead_letter")
    return path


def configured_file(settings: Settings | LightSettings, environ: Mapping[str, str],
                    home: str) -> Path | None:
    """``[sendmail] dead_letter``, confined; None when it is not set."""
    if settings.sendmail.dead_letter is None:
        return None
    # Relative to the configuration, but not Path.resolve(): that would follow a symlink
    # planted in its place, which the append refuses to do.
    return confine(settings.base_dir / settings.sendmail.dead_letter,
                   data_dir=settings.data_dir, home=environ.get("HOME") or home)


def places(configured: Path | None, environ: Mapping[str, str], home: str, uid: int) -> list[Path]:
    """The dead.letter files to try, in order."""
    paths = [configured] if configured else []
    home_dir = environ.get("HOME") or home
    if home_dir:
        paths.append(Path(home_dir) / "dead.letter")
    paths.append(Path("/var/tmp") / f"dead.letter.{uid}")
    return list(dict.fromkeys(paths))


def mbox_entry(
    raw: bytes, *, sender: str, recipients: Sequence[str], reason: str, now: float | None = None
) -> bytes:
    """One mbox entry: the From_ line, two X-Postroom headers saying for whom the message
    was and why it is here, then the message as it was read (LF line ends)."""
    text = _FROM_.sub(rb">\1", raw.replace(b"\r\n", b"\n"))
    if text and not text.endswith(b"\n"):
        text += b"\n"
    envelope_from = "".join(sender.split()) or "MAILER-DAEMON"
    head = f"From {envelope_from} {time.asctime(time.gmtime(now))}\n"
    if recipients:
        head += f"X-Postroom-Envelope-To: {', '.join(recipients)}\n"
    head += f"X-Postroom-Error: {' '.join(reason.split())}\n"
    fields, _ = split_header(raw)
    if not fields:  # a message without a header: keep its first line out of ours
        head += "\n"
    return head.encode("utf-8", "replace") + text + b"\n"


def _append(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        # In a shared folder (/var/tmp) another user may have planted the name: only a
        # regular file of ours, with no other hard link to it, is appended to.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise PermissionError(errno.EPERM, "not a regular file of this user with one "
                                  "link", str(path))
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)  # no half entry (e.g. the disk filled up)
            raise
    finally:
        os.close(fd)
    try:  # a new file's directory entry must be on disk too
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the entry itself is written and fsync'ed; some filesystems refuse this


def keep(entry: bytes, paths: Sequence[Path]) -> Path:
    """Append ``entry`` to the first of ``paths`` that takes it; return that path."""
    problems = []
    for path in paths:
        try:
            _append(path, entry)
            return path
        except OSError as err:
            problems.append(f"{path}: {err.strerror or err}")
    raise StoreError("no dead.letter file could be written (" + "; ".join(problems) + ")",
                     code="sendmail.dead_letter")
