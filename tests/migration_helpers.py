"""Alembic from a test: move a database to a revision and back, and list its tables (the
down-and-up tests of each migration)."""

from __future__ import annotations

from sqlalchemy import Engine


def tables(engine: Engine) -> set[str]:
    from sqlalchemy import inspect

    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def migrate_to(engine: Engine, revision: str, *, up: bool) -> None:
    """``alembic upgrade|downgrade revision`` on ``engine``, in one write transaction."""
    from alembic import command
    from alembic.config import Config

    from postroom.store.db import MIGRATIONS, write_transaction

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with write_transaction(engine) as conn:
        cfg.attributes["connection"] = conn
        (command.upgrade if up else command.downgrade)(cfg, revision)
