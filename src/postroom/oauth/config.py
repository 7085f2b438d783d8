"""A connection's ``oauth`` table: which provider, which client, which grant.

Imported by postroom.settings (the only module that reads configuration), so it depends on
pydantic alone. The provider definitions themselves are data in postroom.oauth.providers.

::

    [[connections]]
    name = "gmail"
    transport = "smtp"                       # or "gmail", "msgraph"
    host = "smtp.gmail.com"
    port = 465
    security = "smtps"
    auth = "xoauth2"
    username = "me@gmail.com"
    oauth = { provider = "google", client_id = "123.apps.googleusercontent.com",
              client_secret_env = "GOOGLE_CLIENT_SECRET" }
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# "user": a person consents once (browser or device code) and Postroom keeps the refresh
# token; "client_credentials": Microsoft app-only (Graph), no person involved;
# "service_account": Google Workspace domain-wide delegation (a signed JWT per token).
Grant = Literal["user", "client_credentials", "service_account"]
TokenAuth = Literal["client_secret_post", "client_secret_basic", "none"]


class OAuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see settings

    provider: str = Field(min_length=1)  # google | microsoft | yahoo | generic (providers.py)
    client_id: str = ""  # the OAuth client registered with the provider
    client_secret: str | None = None  # discouraged in the file: prefer _env or _file
    client_secret_env: str | None = None  # the client secret from this environment variable
    client_secret_file: Path | None = None  # or from this file
    # The secret is kept encrypted in the database (SecretStore, name
    # "connection:<name>:oauth_client_secret"): set by the web admin or `postroom config
    # import`, read by postroom.oauth.tokens.TokenManager.secret.
    client_secret_stored: bool = False
    grant: Grant = "user"  # user: a person signs in once; or client_credentials, service_account
    tenant: str = "common"  # Microsoft: common | consumers | organizations | <tenant id>
    scopes: list[str] | None = None  # default: what the provider needs for this transport
    # Where the browser comes back; default: [oauth] public_url + /oauth/callback.
    redirect_uri: str | None = None
    # Google service account (grant = "service_account"): its JSON key file, and the
    # Workspace user it acts for (default: the connection's username or user).
    service_account_file: Path | None = None
    subject: str | None = None  # the Workspace user the service account acts for
    # A generic provider's endpoints (or any provider's, to override its defaults):
    discovery_url: str | None = None  # RFC 8414 / OpenID configuration document
    authorize_url: str | None = None
    token_url: str | None = None
    device_url: str | None = None  # RFC 8628 device authorization endpoint
    revoke_url: str | None = None  # RFC 7009
    token_auth: TokenAuth | None = None  # how the client authenticates at the token endpoint
    authorize_params: dict[str, str] = {}  # extra parameters for the authorization request
    timeout: float = Field(default=30, gt=0)  # seconds per request to the provider
    ca_file: Path | None = None  # a private CA for the provider's endpoints (company IdP)

    @model_validator(mode="after")
    def _consistent(self) -> OAuthSettings:
        given = [k for k in ("client_secret", "client_secret_env", "client_secret_file",
                             "client_secret_stored") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        if self.grant == "service_account":
            if self.service_account_file is None:
                raise ValueError('grant = "service_account" needs service_account_file (the '
                                 "JSON key of the Google service account)")
        elif not self.client_id:
            raise ValueError("client_id is required (from the provider's app registration)")
        if self.grant == "client_credentials" and not given:
            raise ValueError('grant = "client_credentials" needs a client secret '
                             "(client_secret_env or client_secret_file)")
        return self

    def secret(self, owner: str) -> str | None:
        """The client secret, from where the configuration says (None for public clients;
        postroom.secrets.resolve, whose AuthError says why one configured is unavailable).
        ``owner``: who needs it, for that error ("connection gmail")."""
        from postroom.secrets import resolve

        return resolve(owner, "client_secret", env=self.client_secret_env,
                       file=self.client_secret_file, stored=self.client_secret)

