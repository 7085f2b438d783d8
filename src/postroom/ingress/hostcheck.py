"""Who may reach the pages that administer Postroom: the ``Host`` they were asked for, and
the address asking. One place, for the OAuth pages now and the web admin later.

DNS rebinding: a web page on ``evil.example`` makes its name resolve to 127.0.0.1, and the
victim's browser then sends its requests to Postroom as if they were same-origin to the
attacker's page; only the ``Host`` header still says ``evil.example``. So these pages answer
only to names Postroom is known by (:func:`allowed_hosts`), and refuse any other with 421
Misdirected Request (RFC 9110 section 15.5.20: "not able to produce a response for this
target"). The API under /api/v1 needs no such check: a rebinding page has no API key.

``server.admin_networks`` is the other fence (:func:`admin_refusal`); it is a distinct
privilege from ``server.trusted_networks``, which only says who may relay.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from postroom.ingress.guard import Networks
from postroom.settings import Settings

MISDIRECTED = 421
_ALWAYS = ("localhost", "127.0.0.1", "::1")
_ANY = ("0.0.0.0", "::", "")


def _name(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``"Example.COM.:8025"`` -> ``"example.com"``,
    ``"[::1]:8025"`` -> ``"::1"``."""
    value = header.strip()
    if value.startswith("["):
        return _name(value[1:].partition("]")[0])
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return _name(value)


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Every name Postroom's admin and OAuth pages answer to."""
    names = {*_ALWAYS, *(_name(h) for h in settings.server.allowed_hosts)}
    listen = settings.http_listen
    if listen is not None and listen[0] not in _ANY:
        names.add(_name(listen[0]))
    urls = [settings.oauth.public_url]
    urls += [c.oauth.redirect_uri or "" for c in settings.connections if c.oauth is not None]
    for url in urls:
        host = urlsplit(url).hostname if url else None
        if host:
            names.add(_name(host))
    return frozenset(names)


def host_refusal(settings: Settings, header: str | None) -> str | None:
    """Why a request with this ``Host`` header must be refused, or None when it may be
    served."""
    if not header or not header.strip():
        return ("the request has no Host header; open the page by the address Postroom "
                "printed (e.g. http://127.0.0.1:8025/...)")
    name = host_name(header)
    if name in allowed_hosts(settings):
        return None
    return (f"this page is not served under the name {name!r} (a defence against DNS "
            "rebinding). Open it by the address Postroom printed (`postroom oauth login` "
            "prints the sign-in link), or, if "
            f"browsers really reach Postroom as {name!r}, add it to server.allowed_hosts "
            "(or set [oauth] public_url to that address) and restart Postroom")


def admin_refusal(settings: Settings, client: str | None) -> str | None:
    """Why a client at this address may not administer Postroom, or None when it may
    (it is in ``server.admin_networks``)."""
    if client in Networks(settings.server.admin_networks):
        return None
    who = client or "an unknown address"
    return (f"this page administers Postroom, and {who} is not in server.admin_networks "
            f"({', '.join(settings.server.admin_networks) or 'empty'}). Open it on the "
            "Postroom machine (an SSH tunnel works: ssh -L 8025:127.0.0.1:8025 HOST), or add "
            "your network to server.admin_networks and restart Postroom")
