"""Connections and routes in the web admin (postroom.web.connections, web.api_connections,
ops.connections): a real `postroom serve`, its JSON API with admin tokens, its pages with
sessions and in Chromium. A connection defined in postroom.toml is locked; a viewer changes
nothing; a stored connection is saved, edited and deleted without a restart."""

from __future__ import annotations

import re
import smtplib
import time
import uuid
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
    login,
    shot,
    signed_in,
)
from diag_helpers import ProviderHandler, make_ca, make_cert, provider, server_context

FILED = "filed"
USER, PASSWORD = "testuser@example.test", "testpass"  # Dovecot's (tests/conftest.py USERS)
SLOW_MS = 90_000  # a wizard step probes servers; a test send waits for the worker


@pytest.fixture(scope="module")
def admin_config() -> str:
    return (f'[[connections]]\nname = "{FILED}"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
            'port = 10587\nsecurity = "starttls"\n')


def api(server: AdminServer, name: str) -> httpx.Client:
    return httpx.Client(base_url=server.base + "/api/v1/admin", timeout=60,
                        headers={"Authorization": f"Bearer {admin_token(server, name)}"})


def entry(port: int = 10587) -> dict[str, Any]:
    return {"name": "made", "transport": "smtp", "host": "127.0.0.1", "port": port,
            "security": "starttls", "username": "someone"}


def test_api_add_edit_delete_and_the_locked_file_connection(admin_server: AdminServer) -> None:
    with api(admin_server, ADMIN[0]) as a, api(admin_server, VIEWER[0]) as v:
        listed = {c["name"]: c for c in a.get("/connections").json()}
        assert listed[FILED]["origin"] == "file"
        # the file's connection: refused, with the reason
        r = a.put(f"/connections/{FILED}", json={"entry": {"transport": "smtp",
                                                           "host": "x", "port": 1}})
        assert r.status_code == 409 and "postroom.toml" in r.json()["error"]["message"]
        assert a.delete(f"/connections/{FILED}").status_code == 409
        # a viewer reads, changes nothing
        assert v.get("/connections").status_code == 200
        for method, path, body in (("POST", "/connections", {"entry": entry()}),
                                   ("PUT", "/connections/made", {"entry": entry()}),
                                   ("DELETE", "/connections/made", None),
                                   ("POST", "/connections/made/test", {"to": "a@b.test"}),
                                   ("POST", "/connections/made/probe", None),
                                   ("POST", "/wizard/plan", {"address": "a@b.test"}),
                                   ("POST", "/wizard/check", {"entry": entry()}),
                                   ("PUT", "/routes", {"stored": []})):
            assert v.request(method, path, json=body).status_code == 403, path
        # add (the secret stored, never echoed), a duplicate refused, edit, a route, delete
        r = a.post("/connections", json={"entry": entry(), "secret": "hunter2-secret"})
        assert r.status_code == 201, r.text
        assert a.post("/connections", json={"entry": entry()}).status_code == 409
        made = {c["name"]: c for c in a.get("/connections").json()}["made"]
        assert made["origin"] == "database" and made["server"] == "127.0.0.1:10587"
        assert "hunter2" not in a.get("/connections").text
        assert a.put("/connections/made", json={"entry": entry(10588)}).status_code == 200
        made = {c["name"]: c for c in a.get("/connections").json()}["made"]
        assert made["server"] == "127.0.0.1:10588"
        bad = a.post("/connections", json={"entry": {**entry(), "name": "x",
                                                     "password_env": "HOME"}})
        assert bad.status_code == 400 and "environment variable" in bad.json()["error"]["message"]
        r = a.put("/routes", json={"stored": [{"match": {"recipient_domain": ["x.test"]},
                                               "chain": ["made", FILED]}]})
        assert r.status_code == 200 and r.json()["stored"][0]["chain"] == ["made", FILED]
        r = a.delete("/connections/made")
        assert r.status_code == 409 and "route" in r.json()["error"]["message"]
        assert a.put("/routes", json={"stored": []}).status_code == 200
        assert a.delete("/connections/made").status_code == 200
        assert "made" not in {c["name"] for c in a.get("/connections").json()}
        assert a.get("/connections/nope").status_code in (404, 405)


def test_pages_refuse_a_viewer_and_a_locked_connection(admin_server: AdminServer) -> None:
    c, csrf = signed_in(admin_server, *VIEWER)
    try:
        assert c.get("/admin/connections").status_code == 200
        for path in ("/admin/connections/new", "/admin/connections/new/save",
                     f"/admin/connections/{FILED}/test", f"/admin/connections/{FILED}/probe",
                     f"/admin/connections/{FILED}/delete", f"/admin/connections/{FILED}/edit",
                     "/admin/routes"):
            assert c.post(path, data={"csrf": csrf, "confirm": "yes"}).status_code == 403, path
    finally:
        c.close()
    c, csrf = signed_in(admin_server, *ADMIN)
    try:
        # the same status as the JSON API's (web/ops_errors.py): 409, locked
        r = c.post(f"/admin/connections/{FILED}/delete", data={"csrf": csrf, "confirm": "yes"})
        assert r.status_code == 409 and "postroom.toml" in r.text
        r = c.post(f"/admin/connections/{FILED}/edit", data={"csrf": csrf, "port": "1"})
        assert r.status_code == 409 and "postroom.toml" in r.text
        # a concern the plan listed and the admin did not confirm: nothing is checked or saved
        r = c.post("/admin/connections/new/save", data={
            "csrf": csrf, "name": "unconfirmed", "host": "127.0.0.1", "port": "10587",
            "security": "starttls", "concerns": "found by a guess: nothing proves it"})
        assert r.status_code == 400 and "needs your confirmation" in r.text
        assert "found by a guess" in r.text
        # without the CSRF token: refused
        assert c.post("/admin/routes", data={"action": "add", "chain": FILED}).status_code == 403
    finally:
        c.close()


def test_list_and_detail_in_chromium(admin_server: AdminServer, page: Any) -> None:
    login(page, *ADMIN)
    page.goto("/admin/connections")
    assert page.get_by_text("defined in postroom.toml").first.is_visible()
    assert page.get_by_role("link", name="Add a connection").is_visible()
    assert_clean(page, "connections-list")
    page.get_by_role("link", name=FILED).click()
    page.wait_for_load_state()
    # locked: no edit nor delete control, the checks are there
    assert page.get_by_role("link", name="Edit").count() == 0
    assert page.get_by_role("button", name="Delete").count() == 0
    assert page.get_by_role("button", name="Send a test").is_visible()
    assert_clean(page, "connections-detail")
    page.goto("/admin/connections")
    page.emulate_media(color_scheme="dark")  # the badges must stay readable in dark mode
    shot(page, "connections-list-dark")
    page.emulate_media(color_scheme="light")
    page.goto("/admin/connections/new")
    assert_clean(page, "connections-new")


# -- the main flow against the real Postfix + Dovecot -----------------------------------------
def wizard_to_plan(page: Any, peers: Any, server: str = "", ca_file: str = "") -> None:
    """Step 1 of the wizard, "I know my server" (the peers' submission port unless given)
    and a private CA (the peers' unless given): ends on step 3."""
    page.goto("/admin/connections/new")
    page.get_by_label("Your email address").fill(USER)
    page.get_by_label("I know my server (optional)").fill(
        server or f"127.0.0.1:{peers.submission_port}")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("CA file on this server (optional)").fill(ca_file or peers.ca_file)
    page.get_by_role("button", name="Find my server").click(timeout=SLOW_MS)
    page.wait_for_selector("#settings-title", timeout=SLOW_MS)


def reloads(server: AdminServer) -> int:
    """How many times serve swapped a stored configuration in (postroom.reload's log line)."""
    return server.proc.log.read_text(errors="replace").count("configuration generation")


def wait_reload(server: AdminServer, before: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while reloads(server) <= before:
        assert time.monotonic() < deadline, "serve did not load the stored configuration"
        time.sleep(0.1)


def door_send(server: AdminServer, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.proc.smtp_port, timeout=30) as s:
        s.sendmail(USER, [to], f"From: {USER}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n"
                   "through the door\r\n".encode())


def logged(a: httpx.Client, subject: str, want: str, timeout: float = 60.0) -> dict[str, Any]:
    """The message of ``subject`` in the JSON log once its status is ``want``."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = a.get("/log", params={"text": subject}).json()["messages"]
        if rows and rows[0]["status"] == want:
            return rows[0]
        time.sleep(0.3)
    raise AssertionError(f"{subject!r} never {want}: {rows}")


def test_wizard_test_send_and_live_changes_in_chromium(admin_server: AdminServer, page: Any,
                                                       peers: Any) -> None:
    name = f"pf{uuid.uuid4().hex[:6]}"
    login(page, *ADMIN)
    wizard_to_plan(page, peers)
    # the server named by the admin and verified with the given CA: nothing to confirm
    assert page.get_by_text("I checked this server, use it anyway").count() == 0
    assert page.get_by_label("Server", exact=True).input_value() == "127.0.0.1"
    page.get_by_label("Connection name").fill(name)
    assert page.get_by_label("User name").input_value() == USER
    assert_clean(page, "connections-wizard-plan")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    # a wrong password: the login check fails with its transcript, nothing saved
    page.get_by_label("Password", exact=True).fill("not-the-password")
    page.get_by_role("button", name="Check the login and save").click(timeout=SLOW_MS)
    assert page.locator("#wizard-error").is_visible()
    assert "AUTH" in page.locator("pre.transcript").inner_text()
    assert "not-the-password" not in page.content()
    assert_clean(page, "connections-wizard-login-failed")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Check the login and save").click(timeout=SLOW_MS)
    page.wait_for_url(f"**/admin/connections/{name}?done=saved")
    assert page.get_by_text("made here").first.is_visible()

    # the test send, its transcript, the log and the Maildir
    page.get_by_label("Send a test message to").fill(USER)
    page.get_by_role("button", name="Send a test").click(timeout=SLOW_MS)
    page.wait_for_selector("#test-result", timeout=SLOW_MS)
    result = page.locator("#test-result").inner_text()
    assert "sent" in result and "250" in page.locator("#test-result pre").first.inner_text()
    assert_clean(page, "connections-test-sent")
    peers.wait_for(USER, f"Postroom test via {name}", timeout=30)
    page.locator("#test-result a").first.click()
    page.wait_for_load_state()
    assert f"Postroom test via {name}" in page.content()

    with api(admin_server, ADMIN[0]) as a:
        stored = a.get("/connections").json()
        made = next(c for c in stored if c["name"] == name)
        assert made["origin"] == "database" and made["server"] == \
            f"127.0.0.1:{peers.submission_port}"
        # a route to it, made in the page: mail through serve's SMTP door now goes through
        # the new connection, without a restart
        before = reloads(admin_server)
        page.goto("/admin/connections")
        page.get_by_label("Recipient domains").fill("example.test")
        page.get_by_label("Connections to try, in order").fill(name)
        page.get_by_role("button", name="Add the route").click()
        page.wait_for_url("**/admin/connections?done=routes*")
        assert_clean(page, "connections-list-routes")
        wait_reload(admin_server, before)
        subject = f"door-{uuid.uuid4().hex[:10]}"
        door_send(admin_server, USER, subject)
        assert logged(a, subject, "sent")["connection"] == name
        peers.wait_for(USER, subject, timeout=30)

        # a wrong port: the next message defers, with advice; fixed back, it goes
        before = reloads(admin_server)
        page.goto(f"/admin/connections/{name}/edit")
        assert page.get_by_label("ca_file").input_value() == peers.ca_file
        assert_clean(page, "connections-edit")
        page.get_by_label("port", exact=True).fill("1")
        page.get_by_label("connect_timeout").fill("3")
        page.get_by_role("button", name="Save").click()
        page.wait_for_url(f"**/admin/connections/{name}?done=saved")
        wait_reload(admin_server, before)
        subject = f"port-{uuid.uuid4().hex[:10]}"
        door_send(admin_server, USER, subject)
        row = logged(a, subject, "deferred")
        detail = a.get(f"/messages/{row['id']}").json()
        assert any(t.get("advice") for t in detail["attempts"]), detail["attempts"]
        before = reloads(admin_server)
        page.goto(f"/admin/connections/{name}/edit")
        page.get_by_label("port", exact=True).fill(str(peers.submission_port))
        page.get_by_role("button", name="Save").click()
        page.wait_for_url(f"**/admin/connections/{name}?done=saved")
        wait_reload(admin_server, before)
        logged(a, subject, "sent")
        peers.wait_for(USER, subject, timeout=30)

        # delete: refused while the route uses it (the message says so), then done
        page.goto(f"/admin/connections/{name}")
        page.get_by_label("Yes, delete this connection and its stored password").check()
        page.get_by_role("button", name="Delete").click()
        assert "route" in page.locator("#conn-error").inner_text()
        page.goto("/admin/connections")
        page.locator("ol.routes").get_by_role("button", name="Delete").last.click()
        page.wait_for_url("**/admin/connections?done=routes*")
        page.goto(f"/admin/connections/{name}")
        page.get_by_label("Yes, delete this connection and its stored password").check()
        page.get_by_role("button", name="Delete").click()
        page.wait_for_url("**/admin/connections?done=deleted")
        assert name not in {c["name"] for c in a.get("/connections").json()}


def test_oauth_through_the_wizard_and_sign_in_in_chromium(admin_server: AdminServer,
                                                          page: Any, peers: Any) -> None:
    name = f"oa{uuid.uuid4().hex[:6]}"
    base = peers.oauth_base
    login(page, *ADMIN)
    wizard_to_plan(page, peers)
    page.get_by_label("Connection name").fill(name)
    page.get_by_label("With OAuth 2.0 (no password stored)").check()
    redirect = f"http://127.0.0.1:{admin_server.proc.http_port}/oauth/callback"
    assert page.locator("#oauth").get_by_text(redirect).is_visible()
    page.get_by_label("Provider", exact=True).select_option("generic")
    # gateway-consent: the client for which the local provider shows a consent page
    page.get_by_label("Client id").fill("gateway-consent")
    page.get_by_label("Client secret").fill(peers.oauth_client_secret)
    page.get_by_label("Authorization URL (generic provider)").fill(f"{base}/o/authorize/")
    page.get_by_label("Token URL (generic provider)").fill(f"{base}/o/token/")
    page.get_by_label("Scopes (generic provider, space-separated)").fill("smtp offline_access")
    page.get_by_role("button", name="Check the login and save").click(timeout=SLOW_MS)
    page.wait_for_url(f"**/admin/connections/{name}?done=signin")
    assert page.get_by_text("not signed in").is_visible()
    assert_clean(page, "connections-oauth-saved")
    page.get_by_role("link", name="Sign in with OAuth").click()
    page.fill("input[name=username]", USER)  # the provider's own login form
    page.fill("input[name=password]", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("input[name=allow]")
    page.click("input[name=allow]")
    page.wait_for_url("**/oauth/callback?*")
    assert "Signed in" in page.locator("h1").inner_text()
    page.goto(f"/admin/connections/{name}")
    # the local provider does not say who signed in (no id_token, no profile call): the
    # grant holds no account name, and the page says "signed in" without one
    assert page.locator("dd", has_text=re.compile("^signed in$")).is_visible()
    # saving the edit form keeps what it does not show (the oauth table)
    page.goto(f"/admin/connections/{name}/edit")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/admin/connections/{name}?done=saved")
    with api(admin_server, ADMIN[0]) as a:
        made = next(c for c in a.get("/connections").json() if c["name"] == name)
        assert made["oauth"] and made["oauth_state"] == "ok" and made["oauth_account"] is None
        assert peers.oauth_client_secret not in a.get("/connections").text
        sent = a.post(f"/connections/{name}/test", json={"to": USER})
        assert sent.status_code == 200 and sent.json()["status"] == "sent", sent.text
        assert a.delete(f"/connections/{name}").status_code == 200


def test_advanced_form_probe_and_test_send(admin_server: AdminServer, page: Any,
                                           peers: Any) -> None:
    name = f"adv{uuid.uuid4().hex[:6]}"
    login(page, *ADMIN)
    page.goto("/admin/connections/new")
    page.get_by_role("link", name="Or add any kind of connection by its settings").click()
    page.get_by_label("Transport").select_option("memory")
    page.get_by_role("button", name="Show its settings").click()
    assert page.get_by_label("Transport").input_value() == "memory"
    page.get_by_label("Transport").select_option("smtp")
    page.get_by_role("button", name="Show its settings").click()
    assert_clean(page, "connections-advanced")
    page.get_by_label("Connection name").fill(name)
    page.get_by_label("host (required)").fill("127.0.0.1")
    page.get_by_label("port", exact=True).fill("twenty-five")
    page.get_by_label("security", exact=True).select_option("none")
    page.get_by_role("button", name="Save").click()
    assert "port" in page.locator("#advanced-error").inner_text()  # the model's refusal
    assert page.get_by_label("security", exact=True).input_value() == "none"  # kept
    page.get_by_label("port", exact=True).fill(str(peers.plain_port))
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"**/admin/connections/{name}?done=saved")
    page.get_by_role("button", name="Probe the server").click(timeout=SLOW_MS)
    page.wait_for_selector("#probe-result", timeout=SLOW_MS)
    assert str(peers.plain_port) in page.locator("#probe-result").inner_text()
    assert_clean(page, "connections-probe")
    page.get_by_label("Send a test message to").fill("alice@example.test")
    page.get_by_role("button", name="Send a test").click(timeout=SLOW_MS)
    page.wait_for_selector("#test-result", timeout=SLOW_MS)
    assert "sent" in page.locator("#test-result").inner_text()
    peers.wait_for("alice@example.test", f"Postroom test via {name}", timeout=30)
    with api(admin_server, ADMIN[0]) as a:
        # "new" is a page of the admin: refused as a name, with the reason
        r = a.post("/connections", json={"entry": {**entry(), "name": "new"}})
        assert r.status_code == 400 and "choose another name" in r.json()["error"]["message"]
        assert a.delete(f"/connections/{name}").status_code == 200


def test_wizard_asks_to_confirm_a_certificate_for_another_name(
        admin_server: AdminServer, page: Any, peers: Any, tmp_path: Path) -> None:
    """A server whose trusted certificate names another host: the plan lists the concern,
    an unticked save is refused with its words, a ticked one verifies the server as the
    certificate's name (tls_server_name), as the CLI wizard does after a yes."""
    name = f"cn{uuid.uuid4().hex[:6]}"
    ca = make_ca(tmp_path / "ca")
    (tmp_path / "srv").mkdir()
    cert, key = make_cert(ca, tmp_path / "srv", ["other.test"])
    # a STARTTLS server taking any login, its certificate for other.test, not 127.0.0.1
    with provider(ProviderHandler(), tls=server_context(cert, key)) as port:
        login(page, *ADMIN)
        wizard_to_plan(page, peers, server=f"127.0.0.1:{port}", ca_file=str(ca.path))
        box = page.get_by_label("I checked this server, use it anyway")
        assert box.is_visible() and not box.is_checked()
        concern = page.locator(".concerns li").first.inner_text()
        assert "issued for other.test" in concern, concern
        page.get_by_label("Connection name").fill(name)
        page.get_by_label("Password", exact=True).fill("any password")
        assert_clean(page, "connections-wizard-concern")
        page.get_by_role("button", name="Check the login and save").click(timeout=SLOW_MS)
        assert "needs your confirmation" in page.locator("#wizard-error").inner_text()
        assert "issued for other.test" in page.locator(".concerns").inner_text()
        assert not page.get_by_label("I checked this server, use it anyway").is_checked()
        with api(admin_server, ADMIN[0]) as a:
            assert name not in {c["name"] for c in a.get("/connections").json()}
            page.get_by_label("Password", exact=True).fill("any password")
            page.get_by_label("I checked this server, use it anyway").check()
            page.get_by_role("button", name="Check the login and save").click(
                timeout=SLOW_MS)
            page.wait_for_url(f"**/admin/connections/{name}?done=saved")
            r = a.get("/connections")
            assert name in {c["name"] for c in r.json()}, r.text
            page.goto(f"/admin/connections/{name}/edit")
            assert page.get_by_label("tls_server_name").input_value() == "other.test"
            assert a.delete(f"/connections/{name}").status_code == 200
