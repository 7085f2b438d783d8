"""The only module that reads configuration: ``postroom.toml`` plus ``POSTROOM_*`` overrides.

Precedence: environment over file over defaults. ``POSTROOM_<SECTION>__<KEY>`` overrides one
key of a section, e.g. ``POSTROOM_SERVER__SMTP_LISTEN=0.0.0.0:2525``; the value is read as a
TOML value when it parses as one (numbers, booleans, arrays), else as a string.
Connection secrets are referenced, not written here: ``password_env``, ``password_file``,
or stored encrypted in the database with ``postroom connection set-password``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from postroom import config_values
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


# Pure parsers and names, shared with postroom-sendmail's pydantic-free loader.
ENV_PREFIX = config_values.ENV_PREFIX
DEFAULT_CONFIG = config_values.DEFAULT_CONFIG
parse_listen = config_values.parse_listen
_parse_listen = parse_listen
SIZE_UNITS = config_values.SIZE_UNITS
parse_size = config_values.parse_size
parse_smtp_url = config_values.parse_smtp_url


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
    # Total size of the stored bodies ("2GB", "500MB" or bytes); past it the oldest finished
    # messages' bodies go first, whatever their age. 0 = no limit.
    max_size: int = Field(default=0, ge=0)

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v


class LogSettings(_Section):
    """What `postroom serve` and `postroom worker` write to stderr (journald keeps it): one
    line per accepted and per finished message, plus warnings and errors."""

    format: Literal["text", "json", "logfmt"] = "text"  # json: one JSON object a line
    level: Literal["debug", "info", "warning", "error"] = "info"  # warning: no mail lines


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
    # The system log's socket (journald, rsyslog): mail stored here (server = "") gets its
    # "accepted" line there, as serve's own mail gets it on stderr; "" writes none.
    syslog: str = "/dev/log"

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
    "log": LogSettings,
}


# The sections features add (name -> model). A feature's module registers its model when it
# is imported; load() imports it only when the file or the environment has that section,
# found through the "postroom.sections" entry point group (pyproject.toml). So
# postroom-sendmail, whose file has no such section, imports no feature at all.
ENTRY_POINT_GROUP = "postroom.sections"
_FEATURES: dict[str, type[BaseModel]] = {}
_FEATURE_NAMES: dict[type[BaseModel], str] = {}
_DEFAULTS: dict[type[BaseModel], BaseModel] = {}  # Settings.section's defaults, per model

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


def feature_model(name: str) -> type[BaseModel] | None:
    """The model of feature section ``name``, importing its module through the entry point
    group when it has not registered yet; None when no installed feature declares it."""
    if name not in _FEATURES:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            ep.load()  # the module registers its section as it is imported
    return _FEATURES.get(name)


def feature_names() -> list[str]:
    """Every feature section an installed package declares (to word an error)."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(_FEATURES))


@dataclass(frozen=True)
class Settings(config_values.InstancePaths):
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
    log: LogSettings = field(default_factory=LogSettings)  # [log]: stderr's format and level
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
        if not model.model_config.get("frozen"):
            return model.model_construct()
        # One defaults object per frozen model: asked per request on hot paths (webhooks'
        # suppression settings), where building it each time cost more than the lookup, and
        # where writes group reports by their section object.
        default = _DEFAULTS.get(model)
        if default is None:
            default = _DEFAULTS[model] = model.model_construct()
        return cast(SectionT, default)

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


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    create: bool = False,
    connections: bool = True,
) -> Settings:
    """Read and validate the configuration (postroom.config_load.load: the file, the
    environment, the checks and their wording)."""
    from postroom import config_load

    return config_load.load(path, environ=environ, create=create, connections=connections)
