"""The only module that reads configuration: ``postroom.toml`` plus ``POSTROOM_*`` overrides.

Precedence: environment over file over defaults. ``POSTROOM_<SECTION>__<KEY>`` overrides one
key of a section, e.g. ``POSTROOM_SERVER__SMTP_LISTEN=0.0.0.0:2525``; the value is read as a
TOML value when it parses as one (numbers, booleans, arrays), else as a string.
Connection secrets are referenced, not written here: ``password_env``, ``password_file``,
or stored encrypted in the database with ``postroom connection set-password``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from postroom.exceptions import ConfigError

ENV_PREFIX = "POSTROOM_"
DEFAULT_CONFIG = "postroom.toml"
_ENV_NOT_KEYS = {"POSTROOM_CONFIG", "POSTROOM_SECRET_KEY"}


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:2525, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    data_dir: Path = Path("postroom-data")
    database: str = ""  # default: sqlite:///<data_dir>/postroom.db
    smtp_listen: str = "127.0.0.1:2525"
    smtps_listen: str = ""  # implicit TLS (RFC 8314) listener, off unless set
    http_listen: str = "127.0.0.1:8025"  # HTTP API, /healthz (and later UI, OAuth); "" = off
    hostname: str = Field(default_factory=socket.gethostname)
    tls_cert: Path | None = None  # default: a self-signed one generated in data_dir/tls
    tls_key: Path | None = None
    secret_key_file: Path | None = None  # default: data_dir/secret.key (or POSTROOM_SECRET_KEY)
    max_message_size: int = Field(default=35 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=1000, ge=1)
    trusted_networks: list[str] = ["127.0.0.1/32", "::1/128"]
    trusted_without_auth: bool = True  # clients in trusted_networks may send without AUTH
    auth_failure_delay: float = Field(default=2.0, ge=0)
    max_auth_failures: int = Field(default=3, ge=1)
    worker: bool = True  # run the delivery worker inside `postroom serve`
    sqlite_synchronous: Literal["full", "normal"] = "full"

    @field_validator("smtp_listen", "smtps_listen", "http_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v:
            _parse_listen(v)
        return v

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @model_validator(mode="after")
    def _cert_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither (a certificate is made)")
        return self


class DeliverySettings(_Section):
    concurrency: int = Field(default=10, ge=1, le=1000)
    lease_seconds: float = Field(default=600, gt=0)
    min_backoff: float = Field(default=300, gt=0)  # Postfix minimal_backoff_time
    max_backoff: float = Field(default=4000, gt=0)  # Postfix maximal_backoff_time
    max_lifetime: float = Field(default=5 * 86400, gt=0)  # Postfix maximal_queue_lifetime
    poll_interval: float = Field(default=1.0, gt=0)
    claim_batch: int = Field(default=50, ge=1)
    shutdown_grace: float = Field(default=30, ge=0)  # seconds in-flight deliveries may finish

    @model_validator(mode="after")
    def _order(self) -> DeliverySettings:
        if self.max_backoff < self.min_backoff:
            raise ValueError("max_backoff must be at least min_backoff")
        return self


class HttpSettings(_Section):
    """The HTTP API (`server.http_listen`)."""

    max_body_size: int = Field(default=50 * 1024 * 1024, ge=1024)  # request body, bytes


class SendmailSettings(_Section):
    """`postroom sendmail` / `postroom-sendmail`."""


class PolicySettings(_Section):
    """The message policy applied to every message (each connection may add its own)."""


class ConnectionBase(BaseModel):
    """Fields every connection has; each transport adds its own (transports/<kind>.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    transport: str


# Every [section] of postroom.toml but [[connections]], with the model that validates it.
SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "delivery": DeliverySettings,
    "http": HttpSettings,
    "sendmail": SendmailSettings,
    "policy": PolicySettings,
}


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    delivery: DeliverySettings
    connections: tuple[ConnectionBase, ...]
    config_path: Path | None
    base_dir: Path
    http: HttpSettings = field(default_factory=HttpSettings)
    sendmail: SendmailSettings = field(default_factory=SendmailSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self.server.data_dir).resolve()

    @property
    def database_url(self) -> str:
        return self.server.database or f"sqlite:///{self.data_dir / 'postroom.db'}"

    @property
    def smtp_listen(self) -> tuple[str, int]:
        return _parse_listen(self.server.smtp_listen)

    @property
    def smtps_listen(self) -> tuple[str, int] | None:
        return _parse_listen(self.server.smtps_listen) if self.server.smtps_listen else None

    @property
    def http_listen(self) -> tuple[str, int] | None:
        return _parse_listen(self.server.http_listen) if self.server.http_listen else None

    def connection(self, name: str) -> ConnectionBase:
        for conn in self.connections:
            if conn.name == name:
                return conn
        known = ", ".join(c.name for c in self.connections) or "none configured"
        raise ConfigError(
            f"no connection named {name!r} (known: {known}); add a [[connections]] entry "
            "with that name to postroom.toml",
            code="config.connection.unknown",
        )

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_KEYS:
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(
                f"environment variable {key} is not understood: use "
                "POSTROOM_<SECTION>__<KEY> with a section among "
                f"{', '.join(s.upper() for s in SECTIONS)} (e.g. "
                "POSTROOM_SERVER__SMTP_LISTEN=127.0.0.1:2525)",
                code="config.env",
            )
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{parts[0]}] must be a table", code="config.type")
        section[parts[1]] = _env_value(raw)


def _where(section: str, loc: tuple[int | str, ...]) -> str:
    text = section
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _explain(section: str, err: ValidationError, fields: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _where(section, loc)
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            lines.append(f"{where}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key is missing; add it")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{where} = {e.get('input')!r}: {msg}")
    return "; ".join(lines)


def _section(model: type[BaseModel], name: str, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table", code="config.type")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid configuration: {_explain(name, err, list(model.model_fields))}",
            code="config.invalid",
        ) from err


def _connections(items: Any) -> tuple[ConnectionBase, ...]:
    from postroom.transports import settings_model

    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError(
            "connections must be an array of tables: [[connections]]", code="config.type"
        )
    out: list[ConnectionBase] = []
    for i, item in enumerate(items):
        where = f"connections[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table", code="config.type")
        model = settings_model(str(item.get("transport", "")), where)
        out.append(_section(model, where, item))
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"connection names must be unique; {', '.join(dupes)} is used twice", code="config.dupe"
        )
    return tuple(out)


def search_path(environ: Mapping[str, str]) -> list[Path]:
    """Where a configuration is looked for when none is named: the current folder, then the
    user's, then the system's. Commands started by other programs (PHP's mail() runs
    `postroom-sendmail` in the web server's folder, cron in $HOME) find the system one."""
    xdg = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return [Path(DEFAULT_CONFIG), Path(xdg) / "postroom" / DEFAULT_CONFIG,
            Path("/etc/postroom") / DEFAULT_CONFIG]


def config_path_from(explicit: str | Path | None, environ: Mapping[str, str]) -> Path:
    named = explicit or environ.get("POSTROOM_CONFIG")
    if named:
        return Path(named)
    return next((p for p in search_path(environ) if p.is_file()), Path(DEFAULT_CONFIG))


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    create: bool = False,
) -> Settings:
    """Read and validate the configuration.

    With ``create=True`` a missing file is written from the commented template first
    (what `postroom serve` does on a fresh machine).
    """
    env = os.environ if environ is None else environ
    cfg = config_path_from(path, env)
    data: dict[str, Any] = {}
    if not cfg.exists() and create:
        from postroom.bootstrap import write_config_template

        write_config_template(cfg)
    if cfg.exists():
        try:
            data = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{cfg}: not valid TOML ({err}); fix the syntax at that line",
                code="config.syntax",
            ) from err
        except OSError as err:
            raise ConfigError(f"cannot read {cfg}: {err.strerror}", code="config.read") from err
    elif path is not None or "POSTROOM_CONFIG" in env:
        raise ConfigError(
            f"configuration file {cfg} does not exist; run `postroom serve --config {cfg}` "
            "once to create a commented one",
            code="config.missing",
        )
    _apply_env(data, env)
    unknown = set(data) - {*SECTIONS, "connections"}
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(SECTIONS)}, connections",
            code="config.invalid",
        )
    sections = {name: _section(model, name, data.get(name)) for name, model in SECTIONS.items()}
    return Settings(
        **sections,
        connections=_connections(data.get("connections")),
        config_path=cfg if cfg.exists() else None,
        base_dir=(cfg.parent if cfg.exists() else Path.cwd()).resolve(),
    )
