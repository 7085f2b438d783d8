"""The manual (issue 18): the generated reference pages are current (`python
scripts/docs_gen.py --check`), every configuration key has a text to show, every operation
of the HTTP API names its authentication, and the site builds offline in MkDocs' strict
mode (broken links, missing anchors, pages left out of the nav fail it): the CI check that
the manual builds.

Then the built site as a new user meets it, in Debian's Chromium (tests/admin_browser.py's
``browser``) through a local http.server: a configuration key two clicks from the home page
(the navigation, then the page's table of contents) or found by the search box; at phone
width, light and dark, nothing scrolls sideways and axe-core finds no contrast fault.
Screenshots go to tests/artifacts/docs/ (git-ignored). The site is built once per module.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_browser import PHONE, axe, new_tab, no_horizontal_scroll

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import docs_gen  # noqa: E402  (scripts/ is not a package)
from docsgen import config_ref, http_ref  # noqa: E402

TIMEOUT = 600  # two cores shared by many runs: generous, never a measure
ARTIFACTS = ROOT / "tests" / "artifacts" / "docs"
KEY = "delivery-breaker_cooldown"  # the anchor of [delivery] breaker_cooldown
# Pages with wide tables, checked for sideways scrolling at phone width (a code block or a
# table too wide for the screen scrolls inside its own box, as Material makes it).
WIDE_PAGES = ("reference/providers.html", "reference/configuration.html#server")
# The names among these elements that the browser wrapped after another character than an
# underscore: each character's line, from a Range around it.
CUT_INSIDE_A_WORD = """ks => ks.filter(k => {
  let top = null, previous = "";
  const text = document.createTreeWalker(k, NodeFilter.SHOW_TEXT);
  for (let node = text.nextNode(); node; node = text.nextNode()) {
    for (let i = 0; i < node.length; i++) {
      const range = document.createRange();
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const y = range.getBoundingClientRect().top;
      if (top !== null && y > top + 1 && previous !== "_") return true;
      top = y;
      previous = node.data[i];
    }
  }
  return false;
}).map(k => k.textContent)"""
# The axe rules the theme's colours answer for (tests/admin_browser.py runs every rule on
# the admin; Material's own markup is not ours to change here).
CONTRAST_RULES = ["color-contrast", "link-in-text-block"]


def test_every_generated_page_is_current() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_gen.py"), "--check"],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_check_names_each_stale_page(tmp_path: Path) -> None:
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "a.md").write_text("current\n")
    (tmp_path / "reference" / "b.md").write_text("old\n")
    pages = {"reference/a.md": "current\n", "reference/b.md": "new\n",
             "reference/c.md": "missing\n"}
    assert docs_gen.stale(pages, tmp_path) == ["reference/b.md", "reference/c.md"]


def test_every_configuration_key_has_a_text() -> None:
    missing = config_ref.missing_text()
    assert not missing, ("keys without a comment to explain them (write one beside the "
                         "field, in the class named): " + "; ".join(missing))


def test_every_key_has_its_anchor() -> None:
    text = (ROOT / "docs" / "reference" / "configuration.md").read_text("utf-8")
    for section in config_ref.sections():
        assert f'id="{section.anchor}"' in text
        for key in section.keys:
            assert f"](#{key.table or key.anchor})" in text, key.path
    assert 'id="delivery-breaker_cooldown"' in text


def test_every_http_operation_names_its_authentication() -> None:
    """Each operation of the OpenAPI document names the scheme it takes: the app API's key or
    the admin token (web.app.install declares it on every /api/v1/admin router)."""
    doc = http_ref.document()
    undeclared = [f"{method.upper()} {path}" for path, item in doc["paths"].items()
                  for method, op in item.items()
                  if method in http_ref.METHODS and not op.get("security")]
    assert not undeclared, undeclared
    admin = {name for path, item in doc["paths"].items() if path.startswith("/api/v1/admin")
             for op in item.values() for req in op.get("security", []) for name in req}
    assert admin == {"adminToken"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manual built once for the module, by `mkdocs build --strict`, offline."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.fail("mkdocs is not installed in this venv: pip install -e '.[docs]' (the "
                    "test extra has it)")
    out = tmp_path_factory.mktemp("docs") / "site"
    # Any fetch would go through a proxy that is not there, and fail the build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    run = subprocess.run([str(mkdocs), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], capture_output=True, text=True, timeout=TIMEOUT,
                         cwd=ROOT, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return out


def test_the_site_builds_offline_in_strict_mode(site: Path) -> None:
    config = (site / "reference" / "configuration.html").read_text("utf-8")
    assert f'id="{KEY}"' in config
    assert (site / "reference" / "openapi.json").is_file()
    security = (site / "running" / "security.html").read_text("utf-8")
    assert "Security model" in security  # SECURITY.md, included
    for page in site.rglob("*.html"):
        html = page.read_text("utf-8")
        remote = re.findall(r'<(?:link|script|img)\b[^>]*\b(?:href|src)="(?:https?:)?//[^"]*"',
                            html)
        assert not remote, f"{page.relative_to(site)} loads {remote[0]}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not on stderr: pytest shows the failures, not every file served."""


@pytest.fixture(scope="module")
def site_url(site: Path) -> Iterator[str]:
    """The built site over HTTP on 127.0.0.1 (the search's worker does not run from a
    file:// page): what `mkdocs serve` or any static web server gives a reader."""
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.fixture
def reader(browser: Any, site_url: str) -> Iterator[Any]:
    """A fresh browser tab on the site, desktop-sized, light."""
    with new_tab(browser, site_url, color_scheme="light") as tab:
        yield tab


def assert_key_shown(page: Any) -> None:
    """The page is the configuration reference scrolled to the key, and its text reads."""
    from playwright.sync_api import expect

    # The search adds ?h=WORD (the words it highlights) before the anchor.
    page.wait_for_url(re.compile(rf"/reference/configuration\.html(\?[^#]*)?#{KEY}$"))
    expect(page.locator(f"#{KEY}")).to_be_in_viewport()
    text = page.locator(f"#{KEY} + p")
    expect(text).to_be_in_viewport()
    expect(text).to_contain_text("Seconds a connection is skipped")


def test_a_configuration_key_is_two_clicks_from_the_home_page(reader: Any) -> None:
    reader.goto("index.html")
    nav = reader.locator(".md-sidebar--primary")
    reference = nav.locator("li.md-nav__item--section").filter(
        has=reader.locator("a[href$='reference/index.html']"))
    reference.get_by_role("link", name="Configuration", exact=True).click()  # 1
    reader.wait_for_url("**/reference/configuration.html")
    toc = reader.locator(".md-sidebar--secondary")
    toc.get_by_role("link", name="breaker_cooldown", exact=True).click()  # 2
    assert_key_shown(reader)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reader.screenshot(path=str(ARTIFACTS / "configuration-key-desktop.png"))


def test_the_search_box_finds_a_key(reader: Any) -> None:
    reader.goto("index.html")
    box = reader.get_by_placeholder("Search")
    box.click()
    box.press_sequentially("breaker_cooldown")  # typed, as a person would: keyup events
    reader.locator(f".md-search-result a[href$='#{KEY}']").first.click()
    assert_key_shown(reader)


def test_phone_width_scrolls_nothing_sideways(reader: Any) -> None:
    reader.set_viewport_size(PHONE)
    wide = []
    for path in WIDE_PAGES:
        reader.goto(path)
        if not no_horizontal_scroll(reader):
            wide.append(path)
    assert not wide, f"scrolls sideways at {PHONE['width']} px: {wide}"
    # A key table (key, type, default) fits the screen, and a key's name wraps only after
    # an underscore, never inside a word ("breaker_coold|own"): on the last page above.
    for section in ("server", "delivery"):
        table = reader.locator(f"#{section} ~ .md-typeset__scrollwrap table").first
        assert table.evaluate("t => t.getBoundingClientRect().right"
                              " <= document.documentElement.clientWidth"), section
        keys = table.locator("td:first-child code")
        assert keys.count() >= 10
        assert keys.evaluate_all(CUT_INSIDE_A_WORD) == [], section
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reader.screenshot(path=str(ARTIFACTS / "configuration-phone.png"))


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_phone_width_contrast_in_both_schemes(reader: Any, scheme: str) -> None:
    """Prose, links and highlighted code (TOML, shell) in the scheme's colours: no axe
    contrast fault."""
    reader.set_viewport_size(PHONE)
    reader.emulate_media(color_scheme=scheme)
    reader.goto("getting-started.html")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reader.screenshot(path=str(ARTIFACTS / f"getting-started-phone-{scheme}.png"),
                      full_page=True)
    found = axe(reader, CONTRAST_RULES)
    assert not found, [(v["id"], [n["target"] for n in v["nodes"][:3]]) for v in found]
