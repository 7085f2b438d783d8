"""Pages from the templates: one Jinja2 environment per shipped language, autoescaping on,
every string through gettext (``{% trans %}`` and ``_()``), the base layout around each page.

Loaded on the first admin request (the HTTP front and `postroom serve` never import it
before). The environments are made once and shared: the translations are bound to each
one, never swapped per request, so concurrent requests in other languages cannot mix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from postroom import __version__
from postroom.web import assets, i18n, labels

if TYPE_CHECKING:
    import jinja2

TEMPLATES = "templates"


@functools.cache
def environment(lang: i18n.Language) -> jinja2.Environment:
    import jinja2  # here: the first page pays for it, a server never used as admin does not

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("postroom.web", TEMPLATES),
        # Every template is HTML: escape everything, whatever the file name.
        autoescape=True,
        extensions=["jinja2.ext.i18n"],
        undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not a blank
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # Whitespace in {% trans %} blocks collapsed, as babel.cfg extracts them.
    env.policies["ext.i18n.trimmed"] = True
    translations = i18n.translations(lang)
    env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
    env.globals.update(static=assets.url, version=__version__,
                       # the store's state tokens in this environment's language
                       label=functools.partial(labels.label, translations.gettext),
                       tone=labels.tone, Vocabulary=labels.Vocabulary)
    return env


def language(request: Request) -> i18n.Language:
    """The request's language: [admin] language when set, else the browser's."""
    from postroom.web import auth

    forced = auth.of(request.app.state.ctx).admin.language
    return i18n.negotiate(request.headers.get("accept-language"), forced)


def translator(request: Request) -> Callable[[str], str]:
    """gettext in the request's language, for the few messages made in Python."""
    return i18n.translations(language(request)).gettext


def page(request: Request, template: str, *, status: int = 200,
         headers: dict[str, str] | None = None, **ctx: Any) -> HTMLResponse:
    """``template`` rendered in the request's language, inside the base layout, with who is
    signed in (``actor``), the session's CSRF token (``csrf``) and the current path."""
    lang = language(request)
    session = getattr(request.state, "session", None)
    values: dict[str, Any] = {
        "lang": lang.value,
        "actor": getattr(request.state, "actor", None),
        "csrf": session.csrf if session is not None else "",
        "path": request.url.path,
        **ctx,
    }
    text = environment(lang).get_template(template).render(values)
    response = HTMLResponse(text, status_code=status, headers=headers)
    new_token = getattr(request.state, "new_token", None)
    if new_token:
        from postroom.web import auth

        auth.of(request.app.state.ctx).set_cookie(request, response, new_token)
    return response
