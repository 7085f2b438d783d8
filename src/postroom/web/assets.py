"""The static files under ``/admin/static/``: read from the package once, each with a
content hash that goes in its URL (``admin.css?v=1a2b3c4d``), so a browser may keep a file
for a year and still gets the new one after an upgrade.

Only the files listed in ``TYPES`` are served: no directory listing, no path from the
request ever reaches the file system.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
TYPES = {
    "admin.css": "text/css; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "htmx.min.js": "text/javascript; charset=utf-8",
    "push.js": "text/javascript; charset=utf-8",  # the account page's Web Push control
    "push-worker.js": "text/javascript; charset=utf-8",  # served at /admin/ (web.push)
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # the first 12 hex digits of the content's sha256


@functools.cache
def asset(name: str) -> Asset | None:
    """The static file ``name``, or None when it is not one of ours."""
    kind = TYPES.get(name)
    if kind is None:
        return None
    body = (STATIC_DIR / name).read_bytes()
    return Asset(body, kind, hashlib.sha256(body).hexdigest()[:12])


def url(name: str) -> str:
    """The URL of the static file ``name``, with its version."""
    found = asset(name)
    if found is None:
        raise KeyError(f"no static file {name!r} in postroom.web (see assets.TYPES)")
    return f"/admin/static/{name}?v={found.version}"
