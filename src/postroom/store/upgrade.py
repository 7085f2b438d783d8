"""What makes a schema upgrade safe (postroom.store.db.migrate runs it under its lock).

- A database whose revision this code does not know was written by a newer Postroom: it is
  refused, with both revisions and the way back, before anything touches it (alembic would
  stop with a traceback, and an older Postroom must not write rows a newer schema reads).
- Before an SQLite database with a schema is migrated, a consistent copy of it is made next
  to it, ``postroom.db.before-<its revision>-<UTC time>``: the way back if the new version
  misbehaves (stop Postroom, reinstall the old version, put the copy in place). The newest
  :data:`KEEP` are kept. A new, empty database has nothing worth copying.
"""

from __future__ import annotations

import time
from pathlib import Path

from postroom import __version__
from postroom.exceptions import StoreError
from postroom.store.direct import MIGRATIONS, head_revision
from postroom.store.snapshot import copy_sqlite

KEEP = 3  # copies made before migrations kept next to the database, newest first
_MARK = ".before-"


def known_revisions() -> set[str]:
    """Every revision this code has a migration for, from the file names (as head_revision)."""
    return {p.stem.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("[0-9]*.py")}


def refuse_unknown(current: str | None, where: str, database: Path | None) -> None:
    """Raise unless ``current`` (None: no schema yet) is a revision this code knows.
    ``where`` names the database for people; ``database``: its file, for SQLite."""
    if current is None or current in known_revisions():
        return
    copy = (f", or the copy {database.name}{_MARK}{head_revision()}-<time> next to it, put "
            "in its place while Postroom is stopped" if database is not None else "")
    raise StoreError(
        f"the database {where} has schema revision {current}, which this Postroom "
        f"({__version__}, schema revisions up to {head_revision()}) does not know: a newer "
        "Postroom has upgraded it. Install that newer Postroom again; or, to go back to this "
        f"version, restore the backup taken before the upgrade (`postroom restore FILE`{copy})",
        code="store.newer", permanent=True)


def backup_before(database: Path, revision: str) -> Path:
    """Copy ``database`` (at ``revision``) next to itself and prune the older copies."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = database.with_name(f"{database.name}{_MARK}{revision}-{stamp}")
    n = 1
    while target.exists():  # two migrations within a second (a test, a crash loop)
        n += 1
        target = database.with_name(f"{database.name}{_MARK}{revision}-{stamp}-{n}")
    copy_sqlite(database, target)
    prune(database)
    return target


def copies(database: Path) -> list[Path]:
    """The copies made before migrations, oldest first."""
    found = database.parent.glob(f"{database.name}{_MARK}*")
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime_ns)


def prune(database: Path) -> None:
    for old in copies(database)[:-KEEP]:
        old.unlink(missing_ok=True)
