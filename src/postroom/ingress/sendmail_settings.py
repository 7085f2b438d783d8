"""The configuration as ``postroom-sendmail`` reads it, without pydantic.

The command starts once per message (PHP's mail(), cron), and importing pydantic and
building the section models' validators cost it more than everything else it does. So
:func:`load` first tries :func:`load_light`, which reads the file and the ``POSTROOM_*``
overrides with the standard library alone and takes a configuration only when every value
in it is one the models (postroom.settings) accept as it is and would keep unchanged: the
right TOML type, within its bounds, passing the same checks (listen addresses, networks,
the SMTP URL, the domain...). Anything else (a value of another type the models would
convert, a value they would refuse, an unknown key or section, a feature's section,
``[policy]``, a missing or unreadable file) gives None, and the configuration is loaded by
postroom.config_load as before, which validates it and words every error the usual way. So
the light path never accepts what the full one refuses, and never reads a value differently.

:data:`SECTIONS` mirrors the models' fields (kind, default, bounds); tests/test_sendmail_settings.py
holds it to them, field by field, and compares what both loaders make of many values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from postroom import config_values

if TYPE_CHECKING:
    from postroom.settings import Settings


# Plain classes here, not dataclasses or named tuples: building those at import (exec'ing
# their methods) cost this once-per-message command more than reading its configuration.
class Spec:
    """One key of a section: what a TOML value must be to be taken as it is."""

    __slots__ = ("default", "kind", "ok")

    def __init__(self, kind: str, default: Any, ok: Callable[[Any], bool] | None = None) -> None:
        self.kind = kind  # int, float, bool, str, path, strs (list[str]), paths, size
        self.default = default
        self.ok = ok  # the model's bounds or choices


def _ge(n: float) -> Callable[[Any], bool]:
    return lambda v: bool(v >= n)


def _gt(n: float) -> Callable[[Any], bool]:
    return lambda v: bool(v > n)


def _between(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: bool(lo <= v <= hi)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


_LOOPBACK = ["127.0.0.1/32", "::1/128"]
HOSTNAME = object()  # the server.hostname default: this machine's name (socket.gethostname)

# Every field of the section models this loader can take, with the model's default as the
# model writes it (a default is not validated: 600, not 600.0); a section not here
# ([policy], a feature's) sends the configuration down the full path.
SECTIONS: dict[str, dict[str, Spec]] = {
    "server": {
        "data_dir": Spec("path", Path("postroom-data")),
        "database": Spec("str", ""),
        "smtp_listen": Spec("str", "127.0.0.1:2525"),
        "smtps_listen": Spec("str", ""),
        "http_listen": Spec("str", "127.0.0.1:8025"),
        "hostname": Spec("str", HOSTNAME),
        "tls_cert": Spec("path", None),
        "tls_key": Spec("path", None),
        "secret_key_file": Spec("path", None),
        "max_message_size": Spec("int", 35 * 1024 * 1024, _ge(1024)),
        "max_recipients": Spec("int", 1000, _ge(1)),
        "trusted_networks": Spec("strs", _LOOPBACK),
        "trusted_without_auth": Spec("bool", True),
        "admin_networks": Spec("strs", _LOOPBACK),
        "allowed_hosts": Spec("strs", []),
        "auth_failure_delay": Spec("float", 2.0, _ge(0)),
        "auth_failure_max_delay": Spec("float", 60.0, _ge(0)),
        "max_auth_failures": Spec("int", 3, _ge(1)),
        "smtp_max_sessions": Spec("int", 500, _ge(1)),
        "smtp_max_sessions_per_ip": Spec("int", 50, _ge(1)),
        "smtp_idle_timeout": Spec("float", 300.0, _gt(0)),
        "smtp_auth_deadline": Spec("float", 60.0, _gt(0)),
        "worker": Spec("bool", True),
        "sqlite_synchronous": Spec("str", "full", _one_of("full", "normal")),
    },
    "delivery": {
        "concurrency": Spec("int", 100, _between(1, 1000)),
        "lease_seconds": Spec("float", 600, _gt(0)),
        "min_backoff": Spec("float", 300, _gt(0)),
        "max_backoff": Spec("float", 4000, _gt(0)),
        "max_lifetime": Spec("float", 5 * 86400, _gt(0)),
        "poll_interval": Spec("float", 1.0, _gt(0)),
        "claim_batch": Spec("int", 100, _ge(1)),
        "shutdown_grace": Spec("float", 30, _ge(0)),
        "breaker_failures": Spec("int", 5, _ge(1)),
        "breaker_cooldown": Spec("float", 60, _gt(0)),
    },
    "http": {
        "max_body_size": Spec("int", 50 * 1024 * 1024, _ge(1024)),
        "tls": Spec("bool", False),
        "tls_cert": Spec("path", None),
        "tls_key": Spec("path", None),
        "max_connections": Spec("int", 500, _ge(10)),
        "max_connections_per_ip": Spec("int", 20, _ge(1)),
        "max_requests": Spec("int", 200, _ge(10)),
        "max_requests_per_ip": Spec("int", 10, _ge(1)),
        "header_timeout": Spec("float", 10.0, _gt(0)),
        "read_timeout": Spec("float", 30.0, _gt(0)),
        "body_timeout": Spec("float", 300.0, _gt(0)),
    },
    "sendmail": {
        "server": Spec("str", ""),
        "starttls": Spec("bool", False),
        "username": Spec("str", ""),
        "password_env": Spec("str", ""),
        "password_file": Spec("path", None),
        "ca_file": Spec("path", None),
        "tls_verify": Spec("bool", True),
        "timeout": Spec("float", 30, _gt(0)),
        "domain": Spec("str", ""),
        "dead_letter": Spec("path", None),
        "alternate_config_directories": Spec("paths", []),
        "syslog": Spec("str", "/dev/log"),
    },
    "retention": {
        "keep_bodies_days": Spec("float", 30, _ge(0)),
        "keep_rows_days": Spec("float", 90, _ge(0)),
        "interval": Spec("float", 3600, _ge(60)),
        "batch": Spec("int", 500, _between(1, 100_000)),
        "max_size": Spec("size", 0, _ge(0)),
    },
    "oauth": {
        "public_url": Spec("str", ""),
        "check_interval": Spec("float", 6 * 3600, _ge(60)),
    },
    "log": {
        "format": Spec("str", "text", _one_of("text", "json", "logfmt")),
        "level": Spec("str", "info", _one_of("debug", "info", "warning", "error")),
    },
}


class _Refused(Exception):
    """The light path cannot vouch for this configuration: the full path takes it."""


def _value(spec: Spec, v: Any) -> Any:
    """``v`` as the model keeps it, or _Refused when the model would refuse or convert it."""
    kind, t = spec.kind, type(v)
    if kind == "float" and t in (int, float):
        v = float(v)
    elif kind == "size" and t is str:
        try:
            v = config_values.parse_size(v)
        except ValueError:
            raise _Refused from None
    elif kind == "path" and t is str:
        v = Path(v)
    elif kind in ("strs", "paths") and t is list and all(type(x) is str for x in v):
        v = [Path(x) for x in v] if kind == "paths" else list(v)
    elif not ((kind in ("int", "size") and t is int) or (kind == "bool" and t is bool)
              or (kind == "str" and t is str)):
        raise _Refused
    if spec.ok is not None and not spec.ok(v):
        raise _Refused
    return v


def _check(name: str, values: dict[str, Any], given: Mapping[str, Any]) -> None:
    """The models' own validators, on a section's values; _Refused where they would fail."""
    try:
        if name == "server":
            for key in ("smtp_listen", "smtps_listen", "http_listen"):
                if values[key]:
                    config_values.parse_listen(values[key])
            nets = [n for key in ("trusted_networks", "admin_networks") if key in given
                    for n in values[key]]
            if nets:
                import ipaddress

                for net in nets:
                    ipaddress.ip_network(net, strict=False)
        elif name == "sendmail":
            if not all(p.is_absolute() for p in values["alternate_config_directories"]):
                raise _Refused
            if values["server"]:
                config_values.parse_smtp_url(values["server"])
            if values["domain"]:
                from postroom.envelope import validate_address
                from postroom.exceptions import MessageError

                try:
                    validate_address(f"postmaster@{values['domain']}")
                except MessageError:
                    raise _Refused from None
            has_secret = bool(values["password_env"] or values["password_file"])
            if bool(values["username"]) != has_secret:
                raise _Refused
        elif name == "delivery" and values["max_backoff"] < values["min_backoff"]:
            raise _Refused
    except ValueError:
        raise _Refused from None
    if name in ("server", "http") and (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise _Refused


def _section(name: str, table: Any) -> dict[str, Any]:
    specs = SECTIONS.get(name)
    if specs is None or not isinstance(table, dict) or not set(table) <= set(specs):
        raise _Refused
    values = {key: spec.default for key, spec in specs.items()}
    values.update((key, _value(specs[key], v)) for key, v in table.items())
    _check(name, values, table)
    return values


class ServerView(SimpleNamespace):
    """What the command uses of [server]."""

    hostname: str
    data_dir: Path
    database: str
    max_message_size: int
    max_recipients: int
    sqlite_synchronous: str


class DeliveryView(SimpleNamespace):
    max_lifetime: float


class SendmailView(SimpleNamespace):
    """[sendmail], every key."""

    server: str
    starttls: bool
    username: str
    password_env: str
    password_file: Path | None
    ca_file: Path | None
    tls_verify: bool
    timeout: float
    domain: str
    dead_letter: Path | None
    alternate_config_directories: list[Path]
    syslog: str


class LightSettings(config_values.InstancePaths):
    """The parts of postroom.settings.Settings the command uses, as the models give them."""

    server: ServerView

    def __init__(self, server: ServerView, delivery: DeliveryView, sendmail: SendmailView,
                 config_path: Path, named: str | Path | None) -> None:
        self.server, self.delivery, self.sendmail = server, delivery, sendmail
        self.config_path = config_path
        self.base_dir = config_path.parent.resolve()
        self.named = named  # what load() was given, to load the full settings alike

    def full(self, environ: Mapping[str, str]) -> Settings:
        """The same configuration through postroom.config_load (e.g. to migrate the store)."""
        from postroom import settings as settings_mod

        return settings_mod.load(self.named, environ=environ, connections=False)


def _overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """config_load's POSTROOM_<SECTION>__<KEY> overrides, for this loader's sections only."""
    prefix = config_values.ENV_PREFIX
    for key, raw in environ.items():
        if not key.startswith(prefix) or key in config_values.ENV_NOT_KEYS or "__" not in key:
            continue
        parts = key[len(prefix):].lower().split("__")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise _Refused  # an error, or a feature's section: config_load says which
        table = data.setdefault(parts[0], {})
        if not isinstance(table, dict):
            raise _Refused
        table[parts[1]] = config_values.value_from_text(raw)


def load_light(path: str | Path | None, environ: Mapping[str, str]) -> LightSettings | None:
    """The configuration as config_load.load(path, connections=False) reads it, or None
    when this loader cannot vouch for it (see the module)."""
    cfg = config_values.config_path_from(path, environ)
    try:
        data = tomllib.loads(cfg.read_text(encoding="utf-8"))  # as config_load reads it
        # [[connections]] and [[routes]] are the worker's: not read (config_load alike).
        data.pop("connections", None)
        data.pop("routes", None)
        _overrides(data, environ)
        sections = {name: _section(name, table) for name, table in data.items()}
    except (_Refused, OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    server = sections.get("server") or {k: s.default for k, s in SECTIONS["server"].items()}
    if server["hostname"] is HOSTNAME:
        import socket

        server["hostname"] = socket.gethostname()
    sendmail = sections.get("sendmail") or {k: s.default
                                            for k, s in SECTIONS["sendmail"].items()}
    delivery = sections.get("delivery", {})
    return LightSettings(
        server=ServerView(**{k: server[k] for k in ServerView.__annotations__}),
        delivery=DeliveryView(max_lifetime=delivery.get(
            "max_lifetime", SECTIONS["delivery"]["max_lifetime"].default)),
        sendmail=SendmailView(**sendmail),
        config_path=cfg,
        named=path,
    )


def load(path: str | Path | None, environ: Mapping[str, str]) -> Settings | LightSettings:
    """The light settings when :func:`load_light` vouches for the configuration, else the
    full ones (postroom.config_load, with its checks and errors)."""
    light = load_light(path, environ)
    if light is not None:
        return light
    from postroom import settings as settings_mod

    return settings_mod.load(path, environ=environ, connections=False)


def default_max_message_size() -> int:
    """server.max_message_size when no configuration could be read."""
    size: int = SECTIONS["server"]["max_message_size"].default
    return size

