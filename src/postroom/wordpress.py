"""The WordPress must-use plugin that hands ``wp_mail()`` to Postroom, filled in from the
operator's choices (``postroom wordpress-plugin``).

The plugin itself is a template shipped as package data (``data/wordpress-mu-plugin.php``);
this module only checks the choices and writes each one into it as a PHP literal, so nothing
a user typed can become PHP code. Secrets stay out of the file unless ``embed_secret`` is
given: the plugin reads them from a ``wp-config.php`` constant or the environment.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from postroom import __version__
from postroom.exceptions import ConfigError

TEMPLATE = "wordpress-mu-plugin.php"
SECURITIES = ("none", "starttls", "smtps")
DEFAULT_API_SECRET = "POSTROOM_API_KEY"
DEFAULT_SMTP_SECRET = "POSTROOM_SMTP_PASSWORD"
# A PHP constant and a shell variable alike: the plugin tries both under one name.
_SECRET_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_PLACEHOLDER = re.compile(r"%%[A-Z_]+%%")


@dataclass(frozen=True, slots=True)
class PluginOptions:
    """What the plugin is told. ``api_url`` (API mode) or ``smtp_host``/``smtp_port``."""

    api_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 0
    security: str = "none"
    username: str = ""
    secret_name: str = DEFAULT_API_SECRET
    secret: str = ""  # non-empty: written into the file (--embed-secret)
    cafile: str = ""
    timeout: int = 15

    @property
    def mode(self) -> str:
        return "api" if self.api_url else "smtp"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(value: str) -> tuple[str, int]:
    """"HOST:PORT" (or "[v6]:PORT") for --smtp."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--smtp {value!r}: give HOST:PORT, e.g. 127.0.0.1:2525",
                          code="wordpress.smtp")
    return host.strip("[]"), int(port)


def check_api_url(url: str, allow_plain_http: bool) -> str:
    """The API's base URL; plain HTTP only to this machine unless allowed (the API key and
    every message would cross the network in clear)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--api {url!r}: give Postroom's HTTP address, e.g. "
                          "http://127.0.0.1:8025", code="wordpress.api")
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(f"--api {url!r}: give the base address only (no credentials, "
                          "query or fragment)", code="wordpress.api")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_plain_http:
        raise ConfigError(f"--api {url!r} is plain HTTP to another machine: the API key and "
                          "the mail would travel unencrypted; use https://, or pass "
                          "--allow-plain-http on a network you trust", code="wordpress.api")
    return url.rstrip("/")


def check_secret_name(name: str) -> str:
    if not _SECRET_NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a usable constant/variable name: use capitals, "
                          "digits and _, e.g. POSTROOM_API_KEY", code="wordpress.secret_name")
    return name


def php_literal(value: str | int | bool) -> str:
    """A PHP literal for ``value``: single-quoted strings, where only \\ and ' are special."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if any(ord(c) < 32 for c in value):
        raise ConfigError(f"{value!r}: control characters are not allowed here",
                          code="wordpress.value")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _comment_safe(text: str) -> str:
    """Text for the header's /** ... */ comment: it must never close it."""
    return text.replace("*/", "* /")


def command_line(opts: PluginOptions) -> list[str]:
    """The command that makes this plugin again (an embedded secret is never on it)."""
    cmd = ["postroom", "wordpress-plugin"]
    if opts.mode == "api":
        cmd += ["--api", opts.api_url]
    else:
        cmd += ["--smtp", f"{opts.smtp_host}:{opts.smtp_port}", "--security", opts.security]
        cmd += ["--username", opts.username] if opts.username else []
    cmd += ["--key-env", opts.secret_name, *(["--embed-secret"] if opts.secret else [])]
    cmd += ["--cafile", opts.cafile] if opts.cafile else []
    return [*cmd, "--timeout", str(opts.timeout)]


def render(opts: PluginOptions) -> str:
    """The plugin's PHP source."""
    if opts.mode == "smtp" and opts.security not in SECURITIES:
        raise ConfigError(f"--security {opts.security!r}: use one of {', '.join(SECURITIES)}",
                          code="wordpress.security")
    check_secret_name(opts.secret_name)
    if opts.mode == "api":
        mode_text = f"HTTP API at {opts.api_url}, app key from {opts.secret_name}"
    else:
        auth = (f"SMTP AUTH as {opts.username}" if opts.username else "no SMTP AUTH")
        mode_text = f"SMTP to {opts.smtp_host}:{opts.smtp_port}, {opts.security}, {auth}"
    if opts.secret:
        secret_text = ("THIS FILE CONTAINS A SECRET (--embed-secret): keep it out of version "
                       "control and backups others can read; readable by the web server only.")
    elif opts.mode == "smtp" and not opts.username:
        secret_text = "No secret is needed: Postroom trusts this host (no SMTP AUTH)."
    else:
        secret_text = (f"No secret in this file: it reads {opts.secret_name} from a "
                       f"wp-config.php constant (define('{opts.secret_name}', '...');) or the "
                       "environment.")
    values: dict[str, str | int | bool] = {
        "MODE": opts.mode, "API_URL": opts.api_url, "SMTP_HOST": opts.smtp_host,
        "SMTP_PORT": opts.smtp_port, "SECURITY": opts.security, "USERNAME": opts.username,
        "SECRET_NAME": opts.secret_name, "SECRET": opts.secret, "CAFILE": opts.cafile,
        "TIMEOUT": opts.timeout,
    }
    text = resources.files("postroom").joinpath("data", TEMPLATE).read_text("utf-8")
    header = {"MODE_TEXT": mode_text, "VERSION": __version__,
              "COMMAND": shlex.join(command_line(opts)), "SECRET_TEXT": secret_text}
    for name, value in header.items():
        text = text.replace(f"%%{name}%%", _comment_safe(value))
    for name, literal in values.items():
        text = text.replace(f"%%{name}%%", php_literal(literal))
    left = _PLACEHOLDER.search(text)
    if left:  # the template and this module disagree: a packaging mistake, not user input
        raise ConfigError(f"the plugin template has an unfilled {left.group()}",
                          code="wordpress.template")
    return text
