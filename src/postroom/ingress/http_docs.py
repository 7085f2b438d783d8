"""The API's documentation page, ``/api/v1/docs``: Swagger UI served from the package.

FastAPI's default page loads Swagger UI from a CDN: blank on a machine without internet
access, and whatever the CDN serves runs with the page's origin, next to the API keys typed
into "Authorize". The files here are swagger-ui-dist 5.24.2 (Apache-2.0, see
static/swagger/LICENSE), as the swagger-ui-py 25.7.1 wheel ships them; only the three the
page needs. A Content-Security-Policy keeps the page to this server: scripts are these files
and the page's one inline script (by its hash), and requests go to this origin only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


@functools.cache
def asset(name: str) -> bytes:
    """One of the page's files, read from the package once."""
    return (resources.files("postroom.ingress") / "static" / "swagger" / name).read_bytes()


def _policy(html: str) -> str:
    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest())
                      .decode() + "'" for s in inline)
    # Swagger UI sets style attributes from script, hence 'unsafe-inline' for styles only.
    return ("default-src 'none'; " f"script-src 'self' {hashes}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def install(api: FastAPI, prefix: str, title: str) -> None:
    """Serve the page at ``{prefix}/docs`` and its files under ``{prefix}/docs/``. The
    front treats these paths as public (no API key, no request body)."""
    page_html = get_swagger_ui_html(
        openapi_url=f"{prefix}/openapi.json", title=f"{title} - docs",
        swagger_js_url=f"{prefix}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{prefix}/docs/swagger-ui.css",
        swagger_favicon_url=f"{prefix}/docs/favicon-32x32.png",
        # The default validator badge fetches an image from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    ).body
    page = bytes(page_html).decode()
    headers = {"Content-Security-Policy": _policy(page), "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}

    @api.get(f"{prefix}/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @api.get(f"{prefix}/docs/{{name}}", include_in_schema=False)
    async def docs_file(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404)
        return Response(asset(name), media_type=ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400",
                                 "X-Content-Type-Options": "nosniff"})
