"""Connections, routes and settings stored in the database (postroom.store.dbconfig), their
live reload in running processes (postroom.reload) and `postroom config export|import`
(postroom.config_transfer)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_servers import Sink, enqueue_many, envelopes, start_workers, wait_log
from serve_proc import Postroom, smtp_connection
from sqlalchemy import select

from postroom import audit, settings
from postroom.config_transfer import export_config as export_doc
from postroom.config_transfer import import_config, parse
from postroom.exceptions import ConfigError
from postroom.runtime import Instance
from postroom.store.dbconfig import Origin, effective, key_origins, origin
from postroom.store.schema import config_entries, messages
from postroom.store.schema import secrets as secrets_table

ACTOR = audit.Actor.cli()
PASSWORD = "s3cret-Upstream-Pw"
PASSPHRASE = "correct horse battery staple"
FILE_CONN = ('[[connections]]\nname = "filed"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
             'port = 2599\nsecurity = "none"\n')


def make(root: Path, body: str = "", *, database: str = "") -> Instance:
    root.mkdir(parents=True, exist_ok=True)
    db = f'database = "{database}"\n' if database else ""
    (root / "postroom.toml").write_text(f'[server]\ndata_dir = "data"\n{db}{body}')
    return Instance(settings.load(root / "postroom.toml", environ={}))


def stored_conn(name: str = "mine", port: int = 2600, **extra: Any) -> dict[str, Any]:
    return {"name": name, "transport": "smtp", "host": "127.0.0.1", "port": port,
            "security": "starttls", "username": "me@example.org", **extra}


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    i = make(tmp_path / "a", FILE_CONN + '[policy]\nfrom = "Shop <shop@example.org>"\n')
    yield i
    i.close()


def everything_stored(inst: Instance) -> str:
    """Every stored configuration row and audit row, as text (to look for secrets)."""
    with inst.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(select(config_entries))]
    return json.dumps(rows) + json.dumps(audit.read(inst.engine, limit=1000))


def test_connection_put_edit_delete_with_its_secret(inst: Instance) -> None:
    store = inst.config
    g0 = store.generation()
    store.put_connection(stored_conn(), secret=PASSWORD, actor=ACTOR, settings=inst.settings)
    assert store.generation() == g0 + 1
    eff = effective(inst.settings, inst.engine)
    assert [c.name for c in eff.connections] == ["filed", "mine"]
    assert origin(eff, "mine") is Origin.DATABASE and origin(eff, "filed") is Origin.FILE
    # the transport reads the password where `connection set-password` puts it
    assert inst.secrets.get("connection:mine:password") == PASSWORD
    assert "password" not in store.connections()[0]
    store.put_connection(stored_conn(port=2601), secret=None, actor=ACTOR,
                         settings=inst.settings)
    assert effective(inst.settings, inst.engine).connection("mine").port == 2601  # type: ignore[attr-defined]
    assert inst.secrets.get("connection:mine:password") == PASSWORD  # None kept it
    assert PASSWORD not in everything_stored(inst)
    actions = [r["action"] for r in audit.read(inst.engine)]
    assert actions[:2] == ["connection.edit", "connection.add"]
    assert store.delete_connection("mine", actor=ACTOR, settings=inst.settings)
    assert inst.secrets.get("connection:mine:password") is None
    assert [c.name for c in effective(inst.settings, inst.engine).connections] == ["filed"]
    assert store.generation() == g0 + 3


def test_password_inline_in_the_entry_goes_to_the_secret_store(inst: Instance) -> None:
    inst.config.put_connection(stored_conn(password=PASSWORD), secret=None, actor=ACTOR,
                               settings=inst.settings)
    assert inst.secrets.get("connection:mine:password") == PASSWORD
    assert PASSWORD not in everything_stored(inst)


def test_file_defined_names_and_keys_are_locked(inst: Instance) -> None:
    with pytest.raises(ConfigError, match=r"defined in postroom\.toml"):
        inst.config.put_connection(stored_conn("filed"), secret=None, actor=ACTOR,
                                   settings=inst.settings)
    with pytest.raises(ConfigError, match=r"defined in postroom\.toml"):
        inst.config.delete_connection("filed", actor=ACTOR, settings=inst.settings)
    with pytest.raises(ConfigError, match=r"\[policy\] from is defined in postroom.toml"):
        inst.config.set_policy({"from": "x@example.org"}, actor=ACTOR, settings=inst.settings)
    inst.config.set_policy({"bcc": ["archive@example.org"]}, actor=ACTOR,
                           settings=inst.settings)
    eff = effective(inst.settings, inst.engine)
    assert eff.policy.bcc == ["archive@example.org"]
    assert eff.policy.from_ == "Shop <shop@example.org>"
    where = key_origins(eff, "policy", inst.config.policy(),
                        environ={"POSTROOM_POLICY__CC": '["a@example.org"]'})
    assert (where["from"], where["bcc"], where["cc"], where["to"]) == (
        Origin.FILE, Origin.DATABASE, Origin.ENVIRONMENT, Origin.DEFAULT)
    inst.config.set_retention({"keep_rows_days": 7}, actor=ACTOR, settings=inst.settings)
    assert effective(inst.settings, inst.engine).retention.keep_rows_days == 7


def test_invalid_entries_are_worded_as_the_files(inst: Instance) -> None:
    put = inst.config.put_connection
    with pytest.raises(ConfigError, match=r"connections\.mine\.port = 99999: .*65535"):
        put(stored_conn(port=99999), secret=None, actor=ACTOR, settings=inst.settings)
    with pytest.raises(ConfigError, match=r"connections\.mine\.prot: unknown key; did you "
                       r"mean 'port'\?"):
        put({**stored_conn(), "prot": 1}, secret=None, actor=ACTOR, settings=inst.settings)
    with pytest.raises(ConfigError, match="not a known transport"):
        put(stored_conn(transport="pigeon"), secret=None, actor=ACTOR, settings=inst.settings)
    # a web admin must not make the server read its own files or environment
    for key in ("password_file", "password_env"):
        with pytest.raises(ConfigError, match=f"connections.mine.{key}: .* may not name"):
            put(stored_conn(**{key: "/etc/shadow"}), secret=None, actor=ACTOR,
                settings=inst.settings)
    with pytest.raises(ConfigError, match=r"policy\.bcc = .*malformed address"):
        inst.config.set_policy({"bcc": ["not an address"]}, actor=ACTOR,
                               settings=inst.settings)
    assert inst.config.connections() == []


def test_routes_name_known_connections_and_hold_them(inst: Instance) -> None:
    store = inst.config
    with pytest.raises(ConfigError, match=r"routes\[0\]\.chain names 'mine', which is not"):
        store.put_routes([{"chain": ["mine"]}], actor=ACTOR, settings=inst.settings)
    store.put_connection(stored_conn(), secret=None, actor=ACTOR, settings=inst.settings)
    store.put_routes([{"name": "shop", "match": {"sender_domain": "shop.example"},
                       "chain": ["mine", "filed"]}], actor=ACTOR, settings=inst.settings)
    eff = effective(inst.settings, inst.engine)
    assert [r.chain for r in eff.routes] == [["mine", "filed"]]
    with pytest.raises(ConfigError, match="used by shop"):
        store.delete_connection("mine", actor=ACTOR, settings=inst.settings)
    store.put_routes([], actor=ACTOR, settings=inst.settings)
    assert store.delete_connection("mine", actor=ACTOR, settings=inst.settings)


def test_a_stored_entry_shadowed_by_the_file_is_reported(inst: Instance, tmp_path: Path
                                                         ) -> None:
    inst.config.put_connection(stored_conn("later"), secret=None, actor=ACTOR,
                               settings=inst.settings)
    # the file now defines the same name: the file wins, the stored one is reported
    (tmp_path / "a" / "postroom.toml").write_text(
        (tmp_path / "a" / "postroom.toml").read_text() + FILE_CONN.replace("filed", "later"))
    grown = settings.load(tmp_path / "a" / "postroom.toml", environ={})
    eff = effective(grown, inst.engine)
    assert [c.port for c in eff.connections if c.name == "later"] == [2599]  # type: ignore[attr-defined]
    assert any("'later' is ignored: postroom.toml defines" in p
               for p in inst.config.problems(grown))


# -- export / import -----------------------------------------------------------------------------
def filled(root: Path) -> Instance:
    src = make(root, FILE_CONN + 'password = "' + PASSWORD + '-file"\n')
    src.config.put_connection(stored_conn(), secret=PASSWORD, actor=ACTOR,
                              settings=src.settings)
    src.config.put_routes([{"match": {"app": "shop"}, "chain": ["mine"]}], actor=ACTOR,
                          settings=src.settings)
    src.config.set_policy({"bcc": ["archive@example.org"]}, actor=ACTOR, settings=src.settings)
    src.apps.add("shop", senders=["shop.example"], rate="100/hour")
    return src


def test_export_import_round_trip_with_secrets(tmp_path: Path) -> None:
    src = filled(tmp_path / "src")
    doc = json.loads(json.dumps(export_doc(src, passphrase=PASSPHRASE, actor=ACTOR)))
    text = json.dumps(doc)
    assert doc["format"] == "postroom-config" and PASSWORD not in text
    assert {c["entry"]["name"]: c["origin"] for c in doc["connections"]} == {
        "filed": "file", "mine": "database"}
    dst = make(tmp_path / "dst")  # another key
    report = import_config(dst, parse(text), passphrase=PASSPHRASE, actor=ACTOR)
    assert report.secrets and set(report.app_secrets) == {"shop"}
    eff = effective(dst.settings, dst.engine)
    assert sorted(c.name for c in eff.connections) == ["filed", "mine"]
    assert [r.chain for r in eff.routes] == [["mine"]]
    assert eff.policy.bcc == ["archive@example.org"]
    assert dst.secrets.get("connection:mine:password") == PASSWORD
    assert dst.key_file.read_bytes() != src.key_file.read_bytes()  # under another key
    # the file's inline password came along, into the secret store
    assert dst.secrets.get("connection:filed:password") == PASSWORD + "-file"
    secret = report.app_secrets["shop"]
    assert dst.apps.authenticate("shop", secret) is not None
    assert dst.apps.policy("shop").rate == "100/hour"  # type: ignore[union-attr]
    assert audit.read(dst.engine)[0]["action"] == "config.import"
    assert audit.read(src.engine)[0]["action"] == "config.export"
    assert PASSWORD not in everything_stored(dst)


def test_export_without_secrets_and_refusals(tmp_path: Path) -> None:
    src = filled(tmp_path / "src")
    bare = json.dumps(export_doc(src, passphrase=None, actor=ACTOR))
    assert PASSWORD not in bare and json.loads(bare)["secrets"] is None
    with pytest.raises(ConfigError, match="at least 12"):
        export_doc(src, passphrase="short", actor=ACTOR)
    sealed = json.dumps(export_doc(src, passphrase=PASSPHRASE, actor=ACTOR))
    dst = make(tmp_path / "dst")
    with pytest.raises(ConfigError, match=r"wrong passphrase .* nothing was imported"):
        import_config(dst, parse(sealed), passphrase=PASSPHRASE + "!", actor=ACTOR)
    assert dst.config.connections() == [] and dst.apps.list() == []
    with pytest.raises(ConfigError, match="give its passphrase"):
        import_config(dst, parse(sealed), passphrase=None, actor=ACTOR)
    with pytest.raises(ConfigError, match="not a Postroom configuration export"):
        parse('{"format": "other"}')
    # the target's file defines "mine": that entry is skipped and listed, the rest goes in
    clash = make(tmp_path / "clash", FILE_CONN.replace("filed", "mine"))
    report = import_config(clash, parse(bare), passphrase=None, actor=ACTOR)
    assert any(s.startswith("connection mine: postroom.toml defines") for s in report.skipped)
    assert "connection filed" in report.imported


def test_cli_export_import(tmp_path: Path) -> None:
    src_root, dst_root = tmp_path / "src", tmp_path / "dst"
    filled(src_root).close()
    make(dst_root).close()
    src, dst = Postroom(src_root), Postroom(dst_root)
    for pr, root in ((src, src_root), (dst, dst_root)):
        pr.config = root / "postroom.toml"
    out = tmp_path / "export.json"
    refused = src.cli("config", "export", str(out))
    assert refused.returncode == 2 and b"never written in plaintext" in refused.stderr
    done = src.cli("config", "export", str(out), "--passphrase-stdin",
                   input=PASSPHRASE.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o077 == 0 and PASSWORD.encode() not in out.read_bytes()
    wrong = dst.cli("config", "import", str(out), "--passphrase-stdin", input=b"x" * 20 + b"\n")
    assert wrong.returncode == 2 and b"wrong passphrase" in wrong.stderr
    assert b"Traceback" not in wrong.stderr
    ok = dst.cli("config", "import", str(out), "--passphrase-stdin",
                 input=PASSPHRASE.encode() + b"\n")
    assert ok.returncode == 0, ok.stderr
    assert b"imported connection mine" in ok.stdout and b"NEW secret" in ok.stdout


# -- PostgreSQL ----------------------------------------------------------------------------------
def test_store_on_postgresql(pg_server: Any, tmp_path: Path) -> None:
    inst = make(tmp_path / "pg", FILE_CONN, database=pg_server.new_database())
    try:
        store = inst.config
        store.put_connection(stored_conn(), secret=PASSWORD, actor=ACTOR,
                             settings=inst.settings)
        store.put_routes([{"chain": ["mine"]}], actor=ACTOR, settings=inst.settings)
        store.set_policy({"bcc": ["archive@example.org"]}, actor=ACTOR, settings=inst.settings)
        eff = effective(inst.settings, inst.engine)
        assert [c.name for c in eff.connections] == ["filed", "mine"]
        assert eff.routes[0].chain == ["mine"] and store.generation() == 3
        assert inst.secrets.get("connection:mine:password") == PASSWORD
        with pytest.raises(ConfigError, match="used by route 1"):
            store.delete_connection("mine", actor=ACTOR, settings=inst.settings)
        with inst.engine.connect() as c:
            assert c.execute(select(secrets_table.c.name)).scalars().all() == [
                "connection:mine:password"]
        assert PASSWORD not in everything_stored(inst)
    finally:
        inst.close()


# -- live reload across two processes ------------------------------------------------------------
def test_live_reload_in_serve_and_worker_without_loss(tmp_path: Path) -> None:
    """A `postroom serve` and a `postroom worker` on one SQLite file deliver a stream of
    mail; a third process adds a stored connection and a route to it, edits its port, then
    deletes it. Both processes follow within seconds; no message is lost or sent twice."""
    delivery = "min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.2\n"
    first, added, edited = Sink().start(), Sink().start(), Sink().start()
    pr = Postroom(tmp_path / "serve", connections=smtp_connection(first.port))
    workers: list[Postroom] = []
    stop = threading.Event()
    sent: list[str] = []
    try:
        pr.start()
        url = f"sqlite:///{pr.db}"
        workers = start_workers(tmp_path, 1, database=url, delivery=delivery,
                                connections=smtp_connection(first.port))

        def stream() -> None:
            n = 0
            while not stop.is_set() and n < 2000:
                sent.extend(enqueue_many(url, envelopes(
                    5, lambda i: f"user{i}@example.test", prefix=f"r{n}")))
                n += 5
                time.sleep(0.1)

        feeder = threading.Thread(target=stream, daemon=True)
        feeder.start()
        admin = Instance(settings.load(pr.config, environ={}))
        try:
            assert first.wait_count(5, timeout=30) >= 5
            put = admin.config.put_connection
            put({"name": "db1", "transport": "smtp", "host": "127.0.0.1", "port": added.port,
                 "security": "none"}, secret=None, actor=ACTOR, settings=admin.settings)
            admin.config.put_routes([{"chain": ["db1"]}], actor=ACTOR,
                                    settings=admin.settings)
            for p in (pr, workers[0]):
                wait_log(p, "configuration generation 2 loaded: connections up, db1",
                         timeout=30)
            assert added.wait_count(10, timeout=30) >= 10
            put({"name": "db1", "transport": "smtp", "host": "127.0.0.1",
                 "port": edited.port, "security": "none"}, secret=None, actor=ACTOR,
                settings=admin.settings)
            for p in (pr, workers[0]):
                wait_log(p, "configuration generation 3 loaded", timeout=30)
            assert edited.wait_count(10, timeout=30) >= 10
            admin.config.put_routes([], actor=ACTOR, settings=admin.settings)
            assert admin.config.delete_connection("db1", actor=ACTOR, settings=admin.settings)
            for p in (pr, workers[0]):
                wait_log(p, "configuration generation 5 loaded: connections up\n", timeout=30)
            before = first.count()
            assert first.wait_count(before + 10, timeout=30) >= before + 10
        finally:
            stop.set()
            feeder.join(30)
        deadline = time.monotonic() + 60
        with admin.engine.connect() as c:
            while time.monotonic() < deadline:
                left = c.execute(select(messages.c.id).where(
                    messages.c.status != "sent")).all()
                if not left:
                    break
                time.sleep(0.5)
                c.rollback()
        admin.close()
        assert not left, f"{len(left)} message(s) not sent"
        arrivals = first.per_message_id() + added.per_message_id() + edited.per_message_id()
        assert len(arrivals) == len(sent), "a message was lost"
        assert max(arrivals.values()) == 1, "a message was delivered twice"
        assert added.count() and edited.count()
        for p in (pr, workers[0]):
            assert "Traceback" not in p.log.read_text()
    finally:
        stop.set()
        for p in (pr, *workers):
            p.stop()
        for sink in (first, added, edited):
            sink.stop()


def test_oauth_client_secret_is_stored_encrypted_and_read_by_the_token_manager(
        inst: Instance) -> None:
    from postroom.oauth.tokens import TokenManager
    from postroom.secrets import load_or_create_key

    client = "cs-Client-Secret-123"
    entry = stored_conn("gm", auth="xoauth2", oauth={
        "provider": "google", "client_id": "id.apps.googleusercontent.com",
        "client_secret": client})
    inst.config.put_connection(entry, secret=None, actor=ACTOR, settings=inst.settings)
    eff = effective(inst.settings, inst.engine)
    assert eff.connection("gm").oauth.client_secret_stored  # type: ignore[union-attr]
    tokens = TokenManager(eff, inst.engine, load_or_create_key(inst.key_file))
    assert tokens.secret("gm") == client
    assert client not in everything_stored(inst)
