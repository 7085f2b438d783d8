"""The mail providers Postroom knows (providers.toml): recognised by an address's domain, a
domain's MX hosts, or a connection's host or transport."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from postroom.exceptions import ConfigError

PASSWORD_KINDS = ("account", "app", "bridge", "api_key", "none")
SECURITY = ("smtps", "starttls", "none")


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    security: str


@dataclass(frozen=True)
class Provider:
    id: str
    title: str
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()
    servers: tuple[Server, ...] = ()
    spf: tuple[str, ...] = ()
    dkim_selectors: tuple[str, ...] = ()
    oauth: str | None = None
    password: str = "account"
    username: str = "%EMAILADDRESS%"
    note: str = ""
    docs: str = ""
    # Where the facts above were checked: the provider's pages, or "unverified: ..." saying
    # that none was found (a fact from memory is marked as such, never dressed as sourced).
    sources: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def login(self, address: str) -> str:
        local, _, domain = address.rpartition("@")
        return (self.username.replace("%EMAILADDRESS%", address)
                .replace("%EMAILLOCALPART%", local).replace("%EMAILDOMAIN%", domain))

    @property
    def password_words(self) -> str:
        return {"app": "app password", "bridge": "Bridge password",
                "api_key": "API key"}.get(self.password, "password")


def _provider(item: Any, i: int) -> Provider:
    where = f"providers.toml provider[{i}]"
    if not isinstance(item, dict) or not item.get("id") or not item.get("title"):
        raise ConfigError(f"{where}: needs id and title", code="providers.invalid")
    servers = []
    for s in item.get("servers", []):
        if s.get("security") not in SECURITY or not isinstance(s.get("port"), int):
            raise ConfigError(f"{where}: bad server {s}", code="providers.invalid")
        servers.append(Server(str(s["host"]).lower(), int(s["port"]), str(s["security"])))
    if item.get("password", "account") not in PASSWORD_KINDS:
        raise ConfigError(f"{where}: password must be one of {PASSWORD_KINDS}",
                          code="providers.invalid")
    known = {"id", "title", "domains", "mx", "hosts", "transports", "servers", "spf",
             "dkim_selectors", "oauth", "password", "username", "note", "docs", "sources"}
    unknown = set(item) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}", code="providers.invalid")

    def strings(key: str) -> tuple[str, ...]:
        return tuple(str(v).lower() for v in item.get(key, ()))

    return Provider(
        id=str(item["id"]), title=str(item["title"]), domains=strings("domains"),
        mx=strings("mx"), hosts=strings("hosts"), transports=strings("transports"),
        servers=tuple(servers), spf=strings("spf"),
        dkim_selectors=tuple(str(s) for s in item.get("dkim_selectors", ())),
        oauth=item.get("oauth"), password=str(item.get("password", "account")),
        username=str(item.get("username", "%EMAILADDRESS%")), note=str(item.get("note", "")),
        docs=str(item.get("docs", "")), sources=tuple(str(u) for u in item.get("sources", ())))


def load(text: str) -> tuple[Provider, ...]:
    data = tomllib.loads(text)
    providers = tuple(_provider(p, i) for i, p in enumerate(data.get("provider", [])))
    ids = [p.id for p in providers]
    if len(set(ids)) != len(ids):
        raise ConfigError("providers.toml: duplicate ids", code="providers.invalid")
    return providers


@cache
def table() -> tuple[Provider, ...]:
    text = resources.files("postroom.diagnostics").joinpath("providers.toml").read_text("utf-8")
    return load(text)


def by_id(pid: str) -> Provider | None:
    return next((p for p in table() if p.id == pid), None)


def by_domain(domain: str) -> Provider | None:
    d = domain.lower().rstrip(".")
    return next((p for p in table() if d in p.domains), None)


def _best(name: str, patterns: list[tuple[str, Provider]]) -> Provider | None:
    """The provider whose matching pattern is the most specific (the longest): mx-aol.*
    before *.yahoodns.net, *.olc.protection.outlook.com before *.protection.outlook.com."""
    name = name.lower().rstrip(".")
    hits = [(len(pat), p) for pat, p in patterns if fnmatch.fnmatchcase(name, pat)]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def by_mx(host: str) -> Provider | None:
    return _best(host, [(pat, p) for p in table() for pat in p.mx])


def by_host(host: str) -> Provider | None:
    """The provider a connection's submission host belongs to (smtp.sendgrid.net...).
    Loopback is left out: a local relay or bridge is not the provider's own host."""
    if host.startswith("127.") or host in ("::1", "localhost"):
        return None
    return _best(host, [(pat, p) for p in table() for pat in p.hosts])


def by_transport(kind: str) -> Provider | None:
    return next((p for p in table() if kind.lower() in p.transports), None)
