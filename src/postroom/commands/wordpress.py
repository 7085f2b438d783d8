"""`postroom wordpress-plugin`: print the must-use plugin that hands WordPress's wp_mail() to
Postroom (postroom.wordpress), for ``> wp-content/mu-plugins/postroom.php``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from postroom import wordpress
from postroom.commands._common import console, guard
from postroom.exceptions import ConfigError


def _options(
    api: str | None, smtp: str | None, security: str | None, username: str, key_env: str | None,
    embed_secret: bool, cafile: Path | None, timeout: int, allow_plain_http: bool,
) -> wordpress.PluginOptions:
    if (api is None) == (smtp is None):
        raise ConfigError("give --api URL (Postroom's HTTP API, e.g. http://127.0.0.1:8025) or "
                          "--smtp HOST:PORT (its SMTP listener, e.g. 127.0.0.1:2525)",
                          code="wordpress.mode")
    default_name = wordpress.DEFAULT_API_SECRET if api else wordpress.DEFAULT_SMTP_SECRET
    name = wordpress.check_secret_name(key_env or default_name)
    secret = ""
    if embed_secret:
        if smtp is not None and not username:
            raise ConfigError("--embed-secret needs --username: without it the plugin logs "
                              "in with no password", code="wordpress.embed")
        secret = os.environ.get(name, "")
        if not secret:
            raise ConfigError(f"--embed-secret copies the secret from the environment variable "
                              f"{name}, which is not set: export {name}=... first",
                              code="wordpress.embed")
    ca = ""
    if cafile is not None:
        if not cafile.is_file():
            raise ConfigError(f"--cafile {cafile}: no such file", code="wordpress.cafile")
        ca = str(cafile.resolve())
    if api is not None:
        if security is not None or username:
            raise ConfigError("--security and --username are for --smtp; the API key says "
                              "which app is sending", code="wordpress.mode")
        return wordpress.PluginOptions(
            api_url=wordpress.check_api_url(api, allow_plain_http), secret_name=name,
            secret=secret, cafile=ca, timeout=timeout)
    assert smtp is not None
    host, port = wordpress.parse_hostport(smtp)
    # Loopback: Postroom's listener trusts 127.0.0.1 and its certificate is self-signed, so
    # TLS there would only fail verification; anywhere else the password needs TLS.
    chosen = security or ("none" if wordpress.is_loopback(host) else "starttls")
    if chosen == "none" and username and not wordpress.is_loopback(host):
        raise ConfigError("--security none with --username would send the password in clear "
                          "over the network: use starttls or smtps", code="wordpress.security")
    return wordpress.PluginOptions(
        smtp_host=host, smtp_port=port, security=chosen, username=username, secret_name=name,
        secret=secret, cafile=ca, timeout=timeout)


def wordpress_plugin_cmd(
    api: Annotated[str | None, typer.Option(
        "--api", help="Hand mail to Postroom's HTTP API at this address (raw MIME, as "
        "PHPMailer composed it), e.g. http://127.0.0.1:8025", show_default=False)] = None,
    key_env: Annotated[str | None, typer.Option(
        "--key-env", help="Name of the wp-config.php constant or environment variable holding "
        "the API key or SMTP password (default POSTROOM_API_KEY; POSTROOM_SMTP_PASSWORD "
        "with --smtp)", show_default=False)] = None,
    smtp: Annotated[str | None, typer.Option(
        "--smtp", help="Hand mail to Postroom's SMTP listener instead, e.g. 127.0.0.1:2525",
        show_default=False)] = None,
    security: Annotated[str | None, typer.Option(
        "--security", help="With --smtp: none, starttls or smtps (default none to "
        "127.0.0.1, else starttls)", show_default=False)] = None,
    username: Annotated[str, typer.Option(
        "--username", help="With --smtp: log in as this app (`postroom app add NAME`); "
        "without it, no SMTP AUTH", show_default=False)] = "",
    embed_secret: Annotated[bool, typer.Option(
        "--embed-secret", help="Write the secret into the file, taken now from the "
        "environment variable named by --key-env (the file then holds it: see its header)")]
    = False,
    cafile: Annotated[Path | None, typer.Option(
        "--cafile", help="CA or certificate file that verifies Postroom's TLS certificate "
        "(https:// or --security starttls/smtps)", show_default=False)] = None,
    timeout: Annotated[int, typer.Option(
        "--timeout", min=1, max=300, help="Seconds one hand-off may take")] = 15,
    allow_plain_http: Annotated[bool, typer.Option(
        "--allow-plain-http", help="Allow an http:// --api address on another machine")]
    = False,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("wordpress-plugin").
    opts = guard(lambda: _options(api, smtp, security, username, key_env, embed_secret,
                                  cafile, timeout, allow_plain_http))
    text = guard(lambda: wordpress.render(opts))
    sys.stdout.write(text)
    if opts.secret:
        console(stderr=True).print(f"[yellow]The plugin holds the secret of {opts.secret_name}"
                                   ": keep the file private (chmod 640, owned by the web "
                                   "server's group).[/]")
