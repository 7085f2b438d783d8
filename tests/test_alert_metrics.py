"""/metrics "alerts sent and failing" (issue 15), on SQLite and PostgreSQL: the sent counter
kept in the database (the same for every process, and not lowered when the outbox is
pruned), the waiting rows new and retrying, the failed rows and the disabled channels, as
Prometheus reads them; none of it without [[alerts]]."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from queue_helpers import T0, run
from sqlalchemy import Engine

from postroom.alerts import Alert, Change
from postroom.alerts import outbox as ob
from postroom.metrics.collect import Collector
from postroom.metrics.expose import render
from postroom.queue.sql import Queue
from postroom.settings import Settings, load
from postroom.store.db import write_transaction

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Figures:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def settings(tmp_path: Path, alerts: bool) -> Settings:
    path = tmp_path / "postroom.toml"
    body = ('[[alerts]]\nname = "ops"\nchannels = ["json://127.0.0.1:1/a", '
            '"json://127.0.0.1:1/b", "json://127.0.0.1:1/c"]\n') if alerts else ""
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{body}', encoding="utf-8")
    return load(path, connections=False)


def alert(i: int) -> Alert:
    return Alert(f"k{i}", "ops", Change.OPENED, "error", "connection_down", "down", "down",
                 T0 + i, "primary")


def scrape(engine: Engine, conf: Settings) -> Figures:
    queue = Queue(engine)
    try:
        return parse(render(Collector(queue, lambda: conf).snapshot()).decode())
    finally:
        run(queue, lambda: asyncio.sleep(0))


def test_alert_figures(engine: Engine, tmp_path: Path) -> None:
    conf = settings(tmp_path, alerts=True)
    assert not [k for k in scrape(engine, settings(tmp_path, alerts=False))
                if k[0].startswith("postroom_alert")]
    with write_transaction(engine) as conn:
        ob.add(conn, [alert(1), alert(2)], ["ops#1", "ops#2", "ops#3"], T0)
    rows = ob.claim_due(engine, T0 + 10)
    by = {(r.channel, r.alert.key): r for r in rows}
    # ops#1: both sent, by two "processes" at once (the counter is one row in the database)
    threads = [threading.Thread(target=ob.sent, args=(engine, by[("ops#1", k)], T0 + 11))
               for k in ("k1", "k2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ob.failed(engine, by[("ops#2", "k1")], "503", T0 + 11, final=False)  # retrying; k2 new
    with write_transaction(engine) as conn:  # ops#3: gone for good
        ob.disable(conn, "ops#3", "answered 404", T0 + 11)
    found = scrape(engine, conf)

    def fig(name: str, **labels: str) -> float | None:
        return found.get((name, frozenset(labels.items())))

    assert fig("postroom_alerts_sent_total", channel="ops#1") == 2
    assert fig("postroom_alerts_sent_total", channel="ops#2") == 0
    assert fig("postroom_alerts_waiting", channel="ops#2", state="retrying") == 1
    assert fig("postroom_alerts_waiting", channel="ops#2", state="new") == 1
    assert fig("postroom_alerts_waiting", channel="ops#1", state="new") == 0
    assert fig("postroom_alerts_failed", channel="ops#3") == 2
    assert fig("postroom_alert_channel_disabled", channel="ops#3") == 1
    assert fig("postroom_alert_channel_disabled", channel="ops#1") == 0
    # the sent rows pruned with the log: the counter stays
    assert ob.prune(engine, T0 + 100) == 4
    again = scrape(engine, conf)
    assert again[("postroom_alerts_sent_total", frozenset({("channel", "ops#1")}))] == 2
    assert again[("postroom_alerts_failed", frozenset({("channel", "ops#3")}))] == 0
