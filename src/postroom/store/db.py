"""Engine set-up (SQLite WAL + fsync-durable commits by default) and schema migrations."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from postroom.exceptions import ConfigError, StoreError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str, *, synchronous: str = "full") -> Engine:
    """Open the database. For SQLite: WAL, synchronous=FULL (every commit is fsync'ed, so a
    message is on disk before we answer 250), a busy timeout for concurrent writers."""
    is_sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        kwargs["pool_size"] = 8
    # Keep non-ASCII addresses readable (and searchable with LIKE) in JSON columns.
    kwargs["json_serializer"] = functools.partial(json.dumps, ensure_ascii=False)
    try:
        engine = create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        raise ConfigError(
            f"server.database = {url!r} cannot be used: {err}; use sqlite:///PATH or "
            "postgresql://USER@HOST/DB",
            code="config.database",
        ) from err
    if is_sqlite:
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
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as err:
        raise StoreError(
            f"cannot open or migrate the database: {err}", code="store.migrate"
        ) from err
