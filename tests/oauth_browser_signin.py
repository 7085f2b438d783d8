"""Sign a Postroom connection in with a real browser (headless Chromium, Debian's binary,
driven by Playwright; never `playwright install`). Run by tests/test_oauth_browser.py with the
peers' Python (tests/peers/browser.sh installs Playwright there).

usage: oauth_browser_signin.py START_LINK USER PASSWORD SCREENSHOT.png
Prints one JSON line: {"url": ..., "title": ..., "text": ...} of the page Postroom shows at
the end (its /oauth/callback answer).
"""

import json
import sys

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--disable-dev-shm-usage"]

start, user, password, shot = sys.argv[1:5]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS,
                                timeout=60_000)
    try:
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(start)                        # Postroom -> 302 -> the provider's login form
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", password)
        page.click("input[type=submit]")        # -> the consent page
        page.wait_for_selector("input[name=allow]")
        page.screenshot(path=shot)
        page.click("input[name=allow]")         # -> 302 to Postroom's /oauth/callback
        page.wait_for_url("**/oauth/callback?*")
        page.wait_for_selector("h1")
        print(json.dumps({"url": page.url, "title": page.title(),
                          "text": page.inner_text("body")}))
    finally:
        browser.close()
