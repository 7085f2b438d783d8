"""The web admin served by `postroom serve` under ``/admin`` (and its JSON side under
``/api/v1/admin``): server-rendered pages (Jinja2 templates, htmx), every asset shipped in
this package.

- ``fence``: what the HTTP front checks before any page work (admin_networks, Host, the
  security headers); imported by the front, so it stays light;
- ``app``: the routers mounted in the FastAPI application (pages, static files, JSON);
- ``auth``: who is asking (session cookie, SSO header, admin API token), CSRF, sign-in;
- ``render``, ``i18n``, ``forms``: templates, translations, form bodies;
- ``login``, ``account``: the sign-in, first-admin setup and own-account pages.

Jinja2 and the templates are loaded on the first admin request, not at start-up.
"""
