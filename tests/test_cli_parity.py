"""The web admin's actions from the command line (issue 17): `postroom log`'s text, tag, app,
source and until filters and its bulk --retry/--resend/--delete (count, --yes, refusal
without a terminal, the audit entry), `postroom connections add|edit|remove`, `postroom
routes`, retention by total size (SQLite and PostgreSQL), shell completion, and the
structured log lines of a real `postroom serve`."""

from __future__ import annotations

import json
import os
import re
import shlex
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import T0, FakeClock, envelope, run
from serve_proc import Postroom
from sqlalchemy import select, update
from typer.testing import CliRunner

from postroom.cli import app
from postroom.queue.retention import retention_sync
from postroom.queue.sql import Queue
from postroom.runtime import Instance
from postroom.settings import load, parse_size
from postroom.store.schema import FAILED, audit, messages

MEM = '[[connections]]\nname = "mem"\ntransport = "memory"\n'
HOST = "127.0.0.1"
DAY_LATER = 86400.0  # retention runs a day after the messages came


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        stdin: str | None = None) -> Any:
    """`postroom ARGS --config CONFIG` in this process; stdin is never a terminal here."""
    result = CliRunner().invoke(app, [*args, "--config", str(config)], env=env, input=stdin)
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\n{MEM}')
    return cfg


def store(config: Path, *items: tuple[str, str, list[str]]) -> list[str]:
    """Queue one message per (subject, status, tags) and put it in that status; its ids."""
    inst = Instance(load(config, environ={}))
    ids = []
    try:
        for subject, status, tags in items:
            env = envelope("someone@example.org", subject=subject)
            env.tags, env.app, env.source = tags, "shop", "api:shop"
            mid = inst.queue.enqueue_sync(env)
            inst.queue.writer.run_sync(lambda c, m=mid, s=status: c.execute(
                update(messages).where(messages.c.id == m).values(
                    status=s, last_error="550 no" if s == FAILED else None)))
            ids.append(mid)
    finally:
        inst.close()
    return ids


def statuses(config: Path) -> dict[str, str]:
    inst = Instance(load(config, environ={}))
    try:
        with inst.engine.connect() as conn:
            return {r.id: r.status for r in conn.execute(select(messages.c.id,
                                                                messages.c.status))}
    finally:
        inst.close()


def audited(config: Path) -> list[tuple[str, str]]:
    inst = Instance(load(config, environ={}))
    try:
        with inst.engine.connect() as conn:
            return [(r.action, r.detail) for r in conn.execute(
                select(audit.c.action, audit.c.detail).order_by(audit.c.id))]
    finally:
        inst.close()


# -- log filters and bulk actions ----------------------------------------------------------------
def test_log_filters_and_bulk_actions(config: Path) -> None:
    inv1, inv2, welcome = store(config, ("Invoice 1", FAILED, ["billing"]),
                                ("Invoice 2", FAILED, []), ("Welcome", "sent", ["signup"]))

    def listed(*args: str) -> set[str]:
        r = cli(config, "log", "--json", *args)
        assert r.exit_code == 0, r.output
        return {json.loads(line)["id"] for line in r.output.splitlines()}

    assert listed("--text", "Invoice") == {inv1, inv2}
    assert listed("--tag", "signup") == {welcome}
    assert listed("--app", "shop", "--source", "api:shop") == {inv1, inv2, welcome}
    assert listed("--until", "2000-01-01") == set()

    # No terminal and no --yes: the count, then a refusal that names the fix; nothing done.
    r = cli(config, "log", "--status", "failed", "--retry")
    assert r.exit_code == 1 and "2 message(s) match" in r.output and "--yes" in r.output
    assert statuses(config)[inv1] == FAILED
    r = cli(config, "log", "--retry", "--yes")
    assert r.exit_code == 1 and "give a filter" in r.output  # never the whole log by default
    r = cli(config, "log", "--retry", "--delete", "--text", "x")
    assert r.exit_code == 1 and "choose one action" in r.output

    r = cli(config, "log", "--status", "failed", "--text", "Invoice", "--retry", "--yes")
    assert r.exit_code == 0, r.output
    assert "2 message(s) match" in r.output and "2 message(s) due again now" in r.output
    assert {statuses(config)[i] for i in (inv1, inv2)} <= {"queued", "deferred"}

    r = cli(config, "log", "--id", welcome, "--resend", "--yes")
    assert r.exit_code == 0 and "1 message(s) copied into the queue" in r.output, r.output
    assert len(statuses(config)) == 4

    r = cli(config, "log", "--tag", "billing", "--delete", "-y")
    assert r.exit_code == 0 and "1 message(s) deleted" in r.output, r.output
    assert inv1 not in statuses(config)

    # Audited as the admin's bulk actions are: one row per run, with the filter or the ids.
    rows = [(a, json.loads(d)) for a, d in audited(config)]
    assert [a for a, _ in rows] == ["message.retry", "message.resend", "message.delete"]
    assert "text=Invoice" in rows[0][1]["filter"] and rows[0][1]["done"] == 2
    assert rows[1][1]["ids"] == [welcome]


# -- connections and routes stored in the database ------------------------------------------------
def test_connections_add_edit_remove_and_routes(config: Path, tmp_path: Path) -> None:
    env = {"RELAY_PW": "s3cret-pw"}
    r = cli(config, "connections", "add", "relay", "--set", "host=smtp.example.test",
            "--set", "port=587", "--set", "security=starttls", "--set", "username=me",
            "--password-env", "RELAY_PW", env=env)
    assert r.exit_code == 0 and "password stored encrypted" in r.output, r.output
    r = cli(config, "connections", "add", "relay", "--set", "host=other.test")
    assert r.exit_code != 0 and "exists already" in r.output
    r = cli(config, "connections", "edit", "relay", "--set", "password=visible")
    assert r.exit_code == 1 and "never given on the command line" in r.output
    r = cli(config, "connections", "edit", "mem", "--set", "port=25")
    assert r.exit_code == 2 and "defined in postroom.toml" in r.output

    r = cli(config, "connections", "edit", "relay", "--set", "port=2525", "--unset", "username")
    assert r.exit_code == 0, r.output
    inst = Instance(load(config, environ={}))
    try:
        from postroom.secrets import Secret, secret_name

        [entry] = inst.config.connections()
        assert entry["port"] == 2525 and "username" not in entry
        assert inst.secrets.get(secret_name("relay", Secret.PASSWORD)) == "s3cret-pw"
    finally:
        inst.close()

    routes = tmp_path / "routes.toml"
    routes.write_text('[[routes]]\nname = "big"\nmatch = { sender = "*@big.example" }\n'
                      'chain = ["relay", "mem"]\n')
    r = cli(config, "routes", "set", str(routes))
    assert r.exit_code == 0 and "1 stored route(s)" in r.output, r.output
    r = cli(config, "routes", "--json")
    assert json.loads(r.output)["stored"][0]["chain"] == ["relay", "mem"]
    assert "big  [database]" in cli(config, "routes").output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": "x", "chain": ["nowhere"]}]')
    r = cli(config, "routes", "set", str(bad))
    assert r.exit_code != 0 and "nowhere" in r.output

    r = cli(config, "connections", "remove", "relay", "--yes")
    assert r.exit_code != 0 and "big" in r.output  # a route still uses it
    assert cli(config, "routes", "set", "-", stdin="[]").exit_code == 0
    r = cli(config, "connections", "remove", "relay")
    assert r.exit_code == 1 and "--yes" in r.output
    r = cli(config, "connections", "remove", "relay", "--yes")
    assert r.exit_code == 0 and "removed" in r.output, r.output
    actions = [a for a, _ in audited(config)]
    assert "connection.add" in actions and "connection.delete" in actions


def test_settings_show_and_set(config: Path) -> None:
    """The admin's Settings page (PUT /settings/retention): stored keys, locked file keys."""
    with config.open("a") as f:
        f.write("[retention]\nkeep_rows_days = 60\n")
    r = cli(config, "settings", "set", "retention", 'max_size="1GB"', "keep_bodies_days=7")
    assert r.exit_code == 0 and "retention.max_size = 1000000000  (database)" in r.output
    r = cli(config, "settings", "set", "retention", "keep_rows_days=5")
    assert r.exit_code == 2 and "defined in postroom.toml" in r.output
    assert cli(config, "settings", "set", "retention", "--unset", "keep_bodies_days"
               ).exit_code == 0
    shown = json.loads(cli(config, "settings", "show", "retention", "--json").output)
    assert shown["retention"]["max_size"] == {"value": 10**9, "origin": "database"}
    assert shown["retention"]["keep_bodies_days"]["origin"] == "default"
    assert shown["retention"]["keep_rows_days"] == {"value": 60.0, "origin": "file"}
    assert [a for a, _ in audited(config)] == ["settings.change"] * 2


# -- retention by total size --------------------------------------------------------------------
def test_max_size_parses() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1500") == 1500
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")


def test_retention_by_size_purges_oldest_finished_bodies(queue: Queue, clock: FakeClock,
                                                         tmp_path: Path) -> None:
    """Over max_size, the oldest finished bodies go first until under; waiting mail stays,
    however old; recent ones stay when the oldest suffice."""
    ids = []
    for i, status in enumerate(("queued", "sent", "failed", "sent", "sent")):
        mid = run(queue, lambda i=i: queue.enqueue(envelope("a@example.org",
                                                            subject=f"m{i}")))
        queue.writer.run_sync(lambda c, m=mid, s=status: c.execute(
            update(messages).where(messages.c.id == m).values(status=s)))
        ids.append(mid)
        clock.advance(60)
    with queue.engine.connect() as conn:
        size = dict(conn.execute(select(messages.c.id, messages.c.size)).all())
    total = sum(size.values())
    # Room for all but the two oldest finished ones (ids[1], ids[2]), give or take a byte.
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "d"\n[retention]\nkeep_bodies_days = 0\n'
                   f'keep_rows_days = 0\nmax_size = "{total - size[ids[1]] - 1}B"\n{MEM}')
    settings = load(cfg, environ={})
    counts = retention_sync(queue, settings, now=T0 + DAY_LATER, force=True)
    assert counts["bodies"] == 2 and counts["messages"] == 0
    with queue.engine.connect() as conn:
        kept = {r.id: r.raw is not None for r in conn.execute(select(messages.c.id,
                                                                     messages.c.raw))}
    assert kept == {ids[0]: True, ids[1]: False, ids[2]: False, ids[3]: True, ids[4]: True}
    again = retention_sync(queue, settings, now=T0 + DAY_LATER, force=True)
    assert again["bodies"] == 0  # under the cap now




# -- shell completion ----------------------------------------------------------------------------
def postroom_bin() -> str:
    return str(Path(sys.executable).with_name("postroom"))


def test_completion_script_and_completions(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    shown = subprocess.run(["bash", "-c", f"{shlex.quote(postroom_bin())} --show-completion"],
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "_POSTROOM_COMPLETE=complete_bash" in shown.stdout
    assert "complete -o default -F _postroom_completion postroom" in shown.stdout

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        out = subprocess.run([postroom_bin()], env={**env, "COMP_WORDS": line,
                                                    "COMP_CWORD": str(len(words) - 1),
                                                    "_POSTROOM_COMPLETE": "complete_bash"},
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.split()

    assert "routes" in complete("postroom ro")
    assert set(complete("postroom connections ")) >= {"add", "edit", "remove", "pause"}
    assert "--resend" in complete("postroom log --re")

    installed = subprocess.run(["bash", "-c", f"{shlex.quote(postroom_bin())} "
                                "--install-completion"], env=env, capture_output=True,
                               text=True, timeout=60, check=True)
    assert "completion installed" in installed.stdout
    assert "postroom" in (tmp_path / ".bashrc").read_text()


# -- structured logs from a real server ---------------------------------------------------------
def _logfmt(line: str) -> dict[str, str]:
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_serve_writes_one_structured_line_per_accepted_and_finished_message(
        fmt: str, tmp_path: Path) -> None:
    pr = Postroom(tmp_path / fmt, connections=MEM, server=f'\n[log]\nformat = "{fmt}"\n')
    pr.start()
    try:
        with smtplib.SMTP(HOST, pr.smtp_port, timeout=30) as s:
            s.sendmail("app@example.org", ["one@example.org", "two@example.org"],
                       b"Subject: structured\r\n\r\nhello\r\n")
        parse = json.loads if fmt == "json" else _logfmt
        deadline = time.monotonic() + 60
        lines: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            lines = [parse(line) for line in pr.log.read_text().splitlines() if line.strip()]
            if any(x.get("event") == "finished" for x in lines):
                break
            time.sleep(0.1)
    finally:
        pr.stop()
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)  # every line parses
    mail = [x for x in lines if x["logger"] == "postroom.mail"]
    assert [x["event"] for x in mail] == ["accepted", "finished"], mail
    accepted, finished = mail
    assert accepted["id"] == finished["id"] and str(finished["recipients"]) == "2"
    assert finished["status"] == "sent" and finished["connection"] == "mem"
    assert accepted["from"] == "app@example.org"
