"""The only module that reads configuration: ``postroom.toml`` plus ``POSTROOM_*`` overrides.

Precedence: environment over file over defaults. ``POSTROOM_<SECTION>__<KEY>`` overrides one
key of a section, e.g. ``POSTROOM_SERVER__SMTP_LISTEN=0.0.0.0:2525``; the value is read as a
TOML value when it parses as one (numbers, booleans, arrays), else as a string.
Connection secrets are referenced, not written here: ``password_env``, ``password_file``,
or stored encrypted in the database with ``postroom connection set-password``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from postroom.connection_settings import ConnectionBase as ConnectionBase
    from postroom.connection_settings import ConnectionPolicy as ConnectionPolicy
    from postroom.routing.rules import Route

# The [[connections]] models live in postroom.connection_settings, imported on first use:
# they bring the DKIM, OAuth and routing models, which postroom-sendmail (once per message,
# never delivering) has no use for. `from postroom.settings import ConnectionBase` still works.
_CONNECTION_MODELS = ("ConnectionBase", "ConnectionPolicy")


def __getattr__(name: str) -> type[BaseModel]:
    if name in _CONNECTION_MODELS:
        from postroom import connection_settings

        model: type[BaseModel] = getattr(connection_settings, name)
        return model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENV_PREFIX = "POSTROOM_"
DEFAULT_CONFIG = "postroom.toml"
_ENV_NOT_KEYS = {"POSTROOM_CONFIG", "POSTROOM_SECRET_KEY"}


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:2525, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


# The public name, for a feature section's own listen address (postroom.metrics).
parse_listen = _parse_listen


# defer_build: a model's validator is built when it first validates, not when its module is
# imported. postroom-sendmail starts once per message and validates only the sections its
# file has; building every model up front cost it ~15 ms.
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


SectionModel = _Section  # the base for a feature's own section model (register_section)


def check_networks(names: list[str]) -> list[str]:
    """A list of addresses or networks as a setting gives it (a feature's validator calls
    this), ValueError naming the first that is neither."""
    import ipaddress

    for net in names:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as err:
            raise ValueError(f"{net!r} is not an address or network, e.g. 127.0.0.1 or "
                             "10.0.0.0/24") from err
    return names


class ServerSettings(_Section):
    data_dir: Path = Path("postroom-data")  # database, keys, certificate (relative: to the file)
    database: str = ""  # default: sqlite:///<data_dir>/postroom.db
    smtp_listen: str = "127.0.0.1:2525"  # HOST:PORT of the SMTP listener apps hand mail to
    smtps_listen: str = ""  # implicit TLS (RFC 8314) listener, off unless set
    http_listen: str = "127.0.0.1:8025"  # HTTP API, /healthz (and later UI, OAuth); "" = off
    # Postroom's name in SMTP greetings, EHLO and Message-IDs; default: this machine's name.
    hostname: str = Field(default_factory=socket.gethostname)
    tls_cert: Path | None = None  # default: a self-signed one generated in data_dir/tls
    tls_key: Path | None = None  # the private key of tls_cert (PEM)
    secret_key_file: Path | None = None  # default: data_dir/secret.key (or POSTROOM_SECRET_KEY)
    max_message_size: int = Field(default=35 * 1024 * 1024, ge=1024)  # bytes, any door
    max_recipients: int = Field(default=1000, ge=1)  # per message, any door
    # Two privileges, two settings. trusted_networks says who may *relay*: send over SMTP
    # without AUTH (with trusted_without_auth) and AUTH without TLS (postroom.ingress.smtpd,
    # its only user). admin_networks says who may reach the pages that *administer* this
    # instance: the OAuth sign-in (/oauth/...) now, the web admin later. There an address is
    # never enough: behind a same-host TLS proxy every internet client is 127.0.0.1, so the
    # OAuth pages also want the signed single-use ticket `postroom oauth login` prints.
    trusted_networks: list[str] = ["127.0.0.1/32", "::1/128"]
    trusted_without_auth: bool = True  # clients in trusted_networks may send without AUTH
    admin_networks: list[str] = ["127.0.0.1/32", "::1/128"]
    # Names the admin and OAuth pages answer to besides localhost, 127.0.0.1, ::1, the host
    # of http_listen, of [oauth] public_url and of each redirect URI: a page served under any
    # other Host is refused, which defeats DNS rebinding (postroom.ingress.hostcheck).
    allowed_hosts: list[str] = []
    auth_failure_delay: float = Field(default=2.0, ge=0)  # seconds before a failed AUTH's answer
    # Each further failure from the same address (IPv6: /64) within 10 minutes doubles the
    # delay, across sessions, up to this (postroom.ingress.guard.FailureLimiter).
    auth_failure_max_delay: float = Field(default=60.0, ge=0)
    max_auth_failures: int = Field(default=3, ge=1)  # per SMTP session, then it is closed
    # SMTP sessions open at once, in all and per client address (IPv6: per /64; clients in
    # trusted_networks are held only to the total, of which they alone may use the last 10%).
    # Each costs a file descriptor; `postroom serve` raises its RLIMIT_NOFILE to the hard limit.
    smtp_max_sessions: int = Field(default=500, ge=1)
    smtp_max_sessions_per_ip: int = Field(default=50, ge=1)
    # Seconds without a command before a session is closed (RFC 5321 4.5.3.2.7 asks servers
    # for 5 minutes); a DATA transfer must also finish within it.
    smtp_idle_timeout: float = Field(default=300.0, gt=0)
    # Seconds a client outside trusted_networks has to authenticate before it is closed with
    # 421: it cannot send anything before, so a longer stay only holds a session.
    smtp_auth_deadline: float = Field(default=60.0, gt=0)
    worker: bool = True  # run the delivery worker inside `postroom serve`
    # SQLite's fsync: "full" on every commit (nothing accepted is lost on a power cut);
    # "normal" may lose the last commits on a power cut, never on a crash of Postroom.
    sqlite_synchronous: Literal["full", "normal"] = "full"

    @field_validator("smtp_listen", "smtps_listen", "http_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v:
            _parse_listen(v)
        return v

    @field_validator("trusted_networks", "admin_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress  # here: most configurations keep the default (start-up time)

        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @model_validator(mode="after")
    def _cert_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither (a certificate is made)")
        return self


class DeliverySettings(_Section):
    # Messages in flight per worker: more means fewer commits per message (the figures: the
    # manual's benchmarks); their bodies are bounded (queue.sql.BODY_WITH_CLAIM) and their
    # leases renewed while they wait.
    concurrency: int = Field(default=100, ge=1, le=1000)
    # Seconds a worker holds a claimed message (renewed while it works): a worker that dies
    # leaves its messages to the others after this.
    lease_seconds: float = Field(default=600, gt=0)
    min_backoff: float = Field(default=300, gt=0)  # Postfix minimal_backoff_time
    max_backoff: float = Field(default=4000, gt=0)  # Postfix maximal_backoff_time
    max_lifetime: float = Field(default=5 * 86400, gt=0)  # Postfix maximal_queue_lifetime
    poll_interval: float = Field(default=1.0, gt=0)  # seconds between looks at an idle queue
    claim_batch: int = Field(default=100, ge=1)  # messages a worker claims at once, at most
    shutdown_grace: float = Field(default=30, ge=0)  # seconds in-flight deliveries may finish
    # Circuit breaker: after this many consecutive connection-level failures a connection is
    # skipped (its chain's next connection is used) for breaker_cooldown seconds, then probed.
    breaker_failures: int = Field(default=5, ge=1)
    # Seconds a connection is skipped once breaker_failures failures in a row opened its
    # circuit breaker; then a message probes it again.
    breaker_cooldown: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _order(self) -> DeliverySettings:
        if self.max_backoff < self.min_backoff:
            raise ValueError("max_backoff must be at least min_backoff")
        return self


class HttpSettings(_Section):
    """The HTTP API (`server.http_listen`); postroom.ingress.http_front enforces these."""

    max_body_size: int = Field(default=50 * 1024 * 1024, ge=1024)  # request body, bytes
    # HTTPS on http_listen, with tls_cert/tls_key, or else server.tls_cert/tls_key (or the
    # self-signed certificate made in data_dir/tls, as for SMTP).
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Connections open at once, in all and per client address (IPv6: per /64); clients in
    # server.trusted_networks only count toward the total, whose last tenth is theirs alone.
    max_connections: int = Field(default=500, ge=10)
    max_connections_per_ip: int = Field(default=20, ge=1)
    # Requests being answered at once, counted the same way; more get 503 and Retry-After.
    max_requests: int = Field(default=200, ge=10)
    max_requests_per_ip: int = Field(default=10, ge=1)
    # Seconds for a request's line and headers to arrive, for each pause in its body, and
    # for the whole body; past any of them the client gets 408 and is closed.
    header_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    body_timeout: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _cert_pair(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither (server.tls_cert and "
                             "tls_key, or the self-signed certificate, are used)")
        return self


class OAuthSection(_Section):
    """[oauth]: what every OAuth connection shares (postroom.oauth)."""

    # Postroom's HTTP server as the user's browser reaches it; the redirect URI to register
    # with a provider is this + /oauth/callback. Default: http://<server.http_listen>.
    public_url: str = ""
    check_interval: float = Field(default=6 * 3600, ge=60)  # seconds between grant checks


class RetentionSettings(_Section):
    """What the log keeps (postroom.queue.retention). Only finished messages (sent, partial,
    failed) are touched, never mail still waiting or being sent; 0 keeps forever."""

    keep_bodies_days: float = Field(default=30, ge=0)  # then raw MIME and transcripts go
    keep_rows_days: float = Field(default=90, ge=0)  # then the log rows themselves
    interval: float = Field(default=3600, ge=60)  # seconds between runs (one node at a time)
    batch: int = Field(default=500, ge=1, le=100_000)  # rows per transaction


def parse_smtp_url(value: str) -> tuple[str, str, int]:
    """"smtp://127.0.0.1:2525" -> ("smtp", "127.0.0.1", 2525); smtps:// is implicit TLS."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("smtp", "smtps") or "/" in rest:
        raise ValueError(f"expected smtp://HOST:PORT or smtps://HOST:PORT (e.g. "
                         f"smtp://127.0.0.1:2525, Postroom's smtp_listen), got {value!r}")
    host, port = _parse_listen(rest)
    return scheme, host, port


class SendmailSettings(_Section):
    """`postroom sendmail` / `postroom-sendmail`. With `server` empty (the default) a message
    is written straight into the store, which needs write access to data_dir; with `server`
    set it is handed over SMTP to a running `postroom serve` (e.g. PHP running as www-data)."""

    server: str = ""  # "smtp://127.0.0.1:2525" or "smtps://HOST:PORT"; "" = into the store
    starttls: bool = False  # with smtp://: require STARTTLS before AUTH and the message
    username: str = ""  # an app (`postroom app add NAME`) to authenticate as
    password_env: str = ""  # the app's secret from this environment variable,
    password_file: Path | None = None  # or from this file
    ca_file: Path | None = None  # verify the server with this CA (or its self-signed cert)
    tls_verify: bool = True  # false: accept any certificate (tests only)
    timeout: float = Field(default=30, gt=0)  # seconds, per SMTP step
    domain: str = ""  # added to bare user names (root) and the Unix user; default: hostname
    # Unsendable messages are kept here (default ~/dead.letter): a file inside data_dir, or
    # ~/dead.letter itself; checked by ingress/deadletter.confine.
    dead_letter: Path | None = None
    # Folders whose configurations any user may name with `postroom-sendmail -C`; read from
    # the default configuration only (Postfix's alternate_config_directories, postconf(5)).
    alternate_config_directories: list[Path] = []

    @field_validator("alternate_config_directories")
    @classmethod
    def _alternates(cls, v: list[Path]) -> list[Path]:
        for folder in v:
            if not folder.is_absolute():
                raise ValueError(f"{str(folder)!r} is not an absolute path; give folders as "
                                 "/etc/postroom/site-a")
        return v

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        if v:
            parse_smtp_url(v)
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if v:
            from postroom.envelope import validate_address
            from postroom.exceptions import MessageError

            try:
                validate_address(f"postmaster@{v}")
            except MessageError as err:
                raise ValueError(f"{v!r} is not a domain name, e.g. example.com") from err
        return v

    @model_validator(mode="after")
    def _credentials(self) -> SendmailSettings:
        has_secret = bool(self.password_env or self.password_file)
        if self.username and not has_secret:
            raise ValueError("username is set: also set password_env or password_file")
        if has_secret and not self.username:
            raise ValueError("a password is set: also set username (the app's name)")
        return self


class PolicySettings(_Section):
    """The message policy applied to every delivery attempt, from the stored message (each
    connection may add its own; the merge rule is in postroom.policy)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              defer_build=True)
    envelope_sender: str = ""  # MAIL FROM for every message ("" = the message's own)
    from_: str = Field(default="", alias="from")  # From header, "Name <addr>"
    # "always": `from` replaces the message's From; "if_missing": only added when it has none.
    from_mode: Literal["always", "if_missing"] = "always"
    to: list[str] = []  # added to the To header and the envelope
    cc: list[str] = []  # added to the Cc header and the envelope
    bcc: list[str] = []  # added to the envelope only
    headers: dict[str, str] = {}  # added; each replaces a field of the same name

    @field_validator("envelope_sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        from postroom.policy import mailbox

        if v and mailbox(v, "envelope_sender")[0]:
            raise ValueError("envelope_sender is a bare address, without a name")
        return v

    @field_validator("from_")
    @classmethod
    def _from(cls, v: str) -> str:
        from postroom.policy import mailbox

        if v:
            mailbox(v, "from")
        return v

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _rcpts(cls, v: list[str]) -> list[str]:
        from postroom.policy import mailbox

        for item in v:
            mailbox(item, "address")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        from postroom.policy import check_headers

        check_headers(v)
        return v


_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400,
            "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(text: str) -> tuple[int, float]:
    """"50/minute" -> (50, 60.0); "500/day", "10/second", "100/15m", "20/90s" also work."""
    count, slash, period = text.replace(" ", "").partition("/")
    unit = period.lstrip("0123456789.")
    number = period[: len(period) - len(unit)] or "1"
    if len(unit) > 2 and unit.endswith("s") and unit[:-1] in _PERIODS:  # "minutes"
        unit = unit[:-1]
    if not slash or not count.isdigit() or int(count) < 1 or unit not in _PERIODS:
        raise ValueError(f"{text!r} is not a rate: write COUNT/PERIOD, e.g. \"50/minute\", "
                         "\"2000/day\" or \"100/15m\" (periods: second, minute, hour, day)")
    try:
        seconds = float(number) * _PERIODS[unit]
    except ValueError:
        raise ValueError(f"{text!r}: {number!r} is not a number of {unit}s") from None
    if seconds <= 0:
        raise ValueError(f"{text!r}: the period must be longer than zero")
    return int(count), seconds


# Every [section] of postroom.toml but [[connections]], with the model that validates it.
# A feature's own section (e.g. [admin], postroom.admin.config) is not listed here: see
# register_section.
SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "delivery": DeliverySettings,
    "http": HttpSettings,
    "sendmail": SendmailSettings,
    "policy": PolicySettings,
    "retention": RetentionSettings,
    "oauth": OAuthSection,
}


# The sections features add (name -> model). A feature's module registers its model when it
# is imported; load() imports it only when the file or the environment has that section,
# found through the "postroom.sections" entry point group (pyproject.toml). So
# postroom-sendmail, whose file has no such section, imports no feature at all.
ENTRY_POINT_GROUP = "postroom.sections"
_FEATURES: dict[str, type[BaseModel]] = {}
_FEATURE_NAMES: dict[type[BaseModel], str] = {}

SectionT = TypeVar("SectionT", bound=BaseModel)


def register_section(name: str, model: type[SectionT]) -> type[SectionT]:
    """Make ``[name]`` a section of postroom.toml validated by ``model`` (call it at import
    of the feature's module, and declare the module in the ``postroom.sections`` entry point
    group). Returns the model, so it may decorate the class."""
    if name in SECTIONS or name in ("connections", "routes"):
        raise ValueError(f"[{name}] is one of settings.py's own sections")
    if _FEATURES.get(name, model) is not model:
        raise ValueError(f"[{name}] is registered twice, by {_FEATURES[name]!r} and {model!r}")
    _FEATURES[name] = model
    _FEATURE_NAMES[model] = name
    return model


def _feature_model(name: str) -> type[BaseModel] | None:
    """The model of feature section ``name``, importing its module through the entry point
    group when it has not registered yet; None when no installed feature declares it."""
    if name not in _FEATURES:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            ep.load()  # the module registers its section as it is imported
    return _FEATURES.get(name)


def _feature_names() -> list[str]:
    """Every feature section an installed package declares (to word an error)."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(_FEATURES))


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    delivery: DeliverySettings
    connections: tuple[ConnectionBase, ...]
    config_path: Path | None
    base_dir: Path
    routes: tuple[Route, ...] = ()
    http: HttpSettings = field(default_factory=HttpSettings)
    sendmail: SendmailSettings = field(default_factory=SendmailSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    oauth: OAuthSection = field(default_factory=OAuthSection)
    # The feature sections the file or the environment gave, validated: (name, model).
    features: tuple[tuple[str, BaseModel], ...] = ()

    def section(self, model: type[SectionT]) -> SectionT:
        """A feature's section (``settings.section(AdminSettings)``): as validated from the
        file and the environment, or its defaults when they leave it out."""
        name = _FEATURE_NAMES.get(model)
        if name is None:
            raise TypeError(f"{model.__name__} is not a registered section (register_section)")
        for have, value in self.features:
            if have == name and isinstance(value, model):
                return value
        return model.model_construct()

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
        # Only POSTROOM_<SECTION>__<KEY> is an override: other POSTROOM_* names may hold the
        # user's own secrets (password_env = "POSTROOM_SMTP_PASSWORD").
        if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_KEYS or "__" not in key:
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or (parts[0] not in SECTIONS and _feature_model(parts[0]) is None):
            raise ConfigError(
                f"environment variable {key} is not understood: use "
                "POSTROOM_<SECTION>__<KEY> with a section among "
                f"{', '.join(s.upper() for s in [*SECTIONS, *_feature_names()])} (e.g. "
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


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed where ``loc`` points, following nested tables (e.g. a route's
    ``match``, a connection's ``policy``)."""
    import typing

    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            continue
        ann = model.model_fields[part].annotation
        nested = [a for a in (ann, *typing.get_args(ann))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def _explain(section: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _where(section, loc)
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            key = str(loc[-1])
            import difflib  # only to word an error

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
    # A feature section written as an array of tables ([[alerts]]): the model names the
    # field that holds the list (``array_field``).
    array_field = getattr(model, "array_field", None)
    if isinstance(data, list) and isinstance(array_field, str):
        data = {array_field: data}
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table", code="config.type")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid configuration: {_explain(name, err, model)}",
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


def _routes(items: Any, names: set[str]) -> tuple[Route, ...]:
    if items is None:
        return ()
    from postroom.routing.rules import Route

    if not isinstance(items, list):
        raise ConfigError("routes must be an array of tables: [[routes]]", code="config.type")
    out: list[Route] = []
    for i, item in enumerate(items):
        where = f"routes[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table", code="config.type")
        route: Route = _section(Route, where, item)
        for name in route.chain:
            if name not in names:
                import difflib  # only to word an error

                close = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f"did you mean {close[0]!r}?" if close else (
                    f"known: {', '.join(sorted(names)) or 'none configured'}")
                raise ConfigError(
                    f"{where}.chain names {name!r}, which is not a [[connections]] name; "
                    + hint, code="config.route.unknown_connection")
        if len(set(route.chain)) != len(route.chain):
            raise ConfigError(f"{where}.chain lists a connection twice", code="config.invalid")
        out.append(route)
    defaults = [i for i, r in enumerate(out) if r.match is None]
    if defaults and defaults[0] != len(out) - 1:
        raise ConfigError(
            f"routes[{defaults[0]}] has no match, so it takes every message and the routes "
            "after it would never be used; move it last", code="config.invalid")
    return tuple(out)


# The same checks, and the same words, for configuration stored in the database
# (postroom.store.dbconfig): an entry made in the web admin is held to the file's rules.
def validate_section(model: type[BaseModel], where: str, data: Any) -> Any:
    """``data`` validated by ``model``; ConfigError worded as for the file (``where``.key)."""
    return _section(model, where, data)


def feature_model(name: str) -> type[BaseModel] | None:
    """The model of feature section ``name`` (its module imported through the entry point
    group), or None when no installed feature declares it."""
    return _feature_model(name)


def validate_routes(items: Any, names: set[str]) -> tuple[Route, ...]:
    """A [[routes]] list checked as the file's: each chain names known connections, the
    default route (no match) comes last."""
    return _routes(items, names)


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
    connections: bool = True,
) -> Settings:
    """Read and validate the configuration.

    With ``create=True`` a missing file is written from the commented template first
    (what `postroom serve` does on a fresh machine). With ``connections=False``,
    [[connections]] and [[routes]] are neither read nor checked and come back empty: for
    postroom-sendmail, which stores mail or hands it over and never delivers it. Checking a
    connection imports its transport (asyncio, ssl...: a fifth of that command's start-up,
    paid once per message), and a typo there must not turn away mail that a running
    `postroom serve` would deliver.
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
    others = sorted(set(data) - {*SECTIONS, "connections", "routes"})
    features = {name: _feature_model(name) for name in others}
    unknown = [name for name, model in features.items() if model is None]
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: "
            f"{', '.join([*SECTIONS, *_feature_names()])}, connections, routes",
            code="config.invalid",
        )
    # A section the file and the environment leave out is its defaults, which are valid by
    # construction (tests/test_cli_config.py checks each equals a validated empty table):
    # building its validator only to check nothing would slow every command's start.
    sections: dict[str, Any] = {
        name: _section(model, name, data[name]) if name in data else model.model_construct()
        for name, model in SECTIONS.items()}
    conns = _connections(data.get("connections")) if connections else ()
    return Settings(
        **sections,
        connections=conns,
        routes=_routes(data.get("routes"), {c.name for c in conns}) if connections else (),
        config_path=cfg if cfg.exists() else None,
        base_dir=(cfg.parent if cfg.exists() else Path.cwd()).resolve(),
        features=tuple((name, _section(model, name, data[name]))
                       for name, model in features.items() if model is not None),
    )
