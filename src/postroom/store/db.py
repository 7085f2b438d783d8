"""Engine set-up (SQLite WAL + fsync-durable commits by default) and schema migrations."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from postroom.exceptions import ConfigError, StoreError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")


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
        self._threads = threading.Lock()

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
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        kwargs["pool_size"] = 8
    elif url.startswith("postgresql"):
        # Connections are checked before use: a restarted database must not fail deliveries.
        kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True,
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
    if is_sqlite:
        if path and path != ":memory:":
            _write_locks[engine] = WriteLock(Path(path + ".lock"))
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


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _head_revision() -> str:
    versions = sorted(p.stem for p in (MIGRATIONS / "versions").glob("[0-9]*.py"))
    return versions[-1].split("_", 1)[0]


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision. Alembic is only imported when needed, which
    keeps start-up fast and idle memory low on an up-to-date database."""
    try:
        with engine.connect() as conn:
            current = None
            if inspect(conn).has_table("alembic_version"):
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if current == _head_revision():
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
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as err:
        raise StoreError(
            f"cannot open or migrate the database: {err}", code="store.migrate"
        ) from err
