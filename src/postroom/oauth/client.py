"""The OAuth 2.0 protocol, done by authlib (its httpx client): authorization URLs with PKCE,
token requests for every grant, revocation. This module only builds the client for one
connection and maps what can go wrong to postroom.oauth.errors."""

from __future__ import annotations

import json
import logging
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from postroom.oauth import errors
from postroom.oauth.errors import GrantError

if TYPE_CHECKING:
    from postroom.oauth.config import OAuthSettings
    from postroom.oauth.providers import Endpoints

log = logging.getLogger(__name__)
T = TypeVar("T")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 section 3.4
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 section 2.1


def _authlib() -> tuple[Any, type[Exception]]:
    # authlib 1.6+ prefers the httpx2 package and warns once when it falls back to httpx; the
    # fallback is what we want (httpx is our HTTP client everywhere), so the warning is noise.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        from authlib.integrations.base_client import OAuthError
        from authlib.integrations.httpx_client import OAuth2Client
    return OAuth2Client, OAuthError


@dataclass(frozen=True)
class Context:
    """Who is asking, to fill the fix into an error message."""

    connection: str
    link: str = ""
    console: str = ""
    redirect_uri: str = ""
    scopes: str = ""


def make(ep: Endpoints, cfg: OAuthSettings, *, secret: str | None,
         redirect_uri: str | None = None, scope: bool = True,
         transport: httpx.BaseTransport | None = None) -> Any:
    """An authlib OAuth2Client for this connection's provider and client."""
    client_cls, _ = _authlib()
    method = ep.token_auth if secret else "none"
    kwargs: dict[str, Any] = {
        "client_id": cfg.client_id or None, "client_secret": secret,
        "token_endpoint_auth_method": method, "revocation_endpoint_auth_method": method,
        "scope": " ".join(ep.scopes) if scope else None, "redirect_uri": redirect_uri,
        "code_challenge_method": "S256" if ep.provider.pkce else None,
        "token_endpoint": ep.token_url, "timeout": cfg.timeout,
        "verify": ssl.create_default_context(cafile=str(cfg.ca_file)) if cfg.ca_file else True,
        # Proxies come from HTTPS_PROXY as for every other request Postroom makes.
        "trust_env": True,
    }
    if transport is not None:
        kwargs["transport"] = transport
    return client_cls(**kwargs)


def call(fn: Callable[[], T], ctx: Context) -> T:
    """Run one request to the provider; any failure becomes a GrantError saying why."""
    _, oauth_error = _authlib()
    fill = {"link": ctx.link or f"/oauth/start/{ctx.connection}", "console": ctx.console
            or "the provider's developer console", "redirect_uri": ctx.redirect_uri or "?",
            "scopes": ctx.scopes or "?"}
    try:
        return fn()
    except oauth_error as err:
        code = str(getattr(err, "error", "") or "")
        desc = str(getattr(err, "description", "") or "")
        said = f"{code}: {desc}" if desc else code
        key = errors.classify(code, desc)
        if not key:
            raise GrantError(f"connection {ctx.connection}: the provider refused the request: "
                             f"{said}", code=f"oauth.{code or 'error'}"[:64]) from err
        raise errors.failure(key, ctx.connection, said=said, **fill) from err
    except httpx.HTTPStatusError as err:
        said = f"HTTP {err.response.status_code} from {err.request.url}"
        raise errors.failure("unavailable", ctx.connection, said=said, **fill) from err
    except httpx.HTTPError as err:
        said = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise errors.failure("unavailable", ctx.connection, said=said, **fill) from err
    except ValueError as err:  # not JSON where a token response was expected
        raise errors.failure("unavailable", ctx.connection, said=str(err), **fill) from err


@dataclass(frozen=True)
class DeviceCode:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    expires_at: float


def device_authorization(client: Any, ep: Endpoints, cfg: OAuthSettings,
                         ctx: Context) -> DeviceCode:
    """RFC 8628 section 3.1: ask for a device code and the user code to show."""
    url = ep.device_url
    data = {"client_id": cfg.client_id, "scope": " ".join(ep.scopes)}
    if client.client_secret and ep.token_auth == "client_secret_post":
        data["client_secret"] = client.client_secret

    def request() -> DeviceCode:
        resp = client.request("POST", url, data=data, withhold_token=True,
                           auth=client.client_auth(client.token_endpoint_auth_method)
                           if client.client_secret and ep.token_auth == "client_secret_basic"
                           else None)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            resp.raise_for_status()
            raise ValueError(f"device authorization answered HTTP {resp.status_code} without "
                             "JSON")
        if "error" in body:
            _, oauth_error = _authlib()
            raise oauth_error(body["error"], body.get("error_description"))
        resp.raise_for_status()
        # Microsoft names it verification_url in places; RFC 8628 says verification_uri.
        uri = body.get("verification_uri") or body.get("verification_url") or ""
        return DeviceCode(str(body["device_code"]), str(body["user_code"]), str(uri),
                          body.get("verification_uri_complete"),
                          float(body.get("interval") or 5),
                          time.time() + float(body.get("expires_in") or 600))

    return call(request, ctx)


def token_fields(token: Any, now: float) -> dict[str, Any]:
    """What a token response says, in the grant table's terms."""
    data = dict(token)
    expires_in = data.get("expires_in")
    out: dict[str, Any] = {"access_token": str(data["access_token"]), "issued_at": now,
                           "expires_at": now + float(expires_in) if expires_in else None}
    if data.get("refresh_token"):
        out["refresh_token"] = str(data["refresh_token"])
    if data.get("scope"):
        out["scopes"] = tuple(str(data["scope"]).split())
    # Google: "refresh_token_expires_in" when the refresh token itself is time-limited (time-
    # based access); Microsoft and others: "refresh_expires_in".
    rexp = data.get("refresh_token_expires_in") or data.get("refresh_expires_in")
    if rexp:
        out["refresh_expires_at"] = now + float(rexp)
    account = _id_token_account(data.get("id_token"))
    if account:
        out["account"] = account
    return out


def _id_token_account(id_token: Any) -> str | None:
    """The account an OpenID Connect ID token names. It came straight from the token endpoint
    over TLS, which OpenID Connect Core 3.1.3.7 accepts in place of checking its signature;
    it is only shown to the user and compared with the configured username."""
    names = _id_token_names(id_token)
    return names[0] if names else None


def _id_token_names(id_token: Any) -> tuple[str, ...]:
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return ()
    import base64

    part = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except ValueError:
        return ()
    if not isinstance(claims, dict):
        return ()
    return _names(claims, ("email", "preferred_username", "upn"))


def _names(data: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
    found = (data.get(k) for k in keys)
    return tuple(dict.fromkeys(v for v in found if isinstance(v, str) and v))


# Where a provider says who signed in when its token response has no ID token (no "openid"
# scope was asked for), by (provider, transport kind): the URL, and the JSON fields naming
# the account. The token's own scopes must allow the call: Gmail's users.getProfile takes
# https://mail.google.com/ (not gmail.send alone); Graph /me takes User.Read, which a new app
# registration holds and Microsoft adds to the Graph access token once it was consented.
PROFILES: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("google", "smtp"): ("https://gmail.googleapis.com/gmail/v1/users/me/profile",
                         ("emailAddress",)),
    ("google", "gmail"): ("https://gmail.googleapis.com/gmail/v1/users/me/profile",
                          ("emailAddress",)),
    ("microsoft", "msgraph"): ("https://graph.microsoft.com/v1.0/me",
                               ("mail", "userPrincipalName")),
}


def signed_in_accounts(token: Any, cfg: OAuthSettings, transport_kind: str, *,
                       transport: httpx.BaseTransport | None = None) -> tuple[str, ...]:
    """The names of the account a sign-in was made by (an address, a user principal name...),
    best known first; empty when neither an ID token nor the provider's profile says."""
    data = dict(token)
    names = _id_token_names(data.get("id_token"))
    profile = PROFILES.get((cfg.provider, transport_kind))
    if names or profile is None or not data.get("access_token"):
        return names
    url, keys = profile
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(cfg.ca_file))
                                     if cfg.ca_file else True)
    try:
        with httpx.Client(timeout=cfg.timeout, verify=verify, trust_env=True,
                          transport=transport) as http:
            resp = http.get(url, headers={"Authorization": f"Bearer {data['access_token']}"})
            body = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as err:
        # Unknown, not refused: the caller says that the account could not be checked.
        log.warning("oauth: %s did not say who signed in: %s", url, err)
        return ()
    return _names(body, keys) if isinstance(body, dict) else ()
