"""OAuth 2.0 providers as data: endpoints, scopes per transport, and each one's quirks.

A quirk is a field here (``authorize_params``, ``token_auth``, ``refresh_idle_days``...),
never an ``if provider == ...`` elsewhere. A provider without an entry is configured as
``provider = "generic"`` with its endpoints (or its discovery document) in the connection's
``oauth`` table; any field given there also overrides a known provider's default.

Sources: Google "Using OAuth 2.0 for Web Server Applications", "OAuth 2.0 for TV and
Limited-Input Device Applications", "Using OAuth 2.0 for Server to Server Applications";
Microsoft identity platform "OAuth 2.0 authorization code flow", "device authorization
grant", "client credentials flow", "Authenticate an IMAP, POP or SMTP connection using
OAuth", "Refresh tokens" (90 days inactivity); Yahoo "OAuth 2.0 Guide". The facts issue 19
asked to check carry the page they were checked against beside them; a fact no page was
found for says "unverified".
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from postroom.oauth.config import OAuthSettings

@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    authorize_url: str = ""  # "{tenant}" is replaced by the connection's tenant
    token_url: str = ""
    device_url: str | None = None
    revoke_url: str | None = None
    # Scopes a grant needs, per transport kind ("smtp", "gmail", "msgraph"); "*" = any.
    scopes: MappingProxyType[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    # Of those, the ones without which nothing can be sent (the health check looks for them).
    send_scopes: MappingProxyType[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    app_only_scopes: tuple[str, ...] = ()  # client credentials / service account
    authorize_params: MappingProxyType[str, str] = field(
        default_factory=lambda: MappingProxyType({}))
    token_auth: str = "client_secret_post"
    pkce: bool = True
    tenant_default: str | None = None  # providers with tenants (Microsoft)
    # Tenant names that stand for many tenants: no app-only token comes from them.
    multi_tenants: tuple[str, ...] = ()
    # A refresh token unused this many days dies (Microsoft: 90); warned 10 days before.
    refresh_idle_days: int | None = None
    # An app left in a test mode gets refresh tokens that die after this many days (Google
    # "Testing" publishing status: 7); a grant dying at that age is reported as such.
    testing_app_days: int | None = None
    # Scopes the device-code flow refuses (Google allows no Gmail scope on "limited input
    # devices"); asking for them gets invalid_scope, so Postroom says so first.
    device_refuses: tuple[str, ...] = ()
    console: str = ""  # where the app (client id, redirect URIs) is registered
    revoke_note: str = ""  # what else the user does to withdraw the grant at the provider


GOOGLE = Provider(
    name="google", title="Google",
    authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    token_url="https://oauth2.googleapis.com/token",
    device_url="https://oauth2.googleapis.com/device/code",
    revoke_url="https://oauth2.googleapis.com/revoke",
    # SMTP: https://mail.google.com/ is "the scope for IMAP, POP, and SMTP access"
    # (https://developers.google.com/gmail/xoauth2_protocol). Gmail API: gmail.send, unverified
    # here (the Gmail API scopes page was not read).
    scopes=MappingProxyType({"smtp": ("https://mail.google.com/",),
                             "gmail": ("https://www.googleapis.com/auth/gmail.send",)}),
    send_scopes=MappingProxyType({"smtp": ("https://mail.google.com/",),
                                  "gmail": ("https://www.googleapis.com/auth/gmail.send",
                                            "https://mail.google.com/")}),
    app_only_scopes=("https://www.googleapis.com/auth/gmail.send",),
    # offline: a refresh token at all; consent: a new one each time (Google sends it only on
    # the first consent otherwise, and a re-login would leave the old, dead one in place).
    authorize_params=MappingProxyType({"access_type": "offline", "prompt": "consent"}),
    testing_app_days=7,
    # The device flow "supports a limited set of scopes", listed at
    # https://developers.google.com/identity/protocols/oauth2/limited-input-device#allowedscopes
    # (an allow-list: OpenID Connect, Drive's per-file scopes, YouTube): no Gmail scope is on
    # it, and asking for one gets invalid_scope (as reported in
    # https://github.com/googleapis/google-api-python-client/issues/41). Postroom's two Gmail
    # scopes are named here so that it says so before asking.
    device_refuses=("https://mail.google.com/", "https://www.googleapis.com/auth/gmail.send"),
    console="https://console.cloud.google.com/apis/credentials",
    revoke_note="or remove Postroom's access at https://myaccount.google.com/permissions",
)

MICROSOFT = Provider(
    name="microsoft", title="Microsoft",
    authorize_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
    token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    device_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
    # No RFC 7009 endpoint: a grant is withdrawn in the account's or the tenant's settings.
    scopes=MappingProxyType({
        "smtp": ("https://outlook.office.com/SMTP.Send", "offline_access"),
        "msgraph": ("https://graph.microsoft.com/Mail.Send",
                    "https://graph.microsoft.com/Mail.Send.Shared", "offline_access"),
    }),
    send_scopes=MappingProxyType({"smtp": ("https://outlook.office.com/SMTP.Send",),
                                  "msgraph": ("https://graph.microsoft.com/Mail.Send",)}),
    app_only_scopes=("https://graph.microsoft.com/.default",),
    # select_account: a browser signed in to another account must not grant for that one.
    authorize_params=MappingProxyType({"prompt": "select_account"}),
    tenant_default="common",
    multi_tenants=("common", "consumers", "organizations"),
    refresh_idle_days=90,
    console="https://entra.microsoft.com/ > App registrations",
    revoke_note=("and remove the app at https://myapps.microsoft.com (work or school) or "
                 "https://account.live.com/consent/Manage (personal)"),
)

YAHOO = Provider(
    name="yahoo", title="Yahoo",
    # Endpoints: https://developer.yahoo.com/oauth2/guide/flows_authcode/ (request_auth,
    # get_token). Yahoo publishes no device flow and no RFC 7009 revocation endpoint there.
    authorize_url="https://api.login.yahoo.com/oauth2/request_auth",
    token_url="https://api.login.yahoo.com/oauth2/get_token",
    # Scope identifiers are "<api>-r" (read) and "<api>-w" (read/write), mail-r being Yahoo's
    # own example (https://developer.yahoo.com/oauth2/guide/yahoo_scopes/); sending needs the
    # write scope, mail-w. Mail scopes for IMAP/SMTP are granted only after Yahoo approves a
    # "Mail API Access" request (https://developer.nylas.com/docs/provider-guides/
    # yahoo-authentication/, a third party's guide: no Yahoo page on it was found).
    scopes=MappingProxyType({"smtp": ("mail-w",)}),
    send_scopes=MappingProxyType({"smtp": ("mail-w",)}),
    # The client authenticates at get_token with HTTP Basic (base64 client_id:client_secret),
    # for the code exchange and the refresh alike, as Yahoo's own token guides show:
    # https://developer.yahooinc.com/dsp/api/docs/authentication/refresh-token.html and
    # http://fe.prod.ydn.yahoo.com/brightroll/dsp/api/docs/tokens/ . PKCE: unverified (no
    # Yahoo page found on it); a server without it ignores the parameters (RFC 6749 3.1).
    token_auth="client_secret_basic",
    console="https://developer.yahoo.com/apps/",
    revoke_note="and remove the app at https://login.yahoo.com/myaccount/security/app-access",
)

GENERIC = Provider(name="generic", title="OAuth 2.0 provider")

PROVIDERS: MappingProxyType[str, Provider] = MappingProxyType(
    {p.name: p for p in (GOOGLE, MICROSOFT, YAHOO, GENERIC)})


@dataclass(frozen=True)
class Endpoints:
    """A provider as one connection uses it: tenant filled in, overrides applied."""

    provider: Provider
    authorize_url: str
    token_url: str
    device_url: str | None
    revoke_url: str | None
    scopes: tuple[str, ...]
    send_scopes: tuple[str, ...]
    authorize_params: dict[str, str]
    token_auth: str


def provider(name: str, where: str = "oauth.provider") -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ConfigError(
            f"{where} = {name!r} is not a known provider; use one of "
            f"{', '.join(PROVIDERS)} (\"generic\" with authorize_url and token_url, or "
            "discovery_url, for any other)", code="config.oauth.provider") from None


MAX_DISCOVERY_BYTES = 1024 * 1024
MAX_DISCOVERY_REDIRECTS = 3


def endpoint_url_problem(url: str) -> str | None:
    """The one rule for a URL Postroom learns rather than is given (a discovery document,
    the endpoints it lists, an autoconfig <oAuth2> block): None when it may be opened, else
    what is wrong with it. https only (RFC 8414 sections 2-3 and RFC 6749 sections 3.1-3.2
    require TLS for the metadata and these endpoints); plain http only to this machine's
    loopback, where nothing crosses a network (a local identity provider, a test server)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as err:
        return f"{url[:100]!r} is not a valid URL ({err})"
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return None
    if scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return None
    if scheme == "http":
        return (f"{url[:100]} is plain http to another machine: an OAuth endpoint must be "
                "https (plain http is allowed only to 127.0.0.1, ::1 or localhost)")
    return (f"{url[:100]!r} is not an https URL (scheme {scheme or 'missing'!r}): an OAuth "
            "endpoint must be https (plain http only to 127.0.0.1, ::1 or localhost)")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked(url: str, what: str) -> str:
    problem = endpoint_url_problem(url)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}; fix the URL, or give authorize_url and "
                          "token_url in the connection's oauth table",
                          code="config.oauth.discovery")
    return url


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the rule accepts (urllib alone would follow an
    https URL to plain http or ftp), and only a few times."""

    max_redirections = MAX_DISCOVERY_REDIRECTS

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location:
            _checked(urllib.parse.urljoin(req.full_url, location),
                     f"the discovery document {req.full_url} redirects")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def discover(url: str, timeout: float = 10.0, ca_file: str | None = None) -> dict[str, str]:
    """The endpoints of an RFC 8414 (or OpenID Connect) metadata document; the document and
    every endpoint it names must pass :func:`endpoint_url_problem`."""
    _checked(url, f"discovery_url {url[:100]!r}")
    ctx = ssl.create_default_context(cafile=ca_file)
    # Only the handlers an http(s) fetch needs: no file:, ftp: or data: opener to fall into.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=ctx), _CheckedRedirects(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = resp.read(MAX_DISCOVERY_BYTES + 1)
        if len(body) > MAX_DISCOVERY_BYTES:
            raise ValueError(f"larger than {MAX_DISCOVERY_BYTES // 1024} KiB")
        doc = json.loads(body)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read the provider's discovery document {url}: {err}; check discovery_url "
            "(it ends in /.well-known/oauth-authorization-server or "
            "/.well-known/openid-configuration), or give authorize_url and token_url instead",
            code="config.oauth.discovery") from err
    if not isinstance(doc, dict) or "token_endpoint" not in doc:
        raise ConfigError(f"{url} is not an OAuth metadata document (no token_endpoint)",
                          code="config.oauth.discovery")
    keys = {"authorize_url": "authorization_endpoint", "token_url": "token_endpoint",
            "device_url": "device_authorization_endpoint", "revoke_url": "revocation_endpoint"}
    return {ours: _checked(str(doc[theirs]), f"the discovery document {url}: {theirs}")
            for ours, theirs in keys.items() if doc.get(theirs)}


def endpoints(cfg: OAuthSettings, transport: str, connection: str) -> Endpoints:
    """Resolve the connection's provider, tenant and overrides into the URLs to use."""
    where = f"connection {connection!r}: oauth"
    prov = provider(cfg.provider, f"{where}.provider")
    found: dict[str, str] = {}
    if cfg.discovery_url:
        found = discover(cfg.discovery_url, cfg.timeout,
                         str(cfg.ca_file) if cfg.ca_file else None)
    if prov.tenant_default is None and cfg.tenant != "common":
        raise ConfigError(f"{where}.tenant is for Microsoft; {prov.title} has no tenants",
                          code="config.oauth.tenant")
    tenant = cfg.tenant or prov.tenant_default or ""
    if cfg.grant == "client_credentials" and tenant in prov.multi_tenants:
        raise ConfigError(
            f'{where}: grant = "client_credentials" needs tenant = "<your tenant id or '
            f'domain>", not {tenant!r}: app-only tokens come from one tenant',
            code="config.oauth.tenant")

    def pick(key: str, default: str | None) -> str | None:
        value = getattr(cfg, key) or found.get(key) or default
        return value.replace("{tenant}", tenant) if value else None

    authorize = pick("authorize_url", prov.authorize_url or None)
    token = pick("token_url", prov.token_url or None)
    if not token:
        raise ConfigError(
            f"{where}: a generic provider needs token_url (and authorize_url for the browser "
            "flow), or discovery_url", code="config.oauth.endpoints")
    scopes = tuple(cfg.scopes) if cfg.scopes is not None else (
        prov.scopes.get(transport) or prov.scopes.get("*") or ())
    if cfg.grant != "user" and cfg.scopes is None:
        scopes = prov.app_only_scopes
    if not scopes and cfg.grant == "user":
        raise ConfigError(f"{where}: say which scopes to ask for (scopes = [...]): "
                          f"{prov.title} has no default for transport {transport!r}",
                          code="config.oauth.scopes")
    sends = prov.send_scopes.get(transport, ())
    return Endpoints(
        provider=prov, authorize_url=authorize or "", token_url=token,
        device_url=pick("device_url", prov.device_url),
        revoke_url=pick("revoke_url", prov.revoke_url),
        scopes=scopes, send_scopes=sends if cfg.scopes is None else (),
        authorize_params={**prov.authorize_params, **cfg.authorize_params},
        token_auth=cfg.token_auth or prov.token_auth)

