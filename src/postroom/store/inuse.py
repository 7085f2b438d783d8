"""Whether a SQLite database is open in some process: `postroom restore` must not swap the
file under a running `postroom serve`, worker or command.

Every engine on a SQLite file (postroom.store.db.make_engine) holds a shared ``flock`` on
``<database>.inuse`` for as long as it exists; `postroom restore` takes it exclusively,
without waiting, and is refused while anyone holds it. The kernel drops a process's locks
when it ends, a crash and ``kill -9`` included, so a lock is never left stale (a pid file
would be). A process that starts while a restore runs waits for it, then opens the restored
database. The separate file keeps these long-held locks apart from the short write lock on
``<database>.lock`` (postroom.store.direct.WriteLock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from postroom.exceptions import StoreError


def lock_path(database: Path) -> Path:
    return Path(f"{database}.inuse")


def hold(database: Path) -> int | None:
    """Take the shared lock for this process; its descriptor, to close when the database is
    no longer used. None when the lock file cannot be made (a folder this user may only
    read): such a process could not write into the database anyway."""
    try:
        fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def exclusive(database: Path) -> Iterator[None]:
    """Hold the database for ourselves; a :class:`StoreError` ``store.in_use`` at once when
    a process has it open."""
    try:
        fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise StoreError(f"cannot open {lock_path(database)}: {err.strerror or err}",
                         code="store.in_use") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise StoreError(
                f"the database {database} is open in a running Postroom process (serve, a "
                "worker or a command): stop them first (systemctl stop postroom), then run "
                "this again", code="store.in_use") from err
        yield
    finally:
        os.close(fd)
