"""Fixtures and helpers shared by the store/queue test modules: every test that uses the
``engine`` (or ``queue``) fixture runs on SQLite and on PostgreSQL.

Loaded as a plugin by conftest.py; test modules import the plain helpers (FakeClock,
envelope, run...)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine

from postroom.envelope import Envelope
from postroom.message import compose
from postroom.queue.sql import Queue
from postroom.store.db import make_engine, migrate

T = TypeVar("T")
T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every queue test runs on SQLite and on PostgreSQL, except those that look inside the
    SQLite file itself (they ask for ``db_path`` or are marked ``sqlite_only``)."""
    if "backend" in metafunc.fixturenames:
        sqlite_only = ("db_path" in metafunc.fixturenames
                       or metafunc.definition.get_closest_marker("sqlite_only") is not None)
        metafunc.parametrize("backend", ["sqlite"] if sqlite_only else ["sqlite", "postgresql"],
                             indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    if backend == "postgresql":
        url = request.getfixturevalue("pg_server").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    eng = make_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(engine: Engine, clock: FakeClock) -> Queue:
    return Queue(engine, lifetime=5 * 86400, clock=clock)


def run(queue: Queue, fn: Callable[[], Awaitable[T]]) -> T:
    """Run one async scenario on a fresh loop and close the group committer after it."""

    async def main() -> T:
        try:
            return await fn()
        finally:
            await queue.writer.aclose()

    return asyncio.run(main())


def envelope(*rcpts: str, subject: str = "hello", sender: str = "app@example.org") -> Envelope:
    raw = compose(sender=sender, to=list(rcpts), subject=subject, text="body\n")
    return Envelope(sender, list(rcpts), raw, source="test")
