"""The web admin's foundation against a real `postroom serve`: the setup link, signing in and
out, lockout, TOTP, session expiry, CSRF, cross-site posts, the Host check, admin_networks,
single sign-on from the proxy only, security headers, French, accessibility (axe) and
screenshots at desktop and phone width, light and dark; and the translation catalogs.

Real clicks in Debian's Chromium (tests/admin_browser.py); the hostile requests are plain
HTTP from httpx, some from 127.0.0.2 and 127.0.0.3.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from admin_browser import (
    ADMIN,
    VIEWER,
    AdminServer,
    axe,
    login,
    no_horizontal_scroll,
    shot,
)
from serve_proc import Postroom

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
WEB = Path(__file__).resolve().parent.parent / "src" / "postroom" / "web"
LOCK_FAILURES = 3


@pytest.fixture(scope="module")
def admin_server_config() -> str:
    # 127.0.0.2 may administer (it plays the SSO test's "other client"); 127.0.0.3 may not.
    # Failed sign-ins from one address wait 0.2 s, doubling up to 2 s.
    return ('admin_networks = ["127.0.0.1/32", "127.0.0.2/32", "::1/128"]\n'
            "auth_failure_max_delay = 2\n")


@pytest.fixture(scope="module")
def admin_config() -> str:
    return ("[admin]\n"
            f"login_failures = {LOCK_FAILURES}\nlockout = 600\nsession_idle = 120\n"
            'sso_header = "X-Forwarded-User"\nsso_proxies = ["127.0.0.1"]\n'
            'sso_role = "viewer"\n')


def client(server: AdminServer, source: str | None = None, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=server.base, timeout=30, follow_redirects=False,
                        transport=httpx.HTTPTransport(local_address=source) if source
                        else None, **kw)


def signed_in(server: AdminServer, name: str, password: str) -> tuple[httpx.Client, str]:
    """An httpx client signed in through the form, and its session's CSRF token."""
    c = client(server)
    r = c.post("/admin/login", data={"name": name, "password": password})
    assert r.status_code == 303, r.text
    page = c.get("/admin/")
    assert page.status_code == 200
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return c, found.group(1)


def assert_clean(page: Any, name: str) -> None:
    """No axe violation at desktop nor phone width; screenshots of both."""
    shot(page, name)
    for size in ({"width": 1280, "height": 800}, {"width": 360, "height": 740}):
        page.set_viewport_size(size)
        assert axe(page) == [], f"{name} at {size['width']} px"
        assert no_horizontal_scroll(page), f"{name} scrolls sideways at {size['width']} px"
    page.set_viewport_size({"width": 1280, "height": 800})


# -- the first administrator --------------------------------------------------------------
def test_setup_link_creates_the_first_admin_once(tmp_path: Path, browser: Any) -> None:
    proc = Postroom(tmp_path / "fresh")
    with proc:
        server = AdminServer(proc)
        link = server.setup_link()
        assert link, proc.log.read_text()
        context = browser.new_context(base_url=server.base)
        try:
            page = context.new_page()
            page.goto(link)
            assert_clean(page, "setup")
            page.get_by_label("Account name", exact=True).fill("first")
            page.get_by_label("Password", exact=True).fill("correct horse battery staple")
            page.get_by_label("Password again", exact=True).fill("correct horse battery staple")
            page.get_by_role("button", name="Create the account").click()
            page.wait_for_url("**/admin/")
            assert page.inner_text(".account a") == "first"  # the account menu
            # The link again, in another browser: refused with a page that says what to do.
            other = browser.new_context(base_url=server.base).new_page()
            response = other.goto(link)
            assert response.status == 410
            assert "cannot be used" in other.inner_text("main")
            assert "postroom admin add NAME" in other.inner_text("main")
            other.context.close()
        finally:
            context.close()
        # And posting the form directly with the used token creates nobody.
        with client(server) as c:
            r = c.post("/admin/setup", data={"token": link.split("token=")[1], "name": "second",
                                              "password": "x" * 16, "password2": "x" * 16})
            assert r.status_code == 410
        listed = proc.cli("admin", "list").stdout.decode()
        assert "first" in listed and "second" not in listed


# -- signing in and out -------------------------------------------------------------------
def test_login_dashboard_logout(page: Any, admin_server: AdminServer) -> None:
    page.goto("/admin/")
    assert "/admin/login" in page.url  # not signed in: sent to the sign-in page
    assert_clean(page, "login")
    login(page, *ADMIN)
    page.wait_for_url("**/admin/")
    assert page.locator("h1").inner_text() == "Dashboard"
    assert page.inner_text(".account a") == "admin"  # the account menu
    assert_clean(page, "dashboard")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/admin/login?out=1")
    assert "You are signed out." in page.inner_text("main")
    page.goto("/admin/")
    assert "/admin/login" in page.url


def test_phone_menu_opens(page: Any, admin_server: AdminServer) -> None:
    login(page, *VIEWER)
    page.set_viewport_size({"width": 360, "height": 740})
    assert not page.locator("nav.side").is_visible()
    page.get_by_text("Menu", exact=True).click()
    menu = page.locator("details.menu nav")
    assert menu.get_by_role("link", name="Log").is_visible()
    assert no_horizontal_scroll(page)
    shot(page, "menu-open")


def test_dark_mode(browser: Any, admin_server: AdminServer) -> None:
    context = browser.new_context(base_url=admin_server.base, color_scheme="dark")
    try:
        page = context.new_page()
        login(page, *ADMIN)
        page.wait_for_url("**/admin/")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 23, 27)"
        assert_clean(page, "dashboard-dark")
    finally:
        context.close()


def test_wrong_password_then_lockout(page: Any, admin_server: AdminServer) -> None:
    admin_server.add_account("locky", "staple gun battery")
    for _ in range(LOCK_FAILURES):
        login(page, "locky", "not-the-password")
        assert "Wrong name or password." in page.inner_text("main")
    login(page, "locky", "staple gun battery")  # right, but too late
    assert "locked" in page.inner_text("[role=alert]")
    shot(page, "login-locked")
    rows = admin_server.proc.cli("audit").stdout.decode()
    assert "login.failed" in rows
    assert "not-the-password" not in rows  # the attempt is audited, its password never


def test_totp_enable_then_login_needs_the_code(page: Any, admin_server: AdminServer) -> None:
    admin_server.add_account("otp", "seven lucky lanterns")
    login(page, "otp", "seven lucky lanterns")
    page.goto("/admin/account")
    page.get_by_role("button", name="Set up two-factor sign-in").click()
    secret = page.locator("code.secret").first.inner_text().strip()
    assert page.locator(".qr img").count() == 1
    assert_clean(page, "account-totp")
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Turn two-factor sign-in on").click()
    assert "Two-factor sign-in is on" in page.inner_text("main")
    assert_clean(page, "account")
    page.get_by_role("button", name="Sign out").click()

    login(page, "otp", "seven lucky lanterns")
    code_field = page.get_by_label("Code from your authenticator app")
    assert code_field.is_visible()  # the second step
    assert "seven lucky lanterns" not in page.content()  # the password is not in the page
    assert_clean(page, "login-totp")
    code_field.fill("000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    page.get_by_role("button", name="Sign in").click()
    assert "Wrong code" in page.inner_text("main")
    # The code of the next time step: the one used to turn TOTP on cannot be used again.
    page.get_by_label("Code from your authenticator app").fill(
        pyotp.TOTP(secret).at(time.time() + 30))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/admin/")
    assert page.inner_text(".account a") == "otp"  # the account menu


def test_session_idle_expiry_sends_back_to_login(page: Any,
                                                 admin_server: AdminServer) -> None:
    admin_server.add_account("idle", "sleepy river stones")
    login(page, "idle", "sleepy river stones")
    page.wait_for_url("**/admin/")
    # Two idle periods pass (the clock is the database's, every node reads the same row).
    with sqlite3.connect(admin_server.proc.db) as db:
        db.execute("UPDATE admin_sessions SET last_seen_at = last_seen_at - 240 "
                   "WHERE account = 'idle'")
    page.goto("/admin/account")
    assert "/admin/login" in page.url
    assert "Your session ended" in page.inner_text("main")
    assert page.get_by_label("Account name", exact=True).is_visible()


# -- hostile requests ---------------------------------------------------------------------
def test_csrf_token_required(admin_server: AdminServer) -> None:
    c, csrf = signed_in(admin_server, *VIEWER)
    with contextlib.closing(c):
        for sent in ({}, {"csrf": "wrong"}, {"csrf": csrf[:-1]}):
            r = c.post("/admin/logout", data=sent)
            assert r.status_code == 403 and "Form expired" in r.text, sent
        r = c.post("/admin/logout", headers={"X-CSRF-Token": "wrong"})
        assert r.status_code == 403
        assert c.get("/admin/").status_code == 200  # still signed in
        r = c.post("/admin/logout", data={"csrf": csrf})
        assert r.status_code == 303
        assert c.get("/admin/").status_code == 303  # signed out


def test_cross_site_posts_refused(admin_server: AdminServer) -> None:
    c, csrf = signed_in(admin_server, *VIEWER)
    with contextlib.closing(c):
        evil = {"Origin": "http://evil.example"}
        r = c.post("/admin/logout", data={"csrf": csrf}, headers=evil)
        assert r.status_code == 403
        r = c.post("/admin/logout", data={"csrf": csrf},
                   headers={"Referer": "http://evil.example/page"})
        assert r.status_code == 403
        assert c.get("/admin/").status_code == 200
    with client(admin_server) as anon:  # login CSRF: signing a victim in as the attacker
        r = anon.post("/admin/login", data={"name": VIEWER[0], "password": VIEWER[1]},
                      headers=evil)
        assert r.status_code == 403 and "postroom_session" not in r.headers.get(
            "set-cookie", "")


def test_foreign_host_refused(admin_server: AdminServer) -> None:
    with client(admin_server) as c:
        for path in ("/admin/login", "/", "/api/v1/admin/me"):
            r = c.get(path, headers={"Host": "evil.example"})
            assert r.status_code == 421, path
            assert "allowed_hosts" in r.text
        assert c.get("/admin/login", headers={"Host": "localhost"}).status_code == 200


def test_outside_admin_networks_refused_before_any_work(admin_server: AdminServer) -> None:
    with client(admin_server, source="127.0.0.3") as c:
        r = c.get("/admin/login")
        assert r.status_code == 403 and "server.admin_networks" in r.text
        r = c.get("/api/v1/admin/me")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin.network"
        # A large body is not read: the refusal comes from the headers alone.
        r = c.post("/admin/login", content=b"x" * 5_000_000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 403
        # The single sign-on header does not help either.
        r = c.get("/admin/", headers={"X-Forwarded-User": "admin"})
        assert r.status_code == 403


def test_sso_header_only_from_the_proxy(admin_server: AdminServer) -> None:
    header = {"X-Forwarded-User": "ssouser"}
    with client(admin_server, source="127.0.0.2") as outsider:
        r = outsider.get("/admin/", headers=header)
        assert r.status_code == 303 and "/admin/login" in r.headers["location"]
        assert outsider.get("/api/v1/admin/me", headers=header).status_code == 401
    with client(admin_server) as proxy:  # 127.0.0.1: the configured proxy
        r = proxy.get("/admin/", headers=header)
        assert r.status_code == 200, r.text
        assert '<a href="/admin/account">ssouser</a>' in r.text
        assert "postroom_session=" in r.headers["set-cookie"]
        me = proxy.get("/api/v1/admin/me")  # the session the header opened
        assert me.json() == {"name": "ssouser", "role": "viewer", "kind": "sso"}
    assert "ssouser" in admin_server.proc.cli("admin", "list").stdout.decode()


def test_anonymous_body_limit(admin_server: AdminServer) -> None:
    with client(admin_server) as c:
        r = c.post("/admin/login", content=b"name=a&password=" + b"x" * 100_000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413
        assert "sign in first" in r.json()["error"]["fix"]
        r = c.post("/admin/login", content=b"x" * 100,
                   headers={"Content-Type": "application/x-www-form-urlencoded",
                            "Cookie": "postroom_session=forged"})
        assert r.status_code in (400, 401)  # read (small), then refused as incomplete


def test_security_headers(admin_server: AdminServer) -> None:
    c, _ = signed_in(admin_server, *VIEWER)
    with contextlib.closing(c):
        for path in ("/admin/login", "/admin/", "/admin/nowhere", "/api/v1/admin/me"):
            r = c.get(path)
            assert r.headers["content-security-policy"] == CSP, path
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "same-origin"
            assert r.headers["cache-control"] == "no-store"
        assert c.get("/admin/nowhere").status_code == 404
        page = c.get("/admin/").text
        assert "<style" not in page and " style=" not in page  # the CSP would block them
        assert not re.search(r"<script(?![^>]*\bsrc=)", page)
        css = re.search(r'href="(/admin/static/admin\.css\?v=\w+)"', page)
        assert css
        r = c.get(css.group(1))
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"]
        assert r.headers["content-type"].startswith("text/css")
        assert c.get("/admin/static/").status_code == 404  # no listing
        assert c.get("/admin/static/README.md").status_code == 404
        assert c.get("/admin/static/..%2F__init__.py").status_code == 404


def test_french_from_accept_language(browser: Any, admin_server: AdminServer) -> None:
    with client(admin_server) as c:
        r = c.get("/admin/login", headers={"Accept-Language": "fr-CA,fr;q=0.9,en;q=0.5"})
        assert '<html lang="fr">' in r.text and "Se connecter" in r.text
        r = c.get("/admin/login", headers={"Accept-Language": "de, en;q=0.5"})
        assert '<html lang="en">' in r.text
    context = browser.new_context(base_url=admin_server.base, locale="fr-FR")
    try:
        page = context.new_page()
        page.goto("/admin/login")
        page.get_by_label("Nom du compte").fill(ADMIN[0])
        page.get_by_label("Mot de passe", exact=True).fill(ADMIN[1])
        page.get_by_role("button", name="Se connecter").click()
        page.wait_for_url("**/admin/")
        assert page.locator("h1").inner_text() == "Tableau de bord"
        assert_clean(page, "dashboard-fr")
    finally:
        context.close()


def test_admin_api_me(admin_server: AdminServer) -> None:
    out = admin_server.proc.cli("admin", "token", "admin", "--label", "tests")
    token = re.search(r"prt_\S+", out.stdout.decode())
    assert token, out
    with client(admin_server) as c:
        me = c.get("/api/v1/admin/me", headers={"Authorization": f"Bearer {token.group(0)}"})
        assert me.json() == {"name": "admin", "role": "admin", "kind": "token"}
        bad = c.get("/api/v1/admin/me", headers={"Authorization": "Bearer prt_x_y"})
        assert bad.status_code == 401
        doc = c.get("/api/v1/openapi.json").json()
        assert "/api/v1/admin/me" in doc["paths"]
        assert not any(p.startswith("/admin") for p in doc["paths"])


# -- translations -------------------------------------------------------------------------
def test_every_string_translated_and_mo_current() -> None:
    from io import BytesIO

    from babel.messages.extract import extract_from_dir
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    from postroom.web.i18n import Language

    method_map = [("**.py", "python"), ("templates/**.html", "jinja2")]
    options = {"templates/**.html": {"extensions": "jinja2.ext.i18n", "trimmed": "true"}}
    used = {msg[2] if isinstance(msg[2], str) else msg[2][0]
            for msg in extract_from_dir(str(WEB), method_map, options_map=options)}
    assert len(used) > 50
    for lang in Language:
        if lang is Language.EN:
            continue
        folder = WEB / "locale" / lang.value / "LC_MESSAGES"
        with (folder / "postroom.po").open("rb") as fh:
            catalog = read_po(fh)
        missing = sorted(m for m in used if not (catalog.get(m) and catalog.get(m).string))
        assert not missing, f"{lang}: no translation for {missing} (locale/README.md)"
        fuzzy = [m.id for m in catalog if m.id and m.fuzzy]
        assert not fuzzy, f"{lang}: fuzzy entries {fuzzy}"
        compiled = BytesIO()
        write_mo(compiled, catalog)
        assert compiled.getvalue() == (folder / "postroom.mo").read_bytes(), (
            f"{lang}: postroom.mo is stale: run pybabel compile (locale/README.md)")
