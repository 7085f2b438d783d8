"""The Apps, Accounts, Deliverability and Audit pages against a real `postroom serve`:
clicks in Debian's Chromium for the main flows (an app made in the page sends mail through
the real HTTP API, its rotation and removal lock the old key out; an account and a token made
in the page work, then stop), httpx with a session or an admin API token for the JSON side
and for every refusal of a viewer; the audit page lists each change with no secret in it.
"""

from __future__ import annotations

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
    wait_for,
)
from dns_helpers import dns_server

from postroom.audit import Actor
from postroom.ops import deliverability

SECRETS: list[str] = []  # every secret shown in these tests: none may reach the audit log


@pytest.fixture(scope="module")
def admin_config() -> str:
    return ('[[connections]]\nname = "cap"\ntransport = "capture"\n'
            '[[connections]]\nname = "other"\ntransport = "capture"\n')


def token(server: AdminServer) -> str:
    """A new admin API token; remembered, as a secret the audit log must not hold."""
    made = admin_token(server)
    SECRETS.append(made)
    return made


def send_status(server: AdminServer, api_key: str) -> int:
    """The HTTP API's answer to a message handed in with this app key."""
    r = httpx.post(f"{server.base}/api/v1/messages", timeout=30,
                   headers={"Authorization": f"Bearer {api_key}"},
                   json={"from": "shop@example.org", "to": "alice@example.net",
                         "subject": "from the admin test", "text": "hello"})
    return r.status_code


# -- apps ---------------------------------------------------------------------------------
def test_an_app_made_in_the_page_sends_then_rotate_and_remove_lock_it_out(
        page: Any, admin_server: AdminServer) -> None:
    page.on("dialog", lambda d: d.accept())  # the rotate button's confirmation
    login(page, *ADMIN)
    page.goto("/admin/apps")
    assert_clean(page, "apps-empty")
    page.get_by_label("Name", exact=True).fill("shop")
    page.locator("#new-rate").fill("1000/hour")
    page.get_by_role("button", name="Create the app").click()
    assert "shown only this once" in page.locator("main").inner_text()
    secret = page.locator("#cred-secret").input_value()
    key = page.locator("#cred-key").input_value()
    assert key == f"shop.{secret}"
    SECRETS.extend([secret, key])
    assert_clean(page, "apps-credentials")
    assert send_status(admin_server, key) == 202

    page.goto("/admin/apps")
    assert "1000/hour" in page.locator("#apps-table").inner_text()
    page.get_by_role("button", name="New secret for shop").click()
    new_key = page.locator("#cred-key").input_value()
    SECRETS.extend([new_key, page.locator("#cred-secret").input_value()])
    assert new_key != key
    wait_for(lambda: send_status(admin_server, key) == 401, "the old key refused")
    assert send_status(admin_server, new_key) == 202

    page.goto("/admin/apps")
    page.get_by_role("link", name="Remove shop").click()
    assert_clean(page, "apps-remove")
    page.get_by_role("button", name="Remove shop").click()
    assert "was removed" in page.locator("[role=status]").inner_text()
    wait_for(lambda: send_status(admin_server, new_key) == 401, "the removed app refused")


def test_app_limits_in_the_page_and_their_errors(page: Any, admin_server: AdminServer) -> None:
    login(page, *ADMIN)
    page.goto("/admin/apps")
    page.get_by_label("Name", exact=True).fill("blog")
    page.get_by_role("button", name="Create the app").click()
    SECRETS.append(page.locator("#cred-key").input_value())
    page.goto("/admin/apps")
    page.locator("main details summary").first.click()
    page.locator("#app-1-senders").fill("blog@example.org\nexample.com")
    page.locator("input[name='conn:cap']").first.check()
    page.locator("#app-1-rate").fill("nonsense")
    page.get_by_role("button", name="Save the limits").first.click()
    assert "rate" in page.locator("#apps-error").inner_text().lower()
    page.locator("main details summary").first.click()
    page.locator("#app-1-senders").fill("blog@example.org\nexample.com")
    page.locator("input[name='conn:cap']").first.check()
    page.locator("#app-1-rate").fill("")
    page.get_by_role("button", name="Save the limits").first.click()
    assert "limits of blog were changed" in page.locator("[role=status]").inner_text()
    row = page.locator("#apps-table tr", has_text="blog").inner_text()
    assert "blog@example.org, example.com" in row and "cap" in row
    assert_clean(page, "apps-list")
    # A name taken, a reserved one: the page says why and keeps what was typed.
    page.get_by_label("Name", exact=True).fill("blog")
    page.get_by_role("button", name="Create the app").click()
    assert "exists" in page.locator("#apps-error").inner_text()
    assert page.get_by_label("Name", exact=True).input_value() == "blog"


def test_apps_json(admin_server: AdminServer) -> None:
    h = {"Authorization": f"Bearer {token(admin_server)}"}
    with http(admin_server, headers=h) as c:
        r = c.post("/api/v1/admin/apps", json={"name": "api-app", "senders": ["example.org"],
                                               "connections": ["cap"]})
        assert r.status_code == 201, r.text
        made = r.json()
        SECRETS.extend([made["secret"], made["api_key"]])
        assert send_status(admin_server, made["api_key"]) == 202
        listed = {a["name"]: a for a in c.get("/api/v1/admin/apps").json()}
        assert listed["api-app"]["senders"] == ["example.org"]
        assert "secret" not in listed["api-app"]
        r = c.put("/api/v1/admin/apps/api-app/limits", json={"rate": "5/minute",
                                                            "connections": []})
        assert r.status_code == 200 and r.json()["rate"] == "5/minute"
        assert r.json()["connections"] == [] and r.json()["senders"] == ["example.org"]
        r = c.post("/api/v1/admin/apps/api-app/rotate")
        assert r.status_code == 200
        SECRETS.extend([r.json()["secret"], r.json()["api_key"]])
        bad = c.post("/api/v1/admin/apps", json={"name": "x", "connections": ["nope"]})
        assert bad.status_code == 400 and "no such connection" in bad.json()["error"]["message"]
        dup = c.post("/api/v1/admin/apps", json={"name": "api-app"})
        assert dup.status_code == 409 and dup.json()["error"]["code"] == "app.exists"
        assert c.delete("/api/v1/admin/apps/api-app").status_code == 204
        gone = c.delete("/api/v1/admin/apps/api-app")
        assert gone.status_code == 404 and gone.json()["error"]["fix"]
    doc = httpx.get(f"{admin_server.base}/api/v1/openapi.json", timeout=30).json()
    for path in ("/api/v1/admin/apps", "/api/v1/admin/apps/{name}/rotate",
                 "/api/v1/admin/deliverability", "/api/v1/admin/audit",
                 "/api/v1/admin/accounts", "/api/v1/admin/tokens",
                 "/api/v1/admin/settings/export"):
        assert path in doc["paths"], path


def test_the_cli_uses_the_same_functions_and_is_audited(admin_server: AdminServer) -> None:
    out = admin_server.proc.cli("app", "add", "cli-app", "--connection", "cap")
    assert out.returncode == 0, out.stderr
    SECRETS.extend(re.findall(r"password (\S+)", out.stdout.decode()))
    bad = admin_server.proc.cli("app", "add", "cli-bad", "--connection", "nope")
    assert bad.returncode != 0 and b"no such connection" in bad.stdout + bad.stderr
    h = {"Authorization": f"Bearer {token(admin_server)}"}
    rows = httpx.get(f"{admin_server.base}/api/v1/admin/audit",
                     params={"object": "app:cli-app"}, headers=h, timeout=30).json()["rows"]
    assert [r["action"] for r in rows] == ["app.add"] and rows[0]["actor"].startswith("cli:")


# -- accounts -----------------------------------------------------------------------------
def test_accounts_page_adds_an_account_and_a_token_that_work(
        page: Any, admin_server: AdminServer) -> None:
    page.on("dialog", lambda d: d.accept())
    login(page, *ADMIN)
    page.goto("/admin/accounts")
    page.get_by_label("Account name", exact=True).fill("carol")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Add the account").click()
    password = page.locator("#made-password").input_value()
    SECRETS.append(password)
    assert len(password) >= 12
    assert_clean(page, "accounts")
    carol, _ = signed_in(admin_server, "carol", password)
    assert carol.get("/api/v1/admin/me").json()["role"] == "viewer"

    page.get_by_label("Role of carol").select_option("admin")
    page.get_by_role("button", name="Set role of carol").click()
    assert "role of carol was changed" in page.locator("[role=status]").inner_text()
    assert carol.get("/api/v1/admin/me").json()["role"] == "admin"  # open sessions follow

    page.get_by_label("Acting as the account").select_option("carol")
    page.get_by_label("What it is for").fill("monitoring")
    page.get_by_role("button", name="Create the token").click()
    token = page.locator("#made-token").input_value()
    SECRETS.append(token)
    bearer = {"Authorization": f"Bearer {token}"}
    me = httpx.get(f"{admin_server.base}/api/v1/admin/me", headers=bearer, timeout=30)
    assert me.json() == {"name": "carol", "role": "admin", "kind": "token"}
    token_id = token.split("_")[1]
    page.get_by_role("button", name=f"Revoke {token_id}").click()
    assert httpx.get(f"{admin_server.base}/api/v1/admin/me", headers=bearer,
                     timeout=30).status_code == 401

    page.get_by_role("link", name="Remove carol").click()
    page.get_by_role("button", name="Remove carol").click()
    assert "carol was removed" in page.locator("[role=status]").inner_text()
    assert carol.get("/api/v1/admin/me").status_code == 401
    carol.close()


def test_accounts_json_and_the_last_admin(admin_server: AdminServer) -> None:
    h = {"Authorization": f"Bearer {token(admin_server)}"}
    with http(admin_server, headers=h) as c:
        r = c.post("/api/v1/admin/accounts", json={"name": "dave", "role": "viewer"})
        assert r.status_code == 201 and r.json()["password"]
        SECRETS.append(r.json()["password"])
        names = {a["name"]: a["role"] for a in c.get("/api/v1/admin/accounts").json()}
        assert names["dave"] == "viewer" and names[ADMIN[0]] == "admin"
        assert c.put("/api/v1/admin/accounts/dave/role",
                     json={"role": "admin"}).status_code == 204
        t = c.post("/api/v1/admin/tokens", json={"account": "dave", "label": "x"})
        assert t.status_code == 201
        SECRETS.append(t.json()["token"])
        listed = c.get("/api/v1/admin/tokens", params={"account": "dave"}).json()
        assert [x["label"] for x in listed] == ["x"] and "token" not in listed[0]
        assert c.delete(f"/api/v1/admin/tokens/{listed[0]['id']}").status_code == 204
        assert c.delete(f"/api/v1/admin/tokens/{listed[0]['id']}").status_code == 404
        assert c.delete("/api/v1/admin/accounts/dave").status_code == 204
        weak = c.post("/api/v1/admin/accounts", json={"name": "erin", "password": "short"})
        assert weak.status_code == 400 and "12" in weak.json()["error"]["message"]
        assert c.put(f"/api/v1/admin/accounts/{VIEWER[0]}/role",
                     json={"role": "boss"}).status_code == 422


# -- deliverability -----------------------------------------------------------------------
def test_deliverability_page_for_a_domain_without_dns(page: Any,
                                                      admin_server: AdminServer) -> None:
    login(page, *VIEWER)
    page.goto("/admin/deliverability?domain=nodns.invalid")
    # The check runs in the background; htmx swaps the result in when it is done.
    page.locator("#doctor-summary").wait_for(timeout=90_000)
    text = page.locator("#doctor-result").inner_text()
    assert "nodns.invalid" in text and "neither MX nor address records" in text
    assert "Fix:" in text
    assert page.locator("form[action='/admin/deliverability/dkim']").count() == 0
    assert_clean(page, "deliverability")


def test_deliverability_json_waits_and_refuses_a_bad_domain(admin_server: AdminServer) -> None:
    h = {"Authorization": f"Bearer {token(admin_server)}"}
    with http(admin_server, headers=h) as c:
        r = c.get("/api/v1/admin/deliverability",
                  params={"domain": "other.invalid", "wait": 30})
        assert r.status_code == 200 and r.json()["state"] == "done", r.text
        assert r.json()["report"]["domains"] == ["other.invalid"]
        bad = c.get("/api/v1/admin/deliverability", params={"domain": "not a domain"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "doctor.domain"


def test_doctor_records_to_publish_against_a_local_dns(tmp_path: Path) -> None:
    """The service function against a real DNS server: the SPF record missing the
    provider's include is in the publish list, once, with its zone line."""
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\nhostname = "postroom.test"\n'
                   '[[connections]]\nname = "sg"\ntransport = "smtp"\n'
                   'host = "smtp.sendgrid.net"\nport = 587\nusername = "apikey"\n'
                   'password = "x"\npolicy = { from = "shop@shop.test" }\n')
    inst = instance_from(cfg)
    zone = ('shop.test. IN MX 10 mx.shop.test.\nmx.shop.test. IN A 192.0.2.25\n'
            'shop.test. IN TXT "v=spf1 ip4:192.0.2.0/24 ~all"\n'
            '_dmarc.shop.test. IN TXT "v=DMARC1; p=quarantine"\n')
    checks = deliverability.Checks()
    with dns_server(zone) as dns:
        found = deliverability.check(inst, Actor.cli(), "shop.test", dns_server=dns.address,
                                     wait=60, checks=checks)
    assert found.state is deliverability.State.DONE, found
    spf = [r for r in found.records if r["name"] == "shop.test" and r["type"] == "TXT"]
    assert spf and "include:sendgrid.net" in spf[0]["value"]
    assert spf[0]["zone"].startswith("shop.test. IN TXT ")
    assert len({r["zone"] for r in found.records}) == len(found.records)
    # Cached: the same answer again, without a new run.
    again = deliverability.check(inst, Actor.cli(), "shop.test", dns_server=dns.address,
                                 checks=checks)
    assert again.started_at == found.started_at and again.state is found.state
    inst.close()


def test_dkim_key_made_in_the_page_shows_its_record(page: Any,
                                                    admin_server: AdminServer) -> None:
    login(page, *ADMIN)
    page.goto("/admin/deliverability")
    page.get_by_label("Signing domain").fill("shop.example")
    page.get_by_label("Selector", exact=True).fill("web2026")
    page.get_by_role("button", name="Make the key").click()
    assert "web2026._domainkey.shop.example" in page.locator("#dkim-made").inner_text()
    zone = page.locator("textarea.copy", has_text="web2026").first.input_value()
    assert zone.startswith("web2026._domainkey.shop.example. IN TXT") and "v=DKIM1" in zone
    page.get_by_label("Signing domain").fill("shop.example")
    page.get_by_label("Selector", exact=True).fill("web2026")
    page.get_by_role("button", name="Make the key").click()
    assert "already exists" in page.locator("#dkim-error").inner_text()
    assert_clean(page, "deliverability-dkim")
    out = admin_server.proc.cli("dkim", "show", "--domain", "shop.example",
                                "--selector", "web2026")
    assert out.returncode == 0 and b"v=DKIM1" in out.stdout


# -- refusals -----------------------------------------------------------------------------
def test_a_viewer_sees_no_controls_and_every_change_is_refused(
        page: Any, admin_server: AdminServer) -> None:
    login(page, *VIEWER)
    for url in ("/admin/apps", "/admin/accounts", "/admin/audit"):
        page.goto(url)
        assert page.locator("main form[method=post]").count() == 0, url
    c, csrf = signed_in(admin_server, *VIEWER)
    with closing(c):
        for url in ("/admin/apps", "/admin/apps/blog/rotate", "/admin/apps/blog/limits",
                    "/admin/apps/blog/remove", "/admin/deliverability/dkim", "/admin/accounts",
                    f"/admin/accounts/{ADMIN[0]}/role", f"/admin/accounts/{ADMIN[0]}/remove",
                    "/admin/accounts/tokens", "/admin/accounts/tokens/abc/revoke"):
            r = c.post(url, data={"csrf": csrf, "name": "x", "role": "admin",
                                  "domain": "a.example", "selector": "s", "account": "viewer"})
            assert r.status_code == 403, url
        h = {"X-CSRF-Token": csrf}
        for method, url, body in (
                ("POST", "/api/v1/admin/apps", {"name": "x"}),
                ("POST", "/api/v1/admin/apps/blog/rotate", None),
                ("PUT", "/api/v1/admin/apps/blog/limits", {"rate": "1/hour"}),
                ("DELETE", "/api/v1/admin/apps/blog", None),
                ("POST", "/api/v1/admin/deliverability/dkim",
                 {"domain": "a.example", "selector": "s"}),
                ("POST", "/api/v1/admin/accounts", {"name": "x"}),
                ("DELETE", f"/api/v1/admin/accounts/{ADMIN[0]}", None),
                ("PUT", f"/api/v1/admin/accounts/{VIEWER[0]}/role", {"role": "admin"}),
                ("POST", "/api/v1/admin/tokens", {"account": VIEWER[0]}),
                ("DELETE", "/api/v1/admin/tokens/abc", None)):
            r = c.request(method, url, json=body, headers=h)
            assert r.status_code == 403, (method, url, r.text)
            assert r.json()["error"]["code"] == "admin.role"
        assert c.get("/api/v1/admin/apps").status_code == 200  # reading is allowed
    out = admin_server.proc.cli("app", "list")
    assert b"blog" in out.stdout  # nothing was changed


# -- the audit log (last: it lists what the tests above did) ------------------------------
def test_audit_page_lists_each_action_without_a_secret(page: Any,
                                                       admin_server: AdminServer) -> None:
    login(page, *VIEWER)
    page.goto("/admin/audit?action=app")
    text = page.locator("#audit-table").inner_text()
    for action, obj in (("app.add", "app:shop"), ("app.rotate", "app:shop"),
                        ("app.remove", "app:shop"), ("app.limits", "app:blog")):
        assert re.search(rf"admin:{ADMIN[0]}\s+{re.escape(action)}\s+{obj}", text), action
    page.goto("/admin/audit")
    page.get_by_label("Action").select_option("token")
    page.get_by_role("button", name="Show").click()
    assert "token.add" in page.locator("#audit-table").inner_text()
    assert "app.add" not in page.locator("#audit-table").inner_text()
    assert_clean(page, "audit")
    h = {"Authorization": f"Bearer {token(admin_server)}"}
    every = []
    before = None
    with http(admin_server, headers=h) as c:
        for _ in range(100):  # pages of 20 until the last
            params: dict[str, Any] = {"limit": 20}
            if before is not None:
                params["before"] = before
            got = c.get("/api/v1/admin/audit", params=params).json()
            every += got["rows"]
            before = got["next_before"]
            if before is None:
                break
        page.goto("/admin/audit")
    actions = {r["action"] for r in every}
    assert {"app.add", "app.rotate", "app.remove", "app.limits", "account.add",
            "account.role", "account.remove", "token.add", "token.remove",
            "dkim.generate"} <= actions
    assert len({r["id"] for r in every}) == len(every)
    dump = repr(every) + page.content()
    for secret in SECRETS:
        assert secret not in dump
