"""The Settings page against a real `postroom serve` whose postroom.toml sets one retention
key: retention and policy saved in Chromium take effect (the effective settings every
process loads), the file's key is shown locked and a change to it is refused (page and
JSON); an export with a passphrase, downloaded from the page, imports into a second
instance with its secrets; an export neither encrypted nor explicitly without secrets is
refused; a viewer changes and exports nothing.
"""

from __future__ import annotations

import json
import re
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_browser import (
    ADMIN,
    VIEWER,
    AdminServer,
    admin_token,
    assert_clean,
    http,
    instance_from,
    login,
    signed_in,
)

from postroom.audit import Actor
from postroom.ops import apps as app_ops
from postroom.ops import settings as ops
from postroom.runtime import Instance
from postroom.store.dbconfig import Secret, secret_name

PASSPHRASE = "correct horse battery staple"
RELAY_PASSWORD = "relay-password-8c1f"


@pytest.fixture(scope="module")
def admin_config() -> str:
    return ('[retention]\nkeep_rows_days = 60\n'
            '[[connections]]\nname = "cap"\ntransport = "capture"\n')


def token(server: AdminServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token(server)}"}


def other_instance(tmp_path: Path) -> Instance:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\nhostname = "other.test"\n'
                   '[[connections]]\nname = "cap"\ntransport = "capture"\n')
    return instance_from(cfg)


def test_retention_saved_in_the_page_is_in_force_and_the_file_key_locked(
        page: Any, admin_server: AdminServer) -> None:
    login(page, *ADMIN)
    page.goto("/admin/settings")
    locked = page.locator("#retention-keep_rows_days")
    assert locked.is_disabled() and locked.input_value() == "60.0"
    assert "set in postroom.toml" in page.locator("#retention-keep_rows_days-origin").inner_text()
    page.locator("#retention-keep_bodies_days").fill("7")
    page.get_by_role("button", name="Save retention").click()
    assert "Retention saved" in page.locator("[role=status]").inner_text()
    assert "set here" in page.locator("#retention-keep_bodies_days-origin").inner_text()
    assert_clean(page, "settings")
    inst = instance_from(admin_server.proc.config)
    try:
        assert inst.settings.retention.keep_bodies_days == 7
        assert inst.settings.retention.keep_rows_days == 60
    finally:
        inst.close()
    # The file's key, sent anyway: refused, by the page and by the API.
    c, csrf = signed_in(admin_server, *ADMIN)
    with closing(c):
        r = c.post("/admin/settings/retention", data={"csrf": csrf, "keep_rows_days": "5"})
        assert r.status_code == 409 and "defined in postroom.toml" in r.text
        bad = c.post("/admin/settings/retention", data={"csrf": csrf, "interval": "1"})
        assert bad.status_code == 400 and "interval" in bad.text
    with http(admin_server, headers=token(admin_server)) as api:
        r = api.put("/api/v1/admin/settings/retention", json={"keep_rows_days": 5})
        assert r.status_code == 409 and r.json()["error"]["code"] == "config.locked"
        got = api.get("/api/v1/admin/settings/retention").json()
        assert got["origins"]["keep_rows_days"] == "file"
        assert got["stored"] == {"keep_bodies_days": 7.0}


def test_policy_saved_in_the_page(page: Any, admin_server: AdminServer) -> None:
    login(page, *ADMIN)
    page.goto("/admin/settings")
    page.locator("#policy-bcc").fill("audit@example.org")
    page.locator("#policy-headers").fill("X-Env: staging")
    page.locator("#policy-from_mode").select_option("if_missing")
    page.get_by_role("button", name="Save the policy").click()
    assert "Message policy saved" in page.locator("[role=status]").inner_text()
    with http(admin_server, headers=token(admin_server)) as api:
        stored = api.get("/api/v1/admin/settings/policy").json()["stored"]
        assert stored == {"bcc": ["audit@example.org"], "headers": {"X-Env": "staging"},
                          "from_mode": "if_missing"}
    page.locator("#policy-from").fill("not an address")
    page.get_by_role("button", name="Save the policy").click()
    assert "from" in page.locator("#settings-error").inner_text().lower()


def test_export_downloaded_from_the_page_imports_into_another_instance(
        page: Any, admin_server: AdminServer, tmp_path: Path) -> None:
    source = instance_from(admin_server.proc.config)
    try:
        source.config.put_connection(
            {"name": "relay2", "transport": "smtp", "host": "127.0.0.1", "port": 2525,
             "security": "none", "username": "u"}, secret=RELAY_PASSWORD,
            actor=Actor.cli(), settings=source.file_settings)
        app_ops.add_app(source, Actor.cli(), "newsletter", senders=["example.org"])
    finally:
        source.close()
    login(page, *ADMIN)
    page.goto("/admin/settings")
    page.get_by_label("Passphrase for the secrets").fill(PASSPHRASE)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download the export").click()
    download = info.value
    assert re.fullmatch(r"postroom-config-\d{8}-\d{6}\.json", download.suggested_filename)
    text = Path(download.path()).read_text()
    assert RELAY_PASSWORD not in text  # encrypted, never plaintext
    target = other_instance(tmp_path)
    try:
        report = ops.import_(target, Actor.cli(), text, passphrase=PASSPHRASE)
        assert "connection relay2" in report.imported
        assert target.secrets.get(secret_name("relay2", Secret.PASSWORD)) == RELAY_PASSWORD
        assert set(report.app_secrets) == {"newsletter"}
        made = target.apps.api_key("newsletter", report.app_secrets["newsletter"])
        assert target.apps.verify_api_key(made) == "newsletter"
        assert target.config.retention() == {"keep_bodies_days": 7.0, "keep_rows_days": 60.0}
        with pytest.raises(Exception, match="passphrase"):
            ops.import_(target, Actor.cli(), text, passphrase="wrong passphrase!")
    finally:
        target.close()


def test_import_pasted_in_the_page_shows_what_came_in_and_new_secrets(
        page: Any, admin_server: AdminServer, tmp_path: Path) -> None:
    other = other_instance(tmp_path)
    try:
        app_ops.add_app(other, Actor.cli(), "letters")
        other.config.set_retention({"keep_rows_days": 10, "interval": 600}, actor=Actor.cli(),
                                   settings=other.file_settings)
        doc = ops.export(other, Actor.cli(), passphrase=PASSPHRASE, without_secrets=False)
    finally:
        other.close()
    login(page, *ADMIN)
    page.goto("/admin/settings")
    page.get_by_label("The export's text").fill(json.dumps(doc))
    page.get_by_label("Its passphrase").fill(PASSPHRASE)
    page.get_by_role("button", name="Import", exact=True).click()
    report = page.locator("#import-report").inner_text()
    assert "app letters" in report and "interval" in report
    assert "keep_rows_days: postroom.toml or the environment sets it" in report
    secret = page.locator("#new-secret-1").input_value()
    key = page.locator("#new-key-1").input_value()
    assert key == f"letters.{secret}"
    r = httpx.post(f"{admin_server.base}/api/v1/messages", timeout=30,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"from": "a@example.org", "to": "b@example.net", "subject": "s",
                         "text": "t"})
    assert r.status_code == 202, r.text
    assert_clean(page, "settings-import")
    page.get_by_label("The export's text").fill("{not json")
    page.get_by_role("button", name="Import", exact=True).click()
    assert "not a Postroom configuration export" in page.locator("#import-error").inner_text()


def test_an_export_is_encrypted_or_explicitly_without_secrets(
        page: Any, admin_server: AdminServer) -> None:
    login(page, *ADMIN)
    page.goto("/admin/settings")
    page.get_by_role("button", name="Download the export").click()
    assert "never exported in plaintext" in page.locator("#export-error").inner_text()
    page.get_by_label("Passphrase for the secrets").fill("short")
    page.get_by_role("button", name="Download the export").click()
    assert "at least 12" in page.locator("#export-error").inner_text()
    with http(admin_server, headers=token(admin_server)) as api:
        r = api.post("/api/v1/admin/settings/export", json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "config.passphrase"
        r = api.post("/api/v1/admin/settings/export", json={"without_secrets": True})
        assert r.status_code == 200 and r.json()["secrets"] is None
        assert RELAY_PASSWORD not in r.text
        both = api.post("/api/v1/admin/settings/export",
                        json={"without_secrets": True, "passphrase": PASSPHRASE})
        assert both.status_code == 400
        sealed = api.post("/api/v1/admin/settings/export", json={"passphrase": PASSPHRASE})
        imported = api.post("/api/v1/admin/settings/import", json={
            "document": sealed.json(), "passphrase": PASSPHRASE})
        assert imported.status_code == 200, imported.text
        assert any("exists" in s for s in imported.json()["skipped"])
        rows = api.get("/api/v1/admin/audit", params={"action": "config"}).json()["rows"]
        assert {"config.export", "config.import"} <= {r["action"] for r in rows}
        assert RELAY_PASSWORD not in json.dumps(rows) and PASSPHRASE not in json.dumps(rows)


def test_a_viewer_sees_the_settings_but_changes_and_exports_nothing(
        page: Any, admin_server: AdminServer) -> None:
    login(page, *VIEWER)
    page.goto("/admin/settings")
    assert page.locator("#retention-keep_bodies_days").is_disabled()
    assert page.locator("#export-title").count() == 0
    assert page.locator("main button[type=submit]").count() == 0
    assert_clean(page, "settings-viewer")
    c, csrf = signed_in(admin_server, *VIEWER)
    with closing(c):
        for url, data in (("/admin/settings/retention", {"keep_bodies_days": "1"}),
                          ("/admin/settings/policy", {"bcc": "x@example.org"}),
                          ("/admin/settings/export", {"without_secrets": "1"}),
                          ("/admin/settings/import", {"document": "{}"})):
            assert c.post(url, data={"csrf": csrf, **data}).status_code == 403, url
        h = {"X-CSRF-Token": csrf}
        for method, url, body in (
                ("PUT", "/api/v1/admin/settings/retention", {"keep_bodies_days": 1}),
                ("PUT", "/api/v1/admin/settings/policy", {}),
                ("POST", "/api/v1/admin/settings/export", {"without_secrets": True}),
                ("POST", "/api/v1/admin/settings/import", {"document": {}})):
            r = c.request(method, url, json=body, headers=h)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin.role", url
        assert c.get("/api/v1/admin/settings/retention").status_code == 200
