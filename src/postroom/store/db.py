"""Engine set-up (SQLite WAL + fsync-durable commits by default) and schema migrations."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError

from postroom.exceptions import ConfigError, StoreError
from postroom.fsperm import open_private, private_dir
from postroom.store.direct import MIGRATIONS, head_revision, sqlite_path
from postroom.store.direct import WriteLock as WriteLock  # its home: the sqlite3 path uses it

log = logging.getLogger(__name__)


_write_locks: weakref.WeakKeyDictionary[Engine, WriteLock] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` for writes: serialised with every other writer of the same SQLite
    file (see :class:`WriteLock`); PostgreSQL uses row locks and needs nothing extra."""
    lock = _write_locks.get(engine)
    with lock if lock is not None else contextlib.nullcontext(), engine.begin() as conn:
        yield conn


def _driver_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 to us (SQLAlchemy's default would be psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _create_private(path: str, *, plain: bool) -> None:
    """The SQLite file's folder (0700) and, for a plain ``sqlite:///PATH``, the file itself,
    empty and 0600, before SQLite opens it: SQLite would create it 0644 less the umask
    (world-readable under the usual 022), and it creates the -wal and -shm files with the
    database file's mode, so those follow. A file that exists is left as it is."""
    try:
        private_dir(Path(path).parent)
        if plain:
            with contextlib.suppress(FileExistsError), open_private(Path(path), "xb"):
                pass  # an empty file is an empty SQLite database
    except OSError as err:
        # A store this user cannot write is a temporary failure (sendmail exits 75 and keeps
        # the message), as when an existing database is not writable.
        raise StoreError(
            f"cannot create the database file {path}: {err.strerror or err}; create its "
            "folder (mode 700) or point server.database somewhere this user may write",
            code="store.create",
        ) from err


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def make_engine(url: str, *, synchronous: str = "full") -> Engine:
    """Open the database. For SQLite: WAL, synchronous=FULL (every commit is fsync'ed, so a
    message is on disk before we answer 250), a busy timeout for concurrent writers.
    PostgreSQL commits are durable with its defaults (fsync, synchronous_commit on)."""
    is_sqlite = url.startswith("sqlite")
    url = _driver_url(url)
    path = ""
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            _create_private(path, plain=sqlite_path(url) is not None)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        kwargs["pool_size"] = 8
    elif url.startswith("postgresql"):
        kwargs.update(pool_size=10, max_overflow=20,
                      connect_args={"connect_timeout": 10, "application_name": "postroom"})
    # Keep non-ASCII addresses readable (and searchable with LIKE) in JSON columns.
    kwargs["json_serializer"] = functools.partial(json.dumps, ensure_ascii=False)
    try:
        engine = create_engine(url, **kwargs)
    except ImportError as err:
        raise ConfigError(
            f"server.database = {_safe(url)!r} needs a driver that is not installed ({err}); "
            "for PostgreSQL: pip install 'postroom[postgresql]'",
            code="config.database",
        ) from err
    except (SQLAlchemyError, ValueError) as err:
        raise ConfigError(
            f"server.database = {_safe(url)!r} cannot be used: {err}; use sqlite:///PATH or "
            "postgresql://USER@HOST/DB",
            code="config.database",
        ) from err
    if not is_sqlite:
        _ping_when_idle(engine)
    if is_sqlite:
        if path and path != ":memory:":
            _write_locks[engine] = WriteLock(Path(path + ".lock"))
            from postroom.store import inuse

            held = inuse.hold(Path(path))  # `postroom restore` waits for every holder
            if held is not None:
                weakref.finalize(engine, os.close, held)
        mode = "FULL" if synchronous == "full" else "NORMAL"

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={mode}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


PING_AFTER_IDLE = 5.0  # seconds a pooled connection may rest before it is checked


def _ping_when_idle(engine: Engine) -> None:
    """A pooled connection that rested is checked before use: a restarted database must
    not fail deliveries. One in steady use is not: the check is a round trip per
    transaction, and a worker's claims and results are a few transactions a millisecond.
    (If a busy connection breaks, its transaction fails and is retried on a new one.)"""

    @event.listens_for(engine, "checkin")
    def _rested(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        rested = record.info.get("checked_in")  # None: a new connection, fresh anyway
        if rested is None or time.monotonic() - rested < PING_AFTER_IDLE:
            return
        try:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT 1")
            cur.close()
        except Exception as err:  # the pool replaces it and tries again
            raise DisconnectionError(f"stale database connection: {err}") from err


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if found is None else str(found)


def migrate(engine: Engine, *, apart: bool = False) -> None:
    """Bring the schema to the newest revision. Alembic is only imported when needed, which
    keeps start-up fast and idle memory low on an up-to-date database. With ``apart`` (the
    long-running processes), a database that needs migrating is migrated by a child process
    (postroom.apart), so that this one never imports alembic at all.

    Under the lock (SQLite: the write lock every writer takes; PostgreSQL: an advisory lock)
    the revision is read again, so of processes starting together one migrates and the
    others find nothing to do; a database of a newer Postroom is refused, and an SQLite one
    is copied before it is migrated (postroom.store.upgrade)."""
    url = engine.url
    file = (Path(url.database) if engine.dialect.name == "sqlite"
            and url.database not in (None, "", ":memory:") else None)
    where = str(file) if file is not None else _safe(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            current = _revision(conn)
        if current == head_revision():
            return
        from postroom.store import upgrade

        upgrade.refuse_unknown(current, where, file)
        # A child opens the same database by its URL (an in-memory one it could not).
        if apart and url.database not in (None, "", ":memory:"):
            from postroom import apart as child

            if child.available():
                child.run("migrate", {"url": url.render_as_string(hide_password=False)})
                return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with write_transaction(engine) as conn:
            if is_postgresql(engine):
                # Several processes may start at once against one database: one migrates,
                # the others wait here, then find nothing left to do.
                conn.execute(text("SELECT pg_advisory_xact_lock(7405311)"))
            current = _revision(conn)
            if current == head_revision():
                return
            upgrade.refuse_unknown(current, where, file)
            if current is not None and file is not None:
                log.info("copied %s to %s before migrating it", file,
                         upgrade.backup_before(file, current))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as err:
        raise StoreError(
            f"cannot open or migrate the database: {err}", code="store.migrate"
        ) from err


def migrate_job(args: dict[str, Any]) -> dict[str, Any]:
    """postroom.apart's ``migrate``: open the database at ``args["url"]`` and migrate it."""
    engine = make_engine(str(args["url"]))
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return {}
