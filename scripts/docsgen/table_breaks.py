"""MkDocs hook (mkdocs.yml ``hooks:``): a name in a table may wrap after its underscores.

A key table at phone width (docs/stylesheets/extra.css) has no room for
``smtp_max_sessions_per_ip`` on one line. Material lets the browser cut a word anywhere, so
it cut ``breaker_coold|own``; the stylesheet keeps a table's first column from doing that,
and this adds a ``<wbr>`` after each underscore of the code in a table cell, so a name
wraps where it reads (``smtp_max_sessions_|per_ip``). The text is unchanged: a copy, the
search index and the anchors see the same name.
"""

from __future__ import annotations

import re
from typing import Any

_CELL = re.compile(r"(<td[^>]*>)(.*?)(</td>)", re.S)
_CODE = re.compile(r"(<code>)([^<]*)(</code>)")


def _breaks(code: re.Match[str]) -> str:
    start, text, end = code.groups()
    return start + text.replace("_", "_<wbr>") + end


def _cell(cell: re.Match[str]) -> str:
    start, body, end = cell.groups()
    return start + _CODE.sub(_breaks, body) + end


def on_page_content(html: str, **_: Any) -> str:
    return _CELL.sub(_cell, html)
