"""Fixtures for the web admin's tests in a real browser: a real `postroom serve` with two
accounts, headless Chromium (Debian's /usr/bin/chromium, never `playwright install`)
driven by Playwright's sync API, and helpers to sign in, take screenshots and run axe-core.

Registered for every test module by tests/conftest.py (pytest_plugins). The server and the
browser are module-scoped (each costs seconds to start); every test gets its own browser
context (its own cookies) from ``page``. A module changes the server's configuration by
overriding the ``admin_config`` fixture (TOML appended to postroom.toml).

Screenshots go to tests/artifacts/admin/ (git-ignored): ``NAME-desktop.png`` (1280x800) and
``NAME-phone.png`` (360x740).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from serve_proc import Postroom

if TYPE_CHECKING:
    from postroom.runtime import Instance

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "admin"
CHROMIUM = "/usr/bin/chromium"
# As tests/oauth_browser_signin.py: no sandbox (root in a container), nothing fetched.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--disable-dev-shm-usage"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
ADMIN = ("admin", "tabby cat on the keyboard")
VIEWER = ("viewer", "quiet owl reads the log")
TIMEOUT_MS = 20_000


@dataclass
class AdminServer:
    """A running `postroom serve` with an admin (ADMIN) and a viewer (VIEWER) account."""

    proc: Postroom

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}"

    def add_account(self, name: str, password: str, role: str = "admin") -> None:
        out = self.proc.cli("admin", "add", name, "--role", role, "--password-stdin",
                            input=f"{password}\n".encode())
        if out.returncode != 0:
            raise AssertionError(f"`admin add {name}` failed: {out.stdout!r} {out.stderr!r}")

    def setup_link(self) -> str | None:
        """The last setup link `postroom serve` printed, if any."""
        found = re.findall(r"(http://\S+/admin/setup\?token=\S+)", self.proc.log.read_text())
        return found[-1] if found else None


@pytest.fixture(scope="module")
def admin_config() -> str:
    """TOML appended to the server's postroom.toml (override it in a test module)."""
    return ""


@pytest.fixture(scope="module")
def admin_server_config() -> str:
    """TOML lines added to the server's [server] section (override it in a test module)."""
    return ""


@pytest.fixture(scope="module")
def admin_accounts() -> bool:
    """Whether the server starts with ADMIN and VIEWER (override: False for setup tests)."""
    return True


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory, admin_config: str,
                 admin_server_config: str, admin_accounts: bool) -> Iterator[AdminServer]:
    proc = Postroom(tmp_path_factory.mktemp("admin-serve"), connections=admin_config,
                    server=admin_server_config)
    server = AdminServer(proc)
    if admin_accounts:
        server.add_account(*ADMIN, role="admin")
        server.add_account(*VIEWER, role="viewer")
    with proc:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS,
                                     timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def new_tab(browser: Any, base_url: str, **options: Any) -> Iterator[Any]:
    """A tab in a fresh browser context (no cookies) on ``base_url``, desktop-sized unless
    ``options`` (Browser.new_context's) say otherwise; the context is closed after."""
    context = browser.new_context(base_url=base_url, **{"viewport": DESKTOP, **options})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def page(browser: Any, admin_server: AdminServer) -> Iterator[Any]:
    """A fresh browser context (no cookies) on the server, desktop-sized."""
    with new_tab(browser, admin_server.base) as tab:
        yield tab


def login(page: Any, name: str, password: str) -> None:
    """Sign in through the form, as a person would; ends on the dashboard (or where the
    form sent the browser, e.g. the TOTP step)."""
    page.goto("/admin/login")
    page.get_by_label("Account name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def shot(page: Any, name: str) -> list[Path]:
    """Full-page screenshots at desktop and phone width (the viewport is restored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = page.viewport_size or DESKTOP
    paths = []
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        path = ARTIFACTS / f"{name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        paths.append(path)
    page.set_viewport_size(before)
    return paths


def axe(page: Any, rules: list[str] | None = None) -> list[dict[str, Any]]:
    """axe-core's violations on the page as it is (an empty list when clean): of every
    rule, or only of ``rules`` (axe's rule ids)."""
    from axe_playwright_python.sync_playwright import Axe

    options: dict[str, Any] = {"resultTypes": ["violations"]}  # Axe.run's default
    if rules:
        options["runOnly"] = rules
    violations: list[dict[str, Any]] = Axe().run(page, options=options).response["violations"]
    return violations


def no_horizontal_scroll(page: Any) -> bool:
    """Whether the page fits its viewport's width (nothing to scroll sideways)."""
    return bool(page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"))


def assert_clean(page: Any, name: str) -> None:
    """Screenshots at both widths; no axe violation and nothing to scroll sideways at
    either (the viewport is set back to desktop)."""
    shot(page, name)
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        assert axe(page) == [], f"{name} at {size['width']} px"
        assert no_horizontal_scroll(page), f"{name} scrolls sideways at {size['width']} px"
    page.set_viewport_size(DESKTOP)


def http(server: AdminServer, **kw: Any) -> Any:
    """An httpx client on the server (redirects not followed)."""
    import httpx

    return httpx.Client(base_url=server.base, timeout=30, follow_redirects=False, **kw)


def signed_in(server: AdminServer, name: str, password: str) -> tuple[Any, str]:
    """An httpx client signed in through the form, and its session's CSRF token (close the
    client when done: ``with contextlib.closing(c)``)."""
    c = http(server)
    r = c.post("/admin/login", data={"name": name, "password": password})
    assert r.status_code == 303, r.text
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', c.get("/admin/").text)
    assert found
    return c, found.group(1)


def admin_token(server: AdminServer, name: str = ADMIN[0]) -> str:
    """A new admin API token (`postroom admin token NAME`)."""
    out = server.proc.cli("admin", "token", name, "--label", "tests")
    assert out.returncode == 0, out.stderr
    found = re.search(r"Bearer (prt_\S+)", out.stdout.decode())
    assert found, out.stdout
    return found.group(1)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` (every 0.2 s) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def instance_from(config: Path) -> Instance:
    """The Instance of a postroom.toml, opened in this process (as a CLI command would):
    a served instance's database, or another instance made by a test."""
    from postroom import settings
    from postroom.runtime import Instance

    return Instance(settings.load(config, environ={}))
