"""A consistent copy of a live SQLite database, for `postroom backup` (postroom.backup) and
the copy made before a migration (postroom.store.upgrade).

SQLite's backup API copies the pages; the source connection holds one read transaction from
before the first page to after the last, so the copy is the database as of one instant.
In WAL mode (always, for Postroom's engine) a reader takes no lock a writer waits for:
`postroom serve` keeps accepting and delivering mail during the whole copy, and the copy
never starts over. (The backup API alone begins a read transaction per step and restarts
the copy whenever another connection wrote in between: under a steady stream of mail a
large database would never finish.) The copy is written in steps of :data:`STEP_PAGES`
pages, set to the self-contained rollback-journal mode, and checked with
``PRAGMA integrity_check`` before it is called good.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from postroom.exceptions import StoreError
from postroom.fsperm import open_private

STEP_PAGES = 1024  # pages copied per step of the backup API (4 MiB at the default page size)


def copy_sqlite(src: Path, dst: Path, *,
                progress: Callable[[int, int], None] | None = None) -> str | None:
    """Copy the database ``src`` to the new file ``dst`` (0600; an existing one is refused)
    and check the copy. Returns the copy's schema revision (None: no Postroom schema yet).
    On any failure ``dst`` is removed and a :class:`StoreError` raised."""
    if not src.is_file():
        raise StoreError(f"there is no database file {src}", code="store.backup.missing")
    try:
        with open_private(dst, "xb"):
            pass  # created 0600 before SQLite writes into it (it would use the umask)
    except OSError as err:
        raise StoreError(f"cannot create {dst}: {err.strerror or err}",
                         code="store.backup.write") from err
    try:
        _copy(src, dst, progress)
        return check(dst)
    except BaseException:
        for leftover in (dst, Path(f"{dst}-journal")):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise


def _copy(src: Path, dst: Path, progress: Callable[[int, int], None] | None) -> None:
    def report(_status: int, remaining: int, total: int) -> None:
        if progress is not None:
            progress(total - remaining, total)

    try:
        with contextlib.closing(sqlite3.connect(src, timeout=30, isolation_level=None)) as s, \
                contextlib.closing(sqlite3.connect(dst, isolation_level=None)) as d:
            s.execute("PRAGMA busy_timeout=30000")
            s.execute("BEGIN")
            s.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot: now
            s.backup(d, pages=STEP_PAGES, progress=report)
            s.execute("COMMIT")
            d.execute("PRAGMA journal_mode=DELETE")  # one file, readable without a -wal
    except sqlite3.Error as err:
        raise StoreError(f"cannot copy the database {src}: {err}",
                         code="store.backup.copy") from err


def check(dst: Path) -> str | None:
    """``PRAGMA integrity_check`` on the copy ``dst``; its schema revision (None: none)."""
    try:
        with contextlib.closing(sqlite3.connect(dst)) as d:
            found = [r[0] for r in d.execute("PRAGMA integrity_check")]
            has_version = d.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                    "name = 'alembic_version'").fetchone()
            revision = (d.execute("SELECT version_num FROM alembic_version").fetchone()
                        if has_version else None)
    except sqlite3.Error as err:
        raise StoreError(f"cannot check the copy {dst}: {err}",
                         code="store.backup.check") from err
    if found != ["ok"]:
        raise StoreError("the copy failed SQLite's integrity check (" + "; ".join(found[:5])
                         + "): the database itself may be damaged; check it with `sqlite3 "
                         "FILE 'PRAGMA integrity_check'` while Postroom is stopped",
                         code="store.backup.integrity")
    return str(revision[0]) if revision else None
