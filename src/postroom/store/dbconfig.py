"""Connections, routes, policy and retention made in the web admin: stored in the database.

postroom.toml (and ``POSTROOM_*`` variables) stay the operator's word. A connection or a
named route the file defines, or a ``[policy]``/``[retention]`` key it sets, is *locked*:
shown, never changed here (ConfigError "defined in postroom.toml"). What the file leaves out
may be stored here; :func:`effective` lays it over the file's settings, the file winning any
clash (the stored entry is reported, never silently dropped).

A stored entry is validated by the same models as the file (each transport's settings model,
Route, PolicySettings, RetentionSettings) and fails with the same words. It never holds a
secret: a password or an OAuth client secret goes to the SecretStore under the name the
transport reads (:func:`secret_name`). Nor may it name an environment variable or a file
(``*_env``, ``*_file``): those are read with the server's own rights, so a web admin could
otherwise make Postroom send its key file as an SMTP password to a server of their choosing.
The one exception is ``ca_file``: a CA bundle only verifies the upstream, it is never sent.

Feature sections that opt in (``[[alerts]]``) are stored whole, their secrets apart:
postroom.store.dbfeatures.

Every change is audited (before/after, no secret) and bumps the configuration generation (a
``control`` row) in the same transaction; postroom.reload polls it in every process.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Integer, Text, cast, delete, insert, select, update

from postroom.config_load import validate_routes, validate_section
from postroom.exceptions import ConfigError
from postroom.secrets import Secret as Secret  # the names transports read; kept here too
from postroom.secrets import secret_name as secret_name
from postroom.settings import ENV_PREFIX, PolicySettings, RetentionSettings, Settings
from postroom.store.db import write_transaction
from postroom.store.schema import config_entries, control, oauth_grants
from postroom.store.schema import secrets as secrets_table

if TYPE_CHECKING:
    from postroom.audit import Actor
    from postroom.secrets import SecretStore
    from postroom.settings import ConnectionBase

log = logging.getLogger(__name__)
GENERATION = "config.generation"  # the control row every process polls (postroom.reload)
# Keys a stored entry may not have, at any depth: references read with the server's rights.
_REFERENCE_SUFFIXES = ("_env", "_file")
# Files whose content never leaves the server: a CA bundle only verifies the upstream's
# certificate (a private CA is common for an in-house relay), it is never sent anywhere.
_LOCAL_ONLY_FILES = frozenset({"ca_file"})


class Origin(enum.StrEnum):
    """Where a setting comes from (the web admin shows it; `config show` prints it)."""

    FILE = "file"
    DATABASE = "database"
    ENVIRONMENT = "environment"  # a POSTROOM_<SECTION>__<KEY> variable
    DEFAULT = "default"


class Kind(enum.StrEnum):
    """What a ``config_entries`` row holds."""

    CONNECTION = "connection"  # one row per connection, name = its name
    ROUTES = "routes"  # one row, name "": the stored [[routes]] list
    POLICY = "policy"  # one row, name "": [policy] keys
    RETENTION = "retention"  # one row, name "": [retention] keys
    FEATURE = "feature"  # one row per feature section that opts in (postroom.store.dbfeatures)


_SECTIONS: dict[Kind, type[BaseModel]] = {Kind.POLICY: PolicySettings,
                                          Kind.RETENTION: RetentionSettings}


# -- which settings came from the file ----------------------------------------------------------
# effective() returns a new Settings; origin() and the lock checks need the file's. Settings is
# a frozen dataclass holding dicts (unhashable), so it is remembered by id until collected.
_FILE_OF: dict[int, Settings] = {}


def _remember(merged: Settings, file: Settings) -> Settings:
    if merged is not file:
        _FILE_OF[id(merged)] = file
        weakref.finalize(merged, _FILE_OF.pop, id(merged), None)
    return merged


def file_settings(settings: Settings) -> Settings:
    """The file's (and environment's) settings behind ``settings``, effective or not."""
    return _FILE_OF.get(id(settings), settings)


def origin(settings: Settings, name: str) -> Origin:
    """Where connection ``name`` is defined: FILE (locked here) or DATABASE."""
    file = file_settings(settings)
    return Origin.FILE if any(c.name == name for c in file.connections) else Origin.DATABASE


def file_values(settings: Settings, kind: Kind) -> dict[str, Any]:
    """The keys of [policy] or [retention] the file or the environment sets, by TOML name."""
    model: BaseModel = getattr(file_settings(settings), kind.value)
    return model.model_dump(mode="json", by_alias=True, include=model.model_fields_set)


def _toml_key(model: type[BaseModel], field: str) -> str:
    return model.model_fields[field].alias or field


def key_origins(settings: Settings, section: str, stored: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, Origin]:
    """Where each key of ``[section]`` (any section: server, delivery, policy...) comes
    from, by its TOML name. ``stored``: the keys the database sets for that section
    (ConfigStore.policy() or .retention()); only those two are ever stored."""
    env = {k.upper() for k in (os.environ if environ is None else environ)}
    model: BaseModel = getattr(file_settings(settings), section)
    out: dict[str, Origin] = {}
    for field in type(model).model_fields:
        key = _toml_key(type(model), field)
        if f"{ENV_PREFIX}{section}__{key}".upper() in env:
            out[key] = Origin.ENVIRONMENT
        elif field in model.model_fields_set:
            out[key] = Origin.FILE
        elif stored is not None and key in stored:
            out[key] = Origin.DATABASE
        else:
            out[key] = Origin.DEFAULT
    return out


# -- checks on a stored entry -------------------------------------------------------------------
def references(data: Any, where: str = "") -> list[str]:
    """The keys of ``data``, at any depth, that name an environment variable or a file."""
    if isinstance(data, Mapping):
        out = []
        for key, value in data.items():
            if (str(key).endswith(_REFERENCE_SUFFIXES) and key not in _LOCAL_ONLY_FILES
                    and value not in (None, "")):
                out.append(f"{where}.{key}".lstrip("."))
            out += references(value, f"{where}.{key}".lstrip("."))
        return out
    return []


def _no_references(entry: Mapping[str, Any], where: str) -> None:
    refs = references(entry, where)
    if refs:
        raise ConfigError(
            f"{', '.join(refs)}: a stored connection may not name an environment variable or "
            "a file (Postroom would read it with its own rights); give the secret itself "
            "(it is stored encrypted), or define this connection in postroom.toml",
            code="config.stored.reference")


def _validate_connection(entry: Mapping[str, Any]) -> ConnectionBase:
    from postroom.transports import settings_model

    name = entry.get("name")
    where = f"connections.{name}" if isinstance(name, str) and name else "connections.?"
    model = settings_model(str(entry.get("transport", "")), where)
    conn: ConnectionBase = validate_section(model, where, dict(entry))
    return conn


def check_stored_connection(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A connection entry as it is stored: validated, no reference, no inline secret."""
    for key in ("password",):
        if entry.get(key):
            raise ConfigError(f"connections.{entry.get('name')}.{key}: a stored entry holds no "
                              "secret; give it apart (it is stored encrypted)",
                              code="config.invalid")
    _no_references(entry, f"connections.{entry.get('name')}")
    return _dump(_validate_connection(entry))


def check_stored_routes(routes: Any, names: set[str]) -> list[dict[str, Any]]:
    """A routes list as it is stored, checked as the file's against connection ``names``."""
    return [_dump(r) for r in validate_routes(routes, names)]


def check_stored_section(kind: Kind, values: Mapping[str, Any],
                         settings: Settings) -> dict[str, Any]:
    """[policy] or [retention] keys as stored: validated together with the file's keys
    (which win), and none of those. Raises ConfigError for a key the file sets."""
    fixed = file_values(settings, kind)
    locked = sorted(set(values) & set(fixed))
    if locked:
        raise _locked(f"[{kind.value}] {', '.join(locked)}")
    checked = validate_section(_SECTIONS[kind], kind.value, {**values, **fixed})
    return {k: v for k, v in _dump(checked).items() if k in values}


def _dump(conn: BaseModel) -> dict[str, Any]:
    body: dict[str, Any] = conn.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return body


def _locked(what: str) -> ConfigError:
    return ConfigError(f"{what} is defined in postroom.toml: change it there (what the file "
                       "defines is locked in the web admin)", code="config.locked")


# -- the merge --------------------------------------------------------------------------------
def merge(file: Settings, rows: Mapping[tuple[str, str], Any],
          secrets: Mapping[str, str] | None = None) -> tuple[Settings, list[str]]:
    """The file's settings with the stored entries laid over them, and what was left out
    (each with the reason and the fix). A broken stored entry is left out, never fatal.
    ``secrets``: the stored feature sections' (dbfeatures.read_secrets)."""
    notes: list[str] = []
    names = {c.name for c in file.connections}
    conns = list(file.connections)
    for (kind, name), body in sorted(rows.items()):
        if kind != Kind.CONNECTION:
            continue
        if name in names:
            notes.append(f"stored connection {name!r} is ignored: postroom.toml defines one "
                         "of that name (the file wins); delete or rename the stored one")
            continue
        try:
            _no_references(body, f"connections.{name}")
            conns.append(_validate_connection(body))
        except ConfigError as err:
            notes.append(f"stored connection {name!r} is ignored: {err.message}; fix or "
                         "delete it in the web admin (Connections)")
    known = {c.name for c in conns}
    routes = list(file.routes)
    stored_routes = rows.get((Kind.ROUTES, ""), [])
    file_named = {r.name for r in file.routes if r.name}
    kept = []
    for i, item in enumerate(stored_routes if isinstance(stored_routes, list) else []):
        try:
            route = validate_routes([item], known)[0]
        except ConfigError as err:
            notes.append(f"stored route {i + 1} is ignored: {err.message}")
            continue
        if route.name and route.name in file_named:
            notes.append(f"stored route {route.name!r} is ignored: postroom.toml defines one "
                         "of that name")
            continue
        kept.append(route)
    if kept:
        # Specific routes of the file, then the stored ones, then one default route (the
        # file's when it has one): a default placed earlier would take every message.
        defaults = [r for r in routes if r.match is None] or [r for r in kept if r.match is None]
        dropped = [r for r in kept if r.match is None and r not in defaults]
        if dropped:
            notes.append("the stored default route (no match) is ignored: postroom.toml has "
                         "one")
        routes = ([r for r in routes if r.match is not None]
                  + [r for r in kept if r.match is not None] + defaults[:1])
    sections: dict[str, Any] = {}
    for kind, model in _SECTIONS.items():
        stored = rows.get((kind, ""))
        if not stored:
            continue
        fixed = file_values(file, kind)
        clash = sorted(set(stored) & set(fixed))
        if clash:
            notes.append(f"stored [{kind.value}] {', '.join(clash)} ignored: postroom.toml "
                         "(or the environment) sets them")
        try:
            sections[kind.value] = validate_section(model, kind.value, {**stored, **fixed})
        except ConfigError as err:
            notes.append(f"stored [{kind.value}] is ignored: {err.message}")
    features = file.features
    if any(kind == Kind.FEATURE for kind, _ in rows):
        from postroom.store import dbfeatures

        features, more = dbfeatures.merged(file, rows, secrets or {}, Kind.FEATURE.value)
        notes += more
    merged = dataclasses.replace(file, connections=tuple(conns), routes=tuple(routes),
                                 features=features, **sections)
    return _remember(merged, file), notes


def read_rows(conn: Connection) -> dict[tuple[str, str], Any]:
    return {(r.kind, r.name): r.body for r in conn.execute(
        select(config_entries.c.kind, config_entries.c.name, config_entries.c.body))}


def read_generation(conn: Connection) -> int:
    value = conn.execute(select(control.c.value).where(control.c.name == GENERATION)).scalar()
    return int(value) if value else 0


def effective(settings: Settings, engine: Engine) -> Settings:
    """The file's settings + the database's connections, routes, policy and retention; the
    file wins any clash (logged). One small query; the file's settings when nothing is
    stored."""
    return load(settings, engine)[0]


def load(settings: Settings, engine: Engine) -> tuple[Settings, int]:
    """:func:`effective` and the generation it is (read first: a change committed meanwhile
    is seen again at the next poll, never missed)."""
    file = file_settings(settings)
    secrets: dict[str, str] = {}
    with engine.connect() as conn:
        generation = read_generation(conn)
        rows = read_rows(conn)
        if any(kind == Kind.FEATURE for kind, _ in rows):
            from postroom.store import dbfeatures

            secrets = dbfeatures.read_secrets(conn, dbfeatures.vault_for(file))
    if not rows:
        return file, generation
    merged, notes = merge(file, rows, secrets)
    for note in notes:
        log.warning("%s", note)
    return merged, generation


# -- the store ----------------------------------------------------------------------------------
class ConfigStore:
    """What the web admin, the API and `postroom config import` change; see the module doc."""

    def __init__(self, engine: Engine, secrets: SecretStore) -> None:
        self.engine = engine
        self.secrets = secrets

    def generation(self) -> int:
        """The configuration's generation: one primary-key read, polled by every process."""
        with self.engine.connect() as conn:
            return read_generation(conn)

    def _body(self, kind: Kind, name: str = "") -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(config_entries.c.body).where(
                config_entries.c.kind == kind.value, config_entries.c.name == name)).scalar()

    def connections(self) -> list[dict[str, Any]]:
        """The stored connections, as entered (validated; never a secret), by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(config_entries.c.body).where(
                config_entries.c.kind == Kind.CONNECTION.value).order_by(config_entries.c.name))
            return [dict(r.body) for r in rows]

    def routes(self) -> list[dict[str, Any]]:
        return list(self._body(Kind.ROUTES) or [])

    def policy(self) -> dict[str, Any]:
        return dict(self._body(Kind.POLICY) or {})

    def retention(self) -> dict[str, Any]:
        return dict(self._body(Kind.RETENTION) or {})

    def problems(self, settings: Settings) -> list[str]:
        """Stored entries left out of the effective configuration, with the reason."""
        from postroom.store import dbfeatures

        with self.engine.connect() as conn:
            rows = read_rows(conn)
            secrets = (dbfeatures.read_secrets(conn, self.secrets.vault)
                       if any(kind == Kind.FEATURE for kind, _ in rows) else {})
        return merge(file_settings(settings), rows, secrets)[1] if rows else []

    # -- writes -------------------------------------------------------------------------------
    def put_connection(self, entry: Mapping[str, Any], *, secret: str | None, actor: Actor,
                       settings: Settings, oauth_client_secret: str | None = None) -> None:
        """Add or replace a stored connection. ``secret``: its password (None keeps the
        stored one, "" removes it); ``oauth_client_secret`` likewise for its oauth table.
        A ``password`` or ``oauth.client_secret`` in ``entry`` is taken as those."""
        if not isinstance(entry, Mapping):
            raise ConfigError("a connection is a table of keys (name, transport, ...)",
                              code="config.type")
        data = dict(entry)
        inline = data.pop("password", None)
        if inline is None:  # an HTTPS API provider's key is its "password" (set-password)
            inline = data.pop("api_key", None)
        webhook_key = data.pop("webhook_key", None)  # its delivery events' signing key
        oauth: dict[str, Any] | None = None
        inline_client = None
        if isinstance(data.get("oauth"), Mapping):
            oauth = data["oauth"] = dict(data["oauth"])
            inline_client = oauth.pop("client_secret", None)
        for given, other, what in ((secret, inline, "password"),
                                   (oauth_client_secret, inline_client, "oauth.client_secret")):
            if given is not None and other is not None:
                raise ConfigError(f"{what} is given twice (in the entry and on its own): give "
                                  "it once", code="config.invalid")
        secret = secret if secret is not None else inline
        client = oauth_client_secret if oauth_client_secret is not None else inline_client
        if oauth is not None:
            oauth["client_secret_stored"] = bool(client) or (client is None and self._has_secret(
                str(data.get("name")), Secret.OAUTH_CLIENT_SECRET))
            if not oauth["client_secret_stored"]:
                del oauth["client_secret_stored"]
        body = check_stored_connection(data)
        name = body["name"]
        if origin(settings, name) is Origin.FILE:
            raise _locked(f"connection {name!r}")
        from postroom.audit import Action, record

        with write_transaction(self.engine) as conn:
            before = _row(conn, Kind.CONNECTION, name)
            put_row(conn, Kind.CONNECTION, name, body, actor)
            changed = []  # which secrets were set or removed, never their values
            from postroom.transports import password_secret

            secret_kind = password_secret(_validate_connection(body))[1]
            for value, what in ((secret, secret_kind), (client, Secret.OAUTH_CLIENT_SECRET),
                                (webhook_key, Secret.WEBHOOK_KEY)):
                if value is not None:
                    self._put_secret(conn, secret_name(name, what), value)
                    changed.append(f"{what.value} {'set' if value else 'removed'}")
            record(conn, actor, Action.CONNECTION_EDIT if before else Action.CONNECTION_ADD,
                   f"connection:{name}", {"before": before, "after": body, "stored": changed})
            bump(conn)

    def delete_connection(self, name: str, *, actor: Actor, settings: Settings) -> bool:
        """Delete a stored connection, its secrets and OAuth grant; refused while a route
        names it, or for a connection postroom.toml defines."""
        if origin(settings, name) is Origin.FILE:
            raise _locked(f"connection {name!r}")
        routes = [*file_settings(settings).routes, *self._stored_routes()]
        users = [r.name or f"route {i + 1}" for i, r in enumerate(routes) if name in r.chain]
        if users:
            raise ConfigError(f"connection {name!r} is used by {', '.join(users)}: take it out "
                              "of those routes' chains first", code="config.connection.in_use")
        from postroom.audit import Action, record

        with write_transaction(self.engine) as conn:
            before = _row(conn, Kind.CONNECTION, name)
            if before is None:
                return False
            conn.execute(delete(config_entries).where(
                config_entries.c.kind == Kind.CONNECTION.value, config_entries.c.name == name))
            conn.execute(delete(secrets_table).where(
                secrets_table.c.name.in_([secret_name(name, s) for s in Secret])))
            conn.execute(delete(oauth_grants).where(oauth_grants.c.connection == name))
            record(conn, actor, Action.CONNECTION_DELETE, f"connection:{name}",
                   {"before": before})
            bump(conn)
        return True

    def _stored_routes(self) -> list[Any]:
        from postroom.routing.rules import Route

        return [Route.model_validate(r) for r in self.routes()]

    def put_routes(self, routes: list[dict[str, Any]], *, actor: Actor,
                   settings: Settings) -> None:
        """Replace the stored routes (tried after the file's specific routes, before the
        default route). Each chain must name known connections (file or stored)."""
        if not isinstance(routes, list):
            raise ConfigError("routes are a list of tables", code="config.type")
        names = {c.name for c in effective(settings, self.engine).connections}
        body = check_stored_routes(routes, names)
        file_named = {r.name for r in file_settings(settings).routes if r.name}
        for route in body:
            if route.get("name") in file_named:
                raise _locked(f"route {route['name']!r}")
        from postroom.audit import Action, record

        with write_transaction(self.engine) as conn:
            before = _row(conn, Kind.ROUTES, "") or []
            if body:
                put_row(conn, Kind.ROUTES, "", body, actor)
            else:
                _delete_row(conn, Kind.ROUTES)
            action = (Action.ROUTE_ADD if len(body) > len(before) else Action.ROUTE_DELETE
                      if len(body) < len(before) else Action.ROUTE_EDIT)
            record(conn, actor, action, "routes", {"before": before, "after": body})
            bump(conn)

    def set_policy(self, values: Mapping[str, Any], *, actor: Actor,
                   settings: Settings) -> None:
        """Replace the stored [policy] keys; a key the file or environment sets is locked."""
        self._set_section(Kind.POLICY, values, actor, settings)

    def set_retention(self, values: Mapping[str, Any], *, actor: Actor,
                      settings: Settings) -> None:
        """Replace the stored [retention] keys; a key the file or environment sets is locked."""
        self._set_section(Kind.RETENTION, values, actor, settings)

    def _set_section(self, kind: Kind, values: Mapping[str, Any], actor: Actor,
                     settings: Settings) -> None:
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{kind.value}] is a table of keys", code="config.type")
        body = check_stored_section(kind, values, settings)
        from postroom.audit import Action, record

        with write_transaction(self.engine) as conn:
            before = _row(conn, kind, "") or {}
            if body:
                put_row(conn, kind, "", body, actor)
            else:
                _delete_row(conn, kind)
            record(conn, actor, Action.SETTINGS_CHANGE, kind.value,
                   {"before": before, "after": body})
            bump(conn)

    def feature(self, name: str) -> Any:
        """Feature section ``name`` as stored (without its secrets), or None."""
        return self._body(Kind.FEATURE, name)

    def put_feature(self, name: str, data: Any, *, actor: Actor, settings: Settings) -> None:
        """Store feature section ``name`` (one that opts in: postroom.store.dbfeatures),
        replacing the stored one; its secrets go to the secrets table, encrypted. Refused
        when postroom.toml or the environment gives the section."""
        from postroom.audit import Action, record
        from postroom.store import dbfeatures

        if name in dict(file_settings(settings).features):
            raise _locked(f"[{name}]")
        body, secrets = dbfeatures.split(name, data)
        with write_transaction(self.engine) as conn:
            before = _row(conn, Kind.FEATURE, name)
            put_row(conn, Kind.FEATURE, name, body, actor)
            dbfeatures.write_secrets(conn, self.secrets.vault, name, secrets, time.time())
            record(conn, actor, Action.SETTINGS_CHANGE, name,
                   {"before": before, "after": body, "stored": sorted(secrets)})
            bump(conn)

    def delete_feature(self, name: str, *, actor: Actor) -> bool:
        """Delete stored feature section ``name`` and its secrets; False when none is."""
        from postroom.audit import Action, record
        from postroom.store import dbfeatures

        with write_transaction(self.engine) as conn:
            before = _row(conn, Kind.FEATURE, name)
            if before is None:
                return False
            _delete_row(conn, Kind.FEATURE, name)
            dbfeatures.write_secrets(conn, self.secrets.vault, name, {}, time.time())
            record(conn, actor, Action.SETTINGS_CHANGE, name, {"before": before, "after": None})
            bump(conn)
        return True

    # -- secrets, written in the change's own transaction -------------------------------------
    def _has_secret(self, connection: str, what: Secret) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(secrets_table.c.name).where(
                secrets_table.c.name == secret_name(connection, what))).first() is not None

    def _put_secret(self, conn: Connection, name: str, value: str) -> None:
        conn.execute(delete(secrets_table).where(secrets_table.c.name == name))
        if value:
            conn.execute(insert(secrets_table).values(
                name=name, ciphertext=self.secrets.vault.encrypt(value), updated_at=time.time()))


def _row(conn: Connection, kind: Kind, name: str) -> Any:
    return conn.execute(select(config_entries.c.body).where(
        config_entries.c.kind == kind.value, config_entries.c.name == name)).scalar()


def _delete_row(conn: Connection, kind: Kind, name: str = "") -> None:
    conn.execute(delete(config_entries).where(config_entries.c.kind == kind.value,
                                              config_entries.c.name == name))


def put_row(conn: Connection, kind: Kind, name: str, body: Any, actor: Actor) -> None:
    _delete_row(conn, kind, name)
    conn.execute(insert(config_entries).values(kind=kind.value, name=name, body=body,
                                               updated_at=time.time(), updated_by=actor.label))


def bump(conn: Connection) -> None:
    """A new configuration generation, in the caller's transaction: every process reloads.
    The row exists from migration 0010 on; one UPDATE, race-free on PostgreSQL too."""
    done = conn.execute(update(control).where(control.c.name == GENERATION).values(
        value=cast(cast(control.c.value, Integer) + 1, Text), updated_at=time.time())).rowcount
    if not done:
        conn.execute(insert(control).values(name=GENERATION, value="1", updated_at=time.time()))
