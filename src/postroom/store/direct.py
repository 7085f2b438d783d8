"""The SQLite store through the standard library alone, for short-lived commands.

``postroom-sendmail`` starts once per message (PHP's mail(), cron): importing SQLAlchemy
costs it more time than the rest of its work together, for one INSERT. :func:`enqueue`
writes that row with :mod:`sqlite3` under the same rules as the engine of
:mod:`postroom.store.db` (WAL, the configured ``synchronous``, the cross-process
:class:`WriteLock`), and only on a database whose schema is already current. Whenever it
cannot (no database yet, an older schema, PostgreSQL, any error before the row is written)
it returns None and the caller takes the full path, which creates or migrates the store
and reports errors in its usual words.

The row is the one :func:`postroom.store.rows.message_row` builds for the queue too, with
JSON columns serialised as the engine's ``json_serializer`` does (tests/test_sendmail.py
compares what both paths store).
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from postroom.exceptions import StoreError

if TYPE_CHECKING:
    from postroom.envelope import Envelope

MIGRATIONS = Path(__file__).with_name("migrations")

_JSON_COLUMNS = ("recipients", "rcpt_status", "tags", "meta")


class WriteLock:
    """One writer at a time across every process that opens the same SQLite file.

    SQLite's own busy handler makes a waiting writer sleep 1, 2, 5, 10... ms between retries,
    so when `postroom serve` and `postroom worker` share a database most of their time went
    to sleeping (the split benchmark accepted ~600 msg/s instead of ~1,400). A blocking
    ``flock`` wakes the waiter the moment the holder commits. Held around whole write
    transactions, it also means a transaction never has to upgrade a stale read snapshot.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._threads = _thread.allocate_lock()  # threading.Lock, without importing threading

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def head_revision() -> str:
    """The newest migration's revision, from the file names alone (no Alembic import)."""
    versions = sorted(p.stem for p in (MIGRATIONS / "versions").glob("[0-9]*.py"))
    return versions[-1].split("_", 1)[0]


def sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URL, as the engine opens it; None for any other
    database, an in-memory one, or a URL with options (those go through SQLAlchemy)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url.split("///", 1)[-1]
    return path if path and path != ":memory:" else None


def _sql_values(row: dict[str, Any]) -> dict[str, Any]:
    """As the engine binds them: JSON columns through its json_serializer (non-ASCII kept),
    None in a JSON column as the JSON text ``null`` (SQLAlchemy's JSON.none_as_null=False)."""
    return {k: json.dumps(v, ensure_ascii=False) if k in _JSON_COLUMNS else v
            for k, v in row.items()}


def _open(path: str, synchronous: str) -> sqlite3.Connection | None:
    """A connection set up as store.db's engine does, or None when the file is missing, cannot
    be opened for writing, or its schema is not the newest (the full path migrates it)."""
    if not os.path.isfile(path):
        return None
    conn = None
    try:
        # isolation_level=None: transactions are begun and committed explicitly below.
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        found = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        if conn is not None:
            conn.close()
        return None
    if found != [(head_revision(),)]:
        conn.close()
        return None
    return conn


def enqueue(env: Envelope, *, database_url: str, synchronous: str = "full",
            lifetime: float = 5 * 86400) -> str | None:
    """Store the message as ``Queue.enqueue_sync`` does and return its id once the commit is
    on disk; None when this path does not apply and nothing was written (see the module)."""
    path = sqlite_path(database_url)
    if path is None:
        return None
    from postroom.store.rows import message_row

    row = message_row(env, time.time(), lifetime)
    from postroom.store import inuse

    # Held from before the file is opened: `postroom restore` cannot swap the database
    # between our open and our insert (it waits for us, or we for it).
    held = inuse.hold(Path(path))
    conn = _open(path, synchronous)
    if conn is None:
        if held is not None:
            os.close(held)
        return None
    values = _sql_values(row)
    insert = (f"INSERT INTO messages ({', '.join(values)}) "
              f"VALUES ({', '.join(':' + k for k in values)})")
    lock = WriteLock(Path(path + ".lock"))
    try:
        with contextlib.closing(conn), lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(insert, values)
            except sqlite3.Error:
                # Nothing is written: the full path tries again and words any error itself.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                return None
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                raise StoreError(f"database write failed: {err}", code="store.write") from err
    except OSError:
        return None  # the lock file cannot be opened (read-only folder): nothing was written
    finally:
        lock.close()
        if held is not None:
            os.close(held)
    return env.id
