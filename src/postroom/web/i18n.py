"""The web admin's languages: which one a request gets, and its gettext catalog.

English is the source language (the msgids); every other shipped language has a complete
catalog in ``locale/<lang>/LC_MESSAGES/postroom.mo`` (tests/test_admin_web.py fails when a
string lacks a translation or a ``.mo`` is older than its ``.po``). The catalogs are read
with the standard library's gettext: Babel is for extraction and compiling
(locale/README.md), not needed to serve a page.
"""

from __future__ import annotations

import enum
import functools
import gettext
from pathlib import Path

LOCALE_DIR = Path(__file__).with_name("locale")
DOMAIN = "postroom"
# An Accept-Language header longer than this is read only this far (it lists languages in
# order of preference, so the first ones are what matters).
_MAX_HEADER = 512
_MAX_ITEMS = 32


class Language(enum.StrEnum):
    """The languages shipped complete; the first is the source language."""

    EN = "en"
    FR = "fr"


DEFAULT = Language.EN


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def negotiate(accept_language: str | None, forced: str = "") -> Language:
    """The language for a request: ``forced`` ([admin] language) when it names a shipped
    one, else the best of the browser's ``Accept-Language`` (RFC 9110 12.5.4: "fr-CA;q=0.9"
    matches fr), else English."""
    if forced:
        try:
            return Language(forced.lower())
        except ValueError:
            pass
    best: tuple[float, int, Language] | None = None
    items = (accept_language or "")[:_MAX_HEADER].split(",")[:_MAX_ITEMS]
    for order, item in enumerate(items):
        tag, *params = item.split(";")
        primary = tag.strip().lower().partition("-")[0]
        try:
            lang = Language(primary)
        except ValueError:
            continue
        q = _quality(params)
        # Higher quality wins; on a tie the one listed first.
        if q > 0 and (best is None or q > best[0]):
            best = (q, order, lang)
    return best[2] if best else DEFAULT


@functools.cache
def translations(lang: Language) -> gettext.NullTranslations:
    """The catalog of ``lang`` (English: the msgids as they are)."""
    if lang == DEFAULT:
        return gettext.NullTranslations()
    path = LOCALE_DIR / lang.value / "LC_MESSAGES" / f"{DOMAIN}.mo"
    with path.open("rb") as fh:
        return gettext.GNUTranslations(fh)
