"""OAuth 2.0 for the connections that log in without a password.

- ``config``: a connection's ``oauth`` table (read by postroom.settings);
- ``providers``: Google, Microsoft, Yahoo and generic providers, as data;
- ``store``: grants (refresh and access tokens, encrypted) and pending authorizations;
- ``tokens``: the token provider the transports use: refresh ahead of expiry, once, under a
  lock shared by every worker and node; dead grants keep mail queued and raise alerts;
- ``flows``: authorization code with PKCE, device code, client credentials, service account;
- ``web``: ``/oauth/start/{connection}`` and ``/oauth/callback`` on Postroom's HTTP server;
- ``checks``: the periodic health check of every grant.

Importing this package is cheap: authlib and httpx are loaded only when a token is needed.
"""
