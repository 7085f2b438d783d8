"""Feature sections in the stored configuration (postroom.store.dbfeatures): ``[[alerts]]``
stored with its channel URLs and webhook key encrypted apart, laid over postroom.toml (the
file's section wins whole), refused when it names an environment variable or a file, and
moved by `postroom config export|import` without a secret in clear."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from postroom import audit, settings
from postroom.alerts.config import AlertsSettings
from postroom.config_transfer import export_config, import_config, parse
from postroom.exceptions import ConfigError
from postroom.runtime import Instance
from postroom.store.dbconfig import effective
from postroom.store.schema import config_entries, control
from postroom.store.schema import secrets as secrets_table

ACTOR = audit.Actor.cli()
PASSPHRASE = "correct horse battery staple"
TOKEN = "T0kenA/T0kenB/T0kenC"  # an Apprise URL's secret part
HOOK_KEY = "webhook-signing-key-42"
RULES = [{"name": "ops", "channels": [f"slack://{TOKEN}", "webhook+https://ops.example/h"],
          "webhook_secret": HOOK_KEY, "failures": 3, "bounce_rate": 2}]


def make(root: Path, body: str = "") -> Instance:
    root.mkdir(parents=True, exist_ok=True)
    (root / "postroom.toml").write_text(f'[server]\ndata_dir = "data"\n{body}')
    return Instance(settings.load(root / "postroom.toml", environ={}))


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    i = make(tmp_path / "a")
    yield i
    i.close()


def stored_text(inst: Instance) -> str:
    """Every stored configuration row, secret row and audit row, as text."""
    with inst.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(select(config_entries))]
        rows += [dict(r._mapping) for r in c.execute(select(secrets_table))]
    return json.dumps(rows, default=str) + json.dumps(audit.read(inst.engine, limit=1000))


def rules_of(s: settings.Settings) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in s.section(AlertsSettings).rules]


def test_alerts_stored_with_secrets_apart(inst: Instance) -> None:
    store = inst.config
    g0 = store.generation()
    store.put_feature("alerts", RULES, actor=ACTOR, settings=inst.settings)
    assert store.generation() == g0 + 1
    (rule,) = effective(inst.settings, inst.engine).section(AlertsSettings).rules
    assert rule.channels == RULES[0]["channels"] and rule.webhook_secret == HOOK_KEY
    assert (rule.failures, rule.bounce_rate) == (3, 2)
    assert store.feature("alerts") == [{"name": "ops", "failures": 3, "bounce_rate": 2}]
    text = stored_text(inst)
    assert TOKEN not in text and HOOK_KEY not in text and "ops.example" not in text
    assert store.problems(inst.settings) == []
    # a new instance on the same data starts with the stored rules (the alerts chore runs)
    again = make(Path(inst.settings.base_dir))
    try:
        assert "alerts" in dict(again.settings.features)
        assert rules_of(again.settings) == rules_of(effective(inst.settings, inst.engine))
    finally:
        again.close()
    assert store.delete_feature("alerts", actor=ACTOR)
    assert effective(inst.settings, inst.engine).section(AlertsSettings).rules == []
    with inst.engine.connect() as c:
        assert c.execute(select(secrets_table)).all() == []
    assert not store.delete_feature("alerts", actor=ACTOR)


@pytest.mark.parametrize(("rules", "words"), [
    ([{**RULES[0], "webhook_secret": None, "webhook_secret_env": "HOME"}],
     "may not name an environment variable"),
    ([{"channels": ["nope"]}], "is not a URL"),
    ([{"channels": ["a://b"], "failures": -1}], "failures"),
])
def test_stored_alerts_refused(inst: Instance, rules: list[dict[str, Any]],
                               words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        inst.config.put_feature("alerts", rules, actor=ACTOR, settings=inst.settings)
    with pytest.raises(ConfigError, match="cannot be stored"):
        inst.config.put_feature("metrics", {}, actor=ACTOR, settings=inst.settings)


def test_the_file_wins(tmp_path: Path) -> None:
    inst = make(tmp_path / "b")
    try:
        inst.config.put_feature("alerts", RULES, actor=ACTOR, settings=inst.settings)
    finally:
        inst.close()
    filed = make(tmp_path / "b", '[[alerts]]\nname = "mine"\nchannels = ["ntfy://n/t"]\n')
    try:
        assert [r.name for r in filed.settings.section(AlertsSettings).rules] == ["mine"]
        assert any("stored [alerts] is ignored" in p
                   for p in filed.config.problems(filed.settings))
        with pytest.raises(ConfigError, match=r"defined in postroom\.toml"):
            filed.config.put_feature("alerts", RULES, actor=ACTOR, settings=filed.settings)
    finally:
        filed.close()


def test_export_import_keeps_secrets_sealed(inst: Instance, tmp_path: Path) -> None:
    inst.config.put_feature("alerts", RULES, actor=ACTOR, settings=inst.settings)
    bare = json.dumps(export_config(inst, passphrase=None, actor=ACTOR))
    sealed = json.dumps(export_config(inst, passphrase=PASSPHRASE, actor=ACTOR))
    for text in (bare, sealed):
        assert TOKEN not in text and HOOK_KEY not in text and "ops.example" not in text
    assert [f["section"] for f in parse(bare)["features"]] == ["alerts"]
    dst = make(tmp_path / "dst")
    try:
        report = import_config(dst, parse(sealed), passphrase=PASSPHRASE, actor=ACTOR)
        assert "[alerts]" in report.imported
        assert rules_of(effective(dst.settings, dst.engine)) == rules_of(
            effective(inst.settings, inst.engine))
        assert TOKEN not in stored_text(dst)
    finally:
        dst.close()
    # without the secrets, a rule with no destination left cannot be stored: said so
    empty = make(tmp_path / "empty")
    try:
        report = import_config(empty, parse(bare), passphrase=None, actor=ACTOR)
        assert [s for s in report.skipped if s.startswith("[alerts]")], report.skipped
        assert effective(empty.settings, empty.engine).section(AlertsSettings).rules == []
    finally:
        empty.close()
    # a target whose postroom.toml has [[alerts]] keeps its own
    filed = make(tmp_path / "filed", '[[alerts]]\nchannels = ["ntfy://n/t"]\n')
    try:
        report = import_config(filed, parse(sealed), passphrase=PASSPHRASE, actor=ACTOR)
        assert "[alerts]: postroom.toml defines it" in report.skipped
    finally:
        filed.close()


def test_file_alerts_exported_marked(tmp_path: Path) -> None:
    filed = make(tmp_path / "f", '[[alerts]]\nchannels = ["ntfy://n/secret-topic"]\n'
                 'webhook_secret_env = "HOOK_KEY"\n')
    try:
        doc = export_config(filed, passphrase=None, actor=ACTOR)
        (entry,) = doc["features"]
        assert entry["origin"] == "file" and entry["entry"][0]["webhook_secret_env"] == "HOOK_KEY"
        assert "secret-topic" not in json.dumps(doc)
        dst = make(tmp_path / "g")
        try:  # it names an environment variable: define it in postroom.toml
            report = import_config(dst, doc, passphrase=None, actor=ACTOR)
            assert any("environment variable" in s for s in report.skipped), report.skipped
        finally:
            dst.close()
    finally:
        filed.close()


def test_rules_stored_while_serving_start_the_alerts_chore(tmp_path: Path) -> None:
    """A server started without [[alerts]] starts its alerts chore when rules are stored
    (no restart): the chore's first tick writes its state row."""
    from serve_proc import Postroom

    def chore_state(i: Instance) -> bool:
        with i.engine.connect() as c:
            return c.execute(select(control.c.name).where(
                control.c.name == "alerts.state")).first() is not None

    with Postroom(tmp_path / "srv") as server:
        inst = Instance(settings.load(server.config, environ={}))
        try:
            time.sleep(3)  # a few of the stored configuration's checks, with no rules
            assert not chore_state(inst)
            inst.config.put_feature("alerts", RULES, actor=ACTOR, settings=inst.settings)
            deadline = time.monotonic() + 60
            while not chore_state(inst):
                assert time.monotonic() < deadline, "no alerts tick after the rules were stored"
                time.sleep(0.2)
            assert "Traceback" not in server.log.read_text()
        finally:
            inst.close()
