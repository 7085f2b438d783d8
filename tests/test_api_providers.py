"""The HTTPS API providers as one table read from the transports registry
(postroom.diagnostics.api_providers): the manual's generated provider page is current, every API
transport is described (hosts per region for `postroom probe --https`, a sample entry that
builds through transports.create(), which `postroom test` uses), the wizard's way out when
SMTP is blocked, and `postroom test` through an API connection. Local only: the provider is
tests/provider_fake.py's HTTPS stand-in on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import pytest
from provider_cases import mailersend as mailersend_case
from provider_fake import FakeProvider

from postroom import configedit, transports
from postroom.commands import wizard_api
from postroom.diagnostics import api_providers, https, providers
from postroom.exceptions import ConfigError, PostroomError
from postroom.transports._http import HttpTransport
from postroom.transports.base import TransportContext

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "providers.md"


def test_the_manual_provider_page_is_generated_and_current() -> None:
    text = PAGE.read_text("utf-8")
    assert api_providers.START in text and api_providers.END in text
    assert api_providers.updated_readme(text) == text, (
        "docs/reference/providers.md is stale: run `python scripts/docs_gen.py`")
    for p in api_providers.providers():
        assert (f"| `{p.kind}` |" in text) == p.api_key  # OAuth ones have their own sections


def test_every_api_transport_of_the_registry_is_described() -> None:
    described = {p.kind: p for p in api_providers.providers()}
    for kind in transports.kinds():
        if issubclass(transports.transport_class(kind), HttpTransport):
            assert kind in described, kind
    for p in described.values():
        assert p.title and p.docs_url.startswith("https://"), p.kind
        if p.kind != "postal":  # self-hosted: api_base is the user's own
            assert p.hosts, p.kind


@pytest.mark.parametrize("kind", [p.kind for p in api_providers.providers() if p.api_key])
def test_each_sample_entry_builds_through_create(kind: str) -> None:
    """`postroom test NAME` and the worker build a transport with transports.create():
    each provider's README sample must."""
    entry = next(p for p in api_providers.providers() if p.kind == kind).entry()
    cfg = transports.settings_model(kind, "test").model_validate(entry)
    t = transports.create(cfg, TransportContext(ehlo_name="postroom.test"))
    asyncio.run(t.aclose())


def test_probe_checks_every_api_host_of_every_region() -> None:
    hosts = {e.host for e in https.default_endpoints()}
    for p in api_providers.providers():
        assert {h for _, h in p.hosts} <= hosts, p.kind
    assert {"api.zeptomail.eu", "api.zeptomail.com.au", "api.eu.mailgun.net",
            "bulk.api.mailtrap.io", "api.mailersend.com"} <= hosts
    assert {e.host for e in https.OAUTH_ENDPOINTS} <= hosts
    assert {e.host for e in https.ENDPOINTS} == hosts  # the module's name for them, too


def test_the_provider_table_names_the_api_transports() -> None:
    kinds = set(transports.kinds())
    for prov in providers.table():
        assert set(prov.transports) <= kinds, prov.id
    google = providers.by_id("google")
    assert [p.kind for p in api_providers.for_provider(google)] == ["gmail"]
    unknown = [p.kind for p in api_providers.for_provider(None)]
    assert {"mailersend", "mailtrap", "zeptomail", "sendgrid"} <= set(unknown)
    assert "gmail" not in unknown  # OAuth: not offered to a provider it does not serve


# -- the wizard's way out ----------------------------------------------------------------------

class Out:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.lines: list[str] = []

    def say(self, text: str, **kw: Any) -> None:
        self.lines.append(text)

    def done(self, code: int) -> NoReturn:
        raise SystemExit(code)

    def fail(self, err: Any) -> NoReturn:
        raise err


def offer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[int, Out]:
    out = Out()
    monkeypatch.setattr(wizard_api, "reachable_hosts", lambda choices, timeout: {
        "api.mailersend.com": "reachable", "api.sendgrid.com": "timeout"})
    args: dict[str, Any] = {
        "address": "shop@example.com", "provider": None, "cfg_path": tmp_path / "p.toml",
        "kind": None, "settings": {}, "name": None, "interactive": False, "key_env": None,
        "key_stdin": False, "send_test": None, "ehlo_name": "postroom.test", **kw}
    with pytest.raises(SystemExit) as info:
        wizard_api.offer(out, **args)
    return int(str(info.value.code)), out


def test_blocked_smtp_lists_the_apis_and_which_answer(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = offer(tmp_path, monkeypatch)
    assert code == 1 and not (tmp_path / "p.toml").exists()
    listed = {a["kind"]: a for a in out.data["api"]}
    assert listed["mailersend"]["hosts"][0]["reach"] == "reachable"
    assert listed["sendgrid"]["hosts"][0]["reach"] == "timeout"
    assert any("--api mailersend --password-env" in line for line in out.lines)


def test_the_wizard_saves_an_api_connection_with_the_key_encrypted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = mailersend_case.CASE
    cfg = tmp_path / "postroom.toml"
    with FakeProvider(case, tmp_path / "fake").running() as fake:
        monkeypatch.setenv("WIZ_KEY", mailersend_case.KEY)
        code, out = offer(tmp_path, monkeypatch, cfg_path=cfg, kind="mailersend",
                          settings={"api_base": fake.url, "ca_file": fake.ca_file},
                          key_env="WIZ_KEY")
        checked = [r.path for r in fake.requests]
    assert code == 0, out.lines
    assert checked == ["/api-quota"] and out.data["login"] == "ok"  # checked, nothing sent
    conn = tomllib.loads(cfg.read_text())["connections"][0]
    assert conn["transport"] == "mailersend" and "api_key" not in conn
    assert mailersend_case.KEY not in cfg.read_text()
    from postroom import settings as settings_mod
    from postroom.runtime import Instance

    inst = Instance(settings_mod.load(cfg))
    try:
        assert inst.secrets.get("connection:mailersend:api_key") == mailersend_case.KEY
    finally:
        inst.close()


def test_a_refused_key_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = mailersend_case.CASE
    cfg = tmp_path / "postroom.toml"
    with FakeProvider(case, tmp_path / "fake").running() as fake:
        monkeypatch.setenv("WIZ_KEY", "wrong")
        code, out = offer(tmp_path, monkeypatch, cfg_path=cfg, kind="mailersend",
                          settings={"api_base": fake.url, "ca_file": fake.ca_file},
                          key_env="WIZ_KEY")
    assert code == 1 and not cfg.exists()
    assert out.data["login"]["code"] == "auth.api_key_refused"


def test_a_required_setting_is_asked_for_by_its_flag(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        offer(tmp_path, monkeypatch, kind="mailgun", key_env="WIZ_KEY")
    assert "--setting domain=VALUE" in info.value.message
    assert wizard_api.parse_settings(["region=eu", "inbox_id=42"]) == {"region": "eu",
                                                                      "inbox_id": 42}
    with pytest.raises(ConfigError):
        wizard_api.parse_settings(["region"])


# -- `postroom test NAME` through an API connection ---------------------------------------------

def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args,
                           "--config", str(tmp_path / "postroom.toml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**env, "COLUMNS": "200"})


def test_postroom_test_sends_through_an_api_connection(tmp_path: Path) -> None:
    case = mailersend_case.CASE
    with FakeProvider(case, tmp_path / "fake").running() as fake:
        configedit.append_connection(tmp_path / "postroom.toml", {
            "name": "api", "transport": "mailersend", "api_base": fake.url,
            "ca_file": fake.ca_file, "api_key": mailersend_case.KEY})
        nofrom = cli(tmp_path, "test", "api", "--to", "bob@example.org")
        res = cli(tmp_path, "test", "api", "--to", "bob@example.org", "--from",
                  "shop@example.com")
        sent = fake.sent()
    assert nofrom.returncode != 0 and "--from ADDRESS" in nofrom.stderr + nofrom.stdout
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(sent) == 1 and sent[0].json()["from"]["email"] == "shop@example.com"
    assert mailersend_case.MESSAGE_ID in res.stdout


def test_errors_of_the_section_markers() -> None:
    with pytest.raises(PostroomError):
        api_providers.updated_readme("no markers here")
