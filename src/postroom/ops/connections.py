"""Connections and routes, as an administrator changes them: the list with health and
origin, add/edit/delete (postroom.store.dbconfig, secrets encrypted), the wizard's steps
(postroom.diagnostics.wizard: plan, the recommended entry, the login check), a test send,
a probe, and the OAuth sign-in link.

Every function takes the acting :class:`~postroom.audit.Actor` and checks its role first.
Changes go through ConfigStore, which audits them (before/after, never a secret) and bumps
the configuration generation: every process (postroom.reload) picks them up within seconds.
The network work (plan, probe, login check, test send) is bounded by a deadline; the sync
ones are run from a thread by the web pages.
"""

from __future__ import annotations

import asyncio
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import ConfigError, DeliveryError, MessageError
from postroom.ops import require
from postroom.store.dbconfig import Origin, origin

if TYPE_CHECKING:
    from postroom.diagnostics.wizard import Plan
    from postroom.envelope import Envelope
    from postroom.runtime import Instance
    from postroom.settings import ConnectionBase, Settings

PLAN_TIMEOUT = 15.0  # seconds for discovery and every probe of the wizard, together
PROBE_TIMEOUT = 10.0
TEST_WAIT = 45.0  # seconds a test send is waited for before "still queued" is answered
TEST_SOURCE = "admin:test"
# The test message is tried once (its expiry is its hold, as `postroom test`): never left
# queued for later, to an address typed for a test.
TEST_EXPIRY = 60.0
# How long a test send waits for the live configuration (postroom.reload, every 2 s) to know
# a connection saved a moment ago, before queueing mail for it.
RELOAD_WAIT = 10.0
# Names the web admin's addresses take (/admin/connections/new): a connection so named
# could not be opened there.
RESERVED_NAMES = frozenset({"new"})
_FINISHED = ("sent", "partial", "failed")


@dataclass(frozen=True)
class ConnectionView:
    """One connection as the list shows it."""

    name: str
    transport: str
    server: str | None  # host:port, or None for an HTTP API transport
    origin: Origin  # FILE: locked here
    health: str  # up | degraded | down
    paused: bool
    failures: int
    last_error: str | None
    last_success_at: float | None
    oauth: bool  # signs in with OAuth
    oauth_state: str  # "" (no OAuth), "none" (not signed in), "ok", "dead"
    oauth_account: str | None
    oauth_expires_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "origin": self.origin.value}


# -- reading -----------------------------------------------------------------------------------
def list_connections(inst: Instance, actor: Actor) -> list[ConnectionView]:
    """Every connection of the effective configuration, in order (blocking: a few queries)."""
    require(actor, Role.VIEWER, "see the connections")
    from postroom.queue.status import connection_status

    settings = inst.settings
    _, states = connection_status(inst.queue, settings)
    grants = {g.connection: g for g in inst.oauth.store.all()}
    out = []
    for conn, st in zip(settings.connections, states, strict=True):
        uses_oauth = getattr(conn, "oauth", None) is not None
        grant = grants.get(conn.name)
        out.append(ConnectionView(
            name=conn.name, transport=conn.transport, server=st.server,
            origin=origin(settings, conn.name), health=st.health, paused=st.paused,
            failures=st.failures, last_error=st.last_error,
            last_success_at=st.last_success_at, oauth=uses_oauth,
            oauth_state=(grant.state if grant else "none") if uses_oauth else "",
            oauth_account=grant.account if grant else None,
            oauth_expires_at=grant.expires_at if grant else None))
    return out


def entry_of(inst: Instance, actor: Actor, name: str) -> dict[str, Any]:
    """The stored entry of connection ``name`` (the edit form's values; never a secret).
    ConfigError when it is unknown or defined in postroom.toml (locked)."""
    require(actor, Role.VIEWER, "see a connection")
    _editable(inst.settings, name)
    for entry in inst.config.connections():
        if entry.get("name") == name:
            return entry
    raise _unknown(name)


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"there is no connection named {name!r}: pick one from the list",
                       code="connection.unknown")


def _editable(settings: Settings, name: str) -> None:
    if origin(settings, name) is Origin.FILE:
        raise ConfigError(f"connection {name!r} is defined in postroom.toml: change it there "
                          "(what the file defines is locked in the web admin)",
                          code="config.locked")


def fields(transport: str) -> list[dict[str, Any]]:
    """The keys a stored connection of ``transport`` may have, from the transport's own
    settings model: name, type, kind (text, number, whole number, yes/no, file path,
    choice), choices (of a choice), default, required (the "advanced" form is made from it).
    Keys naming a file or an environment variable are left out (never stored)."""
    from pydantic_core import PydanticUndefined

    from postroom.transports import settings_model

    model = settings_model(transport, f"connections.({transport})")
    out = []
    for key, info in model.model_fields.items():
        toml = info.alias or key
        # A *_env / *_file key points at this machine and is never stored; a CA bundle is the
        # exception (store.dbconfig keeps ca_file: it is only read, to verify a server).
        if toml in ("name", "transport", "password", "api_key", "webhook_key") or (
                toml.endswith(("_env", "_file")) and toml != "ca_file"):
            continue
        default = None if info.default is PydanticUndefined else info.default
        kind, choices = _kind(info.annotation)
        out.append({"name": toml, "type": _type_name(info.annotation), "kind": kind,
                    "choices": choices, "required": info.is_required(),
                    "default": default if isinstance(default, str | int | float | bool)
                    else None, "help": info.description or ""})
    return out


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


_KINDS: dict[Any, str] = {bool: "yes/no", int: "whole number", float: "number", str: "text",
                          Path: "file path"}


def _kind(annotation: Any) -> tuple[str, list[str]]:
    """A key's kind in words for a form, and its choices when it takes one of fixed values
    (``X | None`` is taken as X: an empty field leaves the key out)."""
    args = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return "choice", [str(v) for v in typing.get_args(args[0])]
    return (_KINDS.get(args[0], "text") if len(args) == 1 else "text"), []


# -- changing ----------------------------------------------------------------------------------
def save_connection(inst: Instance, actor: Actor, entry: Mapping[str, Any], *,
                    secret: str | None = None, new: bool = False,
                    oauth_client_secret: str | None = None) -> str:
    """Store connection ``entry`` (validated by its transport's model); ``secret``: its
    password (None keeps the stored one). ``new``: refuse a name already in use. Returns the
    name. Takes effect in every process without a restart (postroom.reload)."""
    require(actor, Role.ADMIN, "add or change a connection")
    name = str(entry.get("name") or "").strip()
    if not name:
        raise ConfigError("a connection needs a name (letters, digits, '-', '_', '.')",
                          code="config.invalid")
    _editable(inst.settings, name)
    if name in RESERVED_NAMES:
        raise ConfigError(f"the name {name!r} is taken by a web admin address "
                          f"(/admin/connections/{name}): choose another name",
                          code="config.invalid")
    if new and any(c.name == name for c in inst.settings.connections):
        raise ConfigError(f"a connection named {name!r} exists already: choose another name, "
                          "or edit that one", code="config.dupe")
    inst.config.put_connection({**entry, "name": name}, secret=secret, actor=actor,
                               settings=inst.settings, oauth_client_secret=oauth_client_secret)
    refresh(inst)
    return name


def delete_connection(inst: Instance, actor: Actor, name: str) -> None:
    """Delete a connection made here (with its secrets and OAuth grant); refused for one the
    file defines, and while a route uses it (the message names the routes)."""
    require(actor, Role.ADMIN, "delete a connection")
    if not inst.config.delete_connection(name, actor=actor, settings=inst.settings):
        raise _unknown(name)
    refresh(inst)


def routes(inst: Instance, actor: Actor) -> dict[str, Any]:
    """``{"file": [...], "stored": [...]}``: the file's routes (locked) and the ones made
    here, in the order they are tried (the file's specific ones, the stored ones, then one
    default route)."""
    require(actor, Role.VIEWER, "see the routes")
    from postroom.store.dbconfig import file_settings

    file = [r.model_dump(mode="json", exclude_none=True)
            for r in file_settings(inst.settings).routes]
    return {"file": file, "stored": inst.config.routes()}


def save_routes(inst: Instance, actor: Actor, stored: list[dict[str, Any]]) -> None:
    """Replace the routes made here (a list in order); each chain must name known
    connections; a name the file uses is refused."""
    require(actor, Role.ADMIN, "change the routes")
    inst.config.put_routes(stored, actor=actor, settings=inst.settings)
    refresh(inst)


def refresh(inst: Instance) -> None:
    """Lay the database's configuration over the file's in this process now (the poller of
    postroom.reload swaps the transports within seconds; the pages show the change at once)."""
    from postroom.store.dbconfig import load

    inst.settings, _ = load(inst.settings, inst.engine)
    if "oauth" in vars(inst):
        # the sign-in button may be pressed before the poller's swap: the token manager
        # knows a new OAuth connection at once (reconfigure is idempotent)
        inst.oauth.reconfigure(inst.settings)


# -- the wizard's steps ------------------------------------------------------------------------
def wizard_plan(inst: Instance, actor: Actor, address: str, *, server: str = "",
                oauth: bool | None = None, timeout: float = PLAN_TIMEOUT,
                dns_server: str | None = None, ca_file: str = "") -> Plan:
    """Discover and probe ``address``'s submission servers (``server``: HOST[:PORT] the user
    names instead; ``ca_file``: a CA bundle on this server to trust too, for a private
    server). Blocking, bounded by ``timeout``: call it from a thread.

    The plan is made as for a person (the CLI wizard on a terminal): an option with a
    concern may be chosen, and ``Plan.concerns`` lists what the person must confirm before
    it is saved (the page asks; the JSON caller reads it from the plan)."""
    require(actor, Role.ADMIN, "run the connection wizard")
    from postroom.diagnostics.dns import Resolver
    from postroom.diagnostics.wizard import parse_server, plan
    from postroom.idn import check_address

    try:
        check_address(address)
    except MessageError as err:
        raise MessageError(f"{address!r} is not an email address: {err.message}",
                           code="wizard.address") from err
    servers = [parse_server(server)] if server.strip() else None
    ca = local_ca_file(ca_file)
    resolver = Resolver(dns_server, timeout=min(timeout, 5.0))
    return plan(address, resolver, timeout=timeout, oauth=oauth, unattended=False,
                servers=servers, ca_file=ca)


def local_ca_file(text: str) -> Path | None:
    """A CA bundle named by its path on this server ("" = none): it must be a readable file
    (its contents are only ever used to verify a server, never shown or sent)."""
    if not text.strip():
        return None
    path = Path(text.strip())
    if not path.is_absolute() or not path.is_file():
        raise ConfigError(f"CA file {text!r}: no such file on this server; give the absolute "
                          "path of a PEM bundle (e.g. /etc/ssl/private-ca.pem), or leave it "
                          "empty", code="config.ca_file")
    return path


def oauth_redirect_uri(inst: Instance) -> str:
    """The redirect URI to register at the OAuth provider for this instance (every
    connection of it shares it: [oauth] public_url, else http_listen)."""
    return f"{inst.oauth.public_url}/oauth/callback"


async def check_login(inst: Instance, actor: Actor, entry: Mapping[str, Any],
                      secret: str | None) -> DeliveryError | None:
    """The wizard's login check of an (unsaved) entry: None when it logs in, else the
    error with its transcript. Sends no mail."""
    require(actor, Role.ADMIN, "check a connection's login")
    from postroom.diagnostics.wizard import check_login as wizard_check

    return await wizard_check(entry, secret, ehlo_name=inst.settings.server.hostname)


async def probe_connection(inst: Instance, actor: Actor, name: str,
                           timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """`postroom probe` of the connection's server and port (TLS, certificate, AUTH; no
    credentials sent), as its JSON report."""
    require(actor, Role.VIEWER, "probe a connection")
    from postroom.diagnostics.probe import probe

    conn = inst.settings.connection(name)
    host = getattr(conn, "host", None)
    port = getattr(conn, "effective_port", None)
    if not host or not port:
        raise ConfigError(f"connection {name!r} ({conn.transport}) has no SMTP server to "
                          "probe", code="probe.host")
    ca = getattr(conn, "ca_file", None)
    report = await probe(host, [port], timeout=timeout, ca_file=ca,
                         server_name=getattr(conn, "tls_server_name", None),
                         implicit_tls_ports={port} if getattr(conn, "security", "") == "smtps"
                         else set(), https=False)
    await asyncio.to_thread(record, inst.engine, actor, Action.CONNECTION_TEST,
                            f"connection:{name}", {"probe": report.summary})
    result: dict[str, Any] = report.to_dict()
    return result


# -- a test send -------------------------------------------------------------------------------
def test_envelope(settings: Settings, name: str, to: str, sender: str | None, *,
                  source: str, expires_at: float | None, how: str = "") -> Envelope:
    """The test message of `postroom test NAME --to TO` (and of the wizard, and the web
    admin): from ``sender``, else the connection's username, else postroom@hostname.
    ``how``: words after the connection's name in the text (", set up by ...")."""
    from postroom.envelope import Envelope, validate_address
    from postroom.message import compose

    conn: ConnectionBase = settings.connection(name)
    from postroom.transports._settings import ApiKeySettings

    if not sender and isinstance(conn, ApiKeySettings):
        # An API provider sends only from the domains verified there: no guess would do.
        from postroom.transports import transport_class

        title = transport_class(conn.transport).title
        raise ConfigError(f"connection {name!r} sends through {title}'s API, which sends only "
                          f"from addresses of domains verified at {title}: give the sender "
                          "address (`postroom test NAME --to A --from ADDRESS`)",
                          code="config.test.sender")
    frm = sender or getattr(conn, "username", None) or f"postroom@{settings.server.hostname}"
    if "@" not in frm:  # a login that is no address (e.g. "apikey")
        frm = f"postroom@{settings.server.hostname}"
    validate_address(frm)
    validate_address(to)
    raw = compose(sender=frm, to=[to], subject=f"Postroom test via {name}",
                  text=f"This is a test message from Postroom through connection {name!r}{how}. "
                  "If you can read it, delivery works.\n")
    return Envelope(frm, [to], raw, source=source, connection=name, expires_at=expires_at)


async def test_send(inst: Instance, actor: Actor, name: str, to: str, *,
                    sender: str | None = None, wait: float = TEST_WAIT,
                    on_enqueued: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Queue a test message through ``name`` to ``to`` and wait (at most ``wait`` s) for
    the delivery worker to try it; returns ``{"id", "status", "attempts"}`` (each attempt
    with its transcript). The message is in the log like any other."""
    require(actor, Role.ADMIN, "send a test message")
    reload_deadline = time.monotonic() + RELOAD_WAIT
    while name not in inst.intake.connections and time.monotonic() < reload_deadline:
        # just saved: the live configuration swaps it in within seconds (postroom.reload)
        await asyncio.sleep(0.2)
    env = test_envelope(inst.settings, name, to, sender, source=TEST_SOURCE,
                        expires_at=time.time() + TEST_EXPIRY)
    inst.intake.check(env)
    msg_id = await inst.queue.enqueue(env)
    await asyncio.to_thread(record, inst.engine, actor, Action.CONNECTION_TEST,
                            f"connection:{name}", {"to": to, "message": msg_id})
    if on_enqueued is not None:
        on_enqueued(msg_id)
    deadline = time.monotonic() + wait
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:  # bounded by ``wait``
        found = await asyncio.to_thread(inst.queue.log.get, msg_id)
        row = found or {}
        if row.get("status") in _FINISHED or (row.get("attempts") and row.get("status") !=
                                              "sending"):
            break
        await asyncio.sleep(0.25)
    from postroom.diagnostics.advice import advice_for_attempt

    attempts = [{k: v for k, v in a.items() if k != "raw"} for a in row.get("attempts", [])]
    for attempt in attempts:
        attempt["advice"] = advice_for_attempt(attempt, settings=inst.settings)
    return {"id": msg_id, "to": to, "status": row.get("status", "queued"),
            "attempts": attempts, "last_error": row.get("last_error")}


# -- OAuth -------------------------------------------------------------------------------------
def oauth_start(inst: Instance, actor: Actor, name: str) -> dict[str, str]:
    """The single-use sign-in link of an OAuth connection (valid 15 minutes) and the
    redirect URI to register at the provider."""
    require(actor, Role.ADMIN, "sign a connection in with OAuth")
    from postroom.oauth.web import ticket

    tm = inst.oauth
    tm.config(name)  # ConfigError when it is not an OAuth connection
    return {"link": f"/oauth/start/{name}?ticket={ticket(tm.key, name)}",
            "redirect_uri": tm.redirect_uri(name)}
