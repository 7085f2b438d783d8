"""The alerts dispatcher's state on SQLite and PostgreSQL: a tick that only moves the cursor
is kept in memory and written every SAVE_EVERY seconds (not a write transaction every 2 s
on a busy queue's database), an alert or incident is written at once, and a state another
node wrote is taken over without alerting twice."""

from __future__ import annotations

import json
from pathlib import Path

from queue_helpers import FakeClock
from sqlalchemy import Engine, select

from postroom import events
from postroom.alerts.dispatcher import SAVE_EVERY, STATE, Dispatcher
from postroom.events import Event, Kind
from postroom.settings import load
from postroom.store.db import write_transaction
from postroom.store.schema import control


def stored_cursor(engine: Engine) -> int:
    with engine.connect() as conn:
        value = conn.execute(select(control.c.value).where(control.c.name == STATE)).scalar()
    return int(json.loads(value)["cursor"]) if value else -1


def write(engine: Engine, kind: Kind, n: int, at: float) -> None:
    with write_transaction(engine) as conn:
        events.record_all(conn, [Event(kind, at, None, "primary", "x") for _ in range(n)])


def test_cursor_saved_every_save_every(engine: Engine, clock: FakeClock,
                                       tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[[alerts]]\n'
                    'channels = ["json://127.0.0.1:1/x"]\nqueue_age = 0\nfailures = 0\n',
                    encoding="utf-8")
    conf = load(path, connections=False)
    d = Dispatcher(engine, lambda: conf, clock=clock)
    other = Dispatcher(engine, lambda: conf, clock=clock)
    assert d.evaluate() == [] and stored_cursor(engine) == 0  # first start: written
    write(engine, Kind.FALLBACK_USED, 30, clock())  # not a default kind: no alert
    clock.advance(2)
    assert d.evaluate() == []
    assert stored_cursor(engine) == 0  # only the cursor moved: kept in memory
    clock.advance(SAVE_EVERY)
    assert d.evaluate() == [] and stored_cursor(engine) == 30
    # an alert is written at once
    write(engine, Kind.FALLBACK_USED, 5, clock())
    clock.advance(2)
    d.evaluate()
    write(engine, Kind.CONNECTION_DOWN, 1, clock())
    clock.advance(2)
    assert [a.kind for a in d.evaluate()] == ["connection_down"]
    assert stored_cursor(engine) == 36
    # another node moves on and alerts: this one takes its state over, no second alert
    write(engine, Kind.CONNECTION_UP, 1, clock())
    clock.advance(2)
    assert [a.change.value for a in other.evaluate()] == ["recovered"]
    assert d.evaluate() == [] and stored_cursor(engine) == 37
