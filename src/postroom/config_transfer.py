"""Move a configuration between instances: one versioned JSON document of connections
(the file's too, marked), routes, policy, retention, apps and the feature sections that may
be stored (``[[alerts]]``: postroom.store.dbfeatures; the file's too, marked), with the
secrets (connection passwords, OAuth client secrets, OAuth grants, the features' secrets
such as alert channel URLs and webhook keys) encrypted under a key derived from the user's
passphrase (scrypt, AES-256-GCM: postroom.passcrypt), or left out. Never in plaintext.

`postroom config export|import` and the web admin's Settings page call :func:`export_config`
and :func:`import_config`.

What cannot move: an app's secret is a keyed hash under the source instance's key, so import
creates each app with a NEW secret, returned once (:attr:`ImportReport.app_secrets`). What is
not imported, listed in :attr:`ImportReport.skipped` with the reason: a connection or named
route the target's postroom.toml defines (the file wins), a [policy]/[retention] key it sets,
a file connection that names an environment variable or a file (define it in the target's
postroom.toml), a route whose chain names a connection that is not there, an app that exists,
a feature section the target's postroom.toml gives, or one that names an environment variable
or a file, or does not validate (a rule whose channels were left out with the secrets).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select

from postroom.exceptions import ConfigError
from postroom.passcrypt import SCRYPT, check_passphrase, cost_allowed, derive_key
from postroom.store import dbconfig, dbfeatures
from postroom.store.db import write_transaction
from postroom.store.schema import oauth_grants
from postroom.store.schema import secrets as secrets_table

if TYPE_CHECKING:
    from postroom.audit import Actor
    from postroom.runtime import Instance
    from postroom.settings import Settings

FORMAT = "postroom-config"
VERSION = 1
_AAD = f"{FORMAT}/{VERSION}".encode()
_GRANT_SECRETS = ("access_token", "refresh_token")


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)  # "connection mine", "routes (2)"...
    skipped: list[str] = field(default_factory=list)  # each with its reason
    app_secrets: dict[str, str] = field(default_factory=dict)  # app -> its NEW secret
    secrets: bool = False  # secrets were in the file and were imported


def _seal(payload: Mapping[str, Any], passphrase: str) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = os.urandom(16), os.urandom(12)
    key = derive_key(passphrase, salt, **SCRYPT)
    data = AESGCM(key).encrypt(nonce, json.dumps(payload).encode(), _AAD)
    b64 = base64.b64encode
    return {"kdf": {"name": "scrypt", **SCRYPT, "salt": b64(salt).decode()},
            "cipher": "AES-256-GCM", "nonce": b64(nonce).decode(), "data": b64(data).decode()}


def _open(sealed: Any, passphrase: str) -> dict[str, Any]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    bad = ConfigError("the secrets section of the export is damaged; export again",
                      code="config.import.damaged")
    try:
        kdf = sealed["kdf"]
        cost = {k: int(kdf[k]) for k in ("n", "r", "p")}
        salt = base64.b64decode(kdf["salt"])
        nonce = base64.b64decode(sealed["nonce"])
        data = base64.b64decode(sealed["data"])
    except (KeyError, TypeError, ValueError) as err:
        raise bad from err
    if kdf.get("name") != "scrypt" or sealed.get("cipher") != "AES-256-GCM" or not (
            cost_allowed(cost)) or len(nonce) != 12:
        raise bad
    try:
        plain = AESGCM(derive_key(passphrase, salt, **cost)).decrypt(nonce, data, _AAD)
    except (InvalidTag, ValueError) as err:
        raise ConfigError("wrong passphrase (or the file was altered): nothing was imported",
                          code="config.import.passphrase") from err
    payload: dict[str, Any] = json.loads(plain)
    return payload


# -- export -----------------------------------------------------------------------------------
def _connection_entries(eff: Settings) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every connection (file and stored), without inline secrets; those come back apart."""
    out: list[dict[str, Any]] = []
    inline: dict[str, str] = {}
    for conn in eff.connections:
        body: dict[str, Any] = conn.model_dump(mode="json", by_alias=True, exclude_unset=True)
        password = body.pop("password", None)
        if password:
            inline[dbconfig.secret_name(conn.name, dbconfig.Secret.PASSWORD)] = password
        for key, what in (("api_key", dbconfig.Secret.API_KEY),
                          ("webhook_key", dbconfig.Secret.WEBHOOK_KEY)):
            value = body.pop(key, None)  # an HTTPS API provider's, inline in the file
            if value:
                inline[dbconfig.secret_name(conn.name, what)] = value
        oauth = body.get("oauth")
        client = conn.oauth.client_secret if conn.oauth is not None else None
        if isinstance(oauth, dict) and client:  # inline in the file: moved to the secrets
            del oauth["client_secret"]
            oauth["client_secret_stored"] = True
            inline[dbconfig.secret_name(conn.name, dbconfig.Secret.OAUTH_CLIENT_SECRET)] = client
        out.append({"origin": dbconfig.origin(eff, conn.name).value, "entry": body})
    return out, inline


def export_config(inst: Instance, *, passphrase: str | None, actor: Actor) -> dict[str, Any]:
    """The instance's configuration as one JSON-able document. ``passphrase`` None: without
    secrets (never in plaintext). Audited."""
    from postroom.audit import Action, record

    if passphrase is not None:
        check_passphrase(passphrase)
    eff = dbconfig.effective(inst.settings, inst.engine)  # as stored now, not at start
    connections, inline = _connection_entries(eff)
    features, feature_secrets = _feature_entries(eff)
    names = {c["entry"]["name"] for c in connections}
    file_routes = {id(r) for r in dbconfig.file_settings(eff).routes}
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "exported_at": time.time(),
        "connections": connections,
        "routes": [{"origin": (dbconfig.Origin.FILE if id(r) in file_routes
                               else dbconfig.Origin.DATABASE).value,
                    "route": r.model_dump(mode="json", by_alias=True, exclude_unset=True)}
                   for r in eff.routes],
        "policy": _set_keys(eff.policy),
        "retention": _set_keys(eff.retention),
        "apps": [{"name": a["name"], "senders": a["allowed_senders"] or [],
                  "connections": a["allowed_connections"] or [], "rate": a["rate_limit"]}
                 for a in inst.apps.list()],
        "features": features,
        "secrets": None,
    }
    if passphrase is not None:
        doc["secrets"] = _seal({**_secrets_of(inst, names, inline),
                                "feature_secrets": feature_secrets}, passphrase)
    with write_transaction(inst.engine) as conn:
        record(conn, actor, Action.CONFIG_EXPORT, "config",
               {"connections": sorted(names), "with_secrets": passphrase is not None})
    return doc


def _feature_entries(eff: Settings) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The feature sections that may be stored (file and stored), without their secrets;
    those come back apart, by secret name."""
    file = set(dict(dbconfig.file_settings(eff).features))
    out: list[dict[str, Any]] = []
    secrets: dict[str, str] = {}
    for name in dbfeatures.storable_names(eff):
        body, found = dbfeatures.parts(name, dict(eff.features)[name])
        secrets.update(found)
        out.append({"origin": (dbconfig.Origin.FILE if name in file
                               else dbconfig.Origin.DATABASE).value,
                    "section": name, "entry": body})
    return out, secrets


def _import_features(doc: Mapping[str, Any], file: Settings, secrets: Mapping[str, str],
                     report: ImportReport) -> dict[str, tuple[Any, dict[str, str]]]:
    """The export's feature sections as their rows and secrets; what cannot be stored
    here is in ``report.skipped``."""
    out: dict[str, tuple[Any, dict[str, str]]] = {}
    given = dict(file.features)
    for item in _list(doc, "features"):
        name = str(item.get("section", ""))
        if dbfeatures.storable(name) is None:
            report.skipped.append(f"[{name}]: not a section this Postroom stores")
        elif name in given:
            report.skipped.append(f"[{name}]: postroom.toml defines it")
        else:
            mine = {k: v for k, v in secrets.items() if isinstance(k, str)
                    and k.startswith(f"{dbfeatures.PREFIX}{name}:") and isinstance(v, str)}
            try:
                out[name] = dbfeatures.split(name, dbfeatures.unsplit(
                    name, item.get("entry"), mine))
            except ConfigError as err:
                report.skipped.append(f"[{name}]: {err.message}")
    return out


def _set_keys(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = model.model_dump(mode="json", by_alias=True,
                                           include=model.model_fields_set)
    return out


def _secrets_of(inst: Instance, names: set[str], inline: dict[str, str]) -> dict[str, Any]:
    vault = inst.secrets.vault
    wanted = {dbconfig.secret_name(n, s) for n in names for s in dbconfig.Secret}
    with inst.engine.connect() as conn:
        stored = {r.name: vault.decrypt(r.ciphertext) for r in conn.execute(
            select(secrets_table.c.name, secrets_table.c.ciphertext)) if r.name in wanted}
        grants = [dict(r._mapping) for r in conn.execute(select(oauth_grants))
                  if r.connection in names]
    for grant in grants:
        for key in _GRANT_SECRETS:
            if grant[key] is not None:
                grant[key] = vault.decrypt(grant[key])
    return {"secrets": {**stored, **inline}, "oauth_grants": grants}


# -- import -----------------------------------------------------------------------------------
def parse(text: str | bytes) -> dict[str, Any]:
    """The export document, checked for its format marker and version."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"not a Postroom configuration export (not JSON: {err})",
                          code="config.import.format") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError("not a Postroom configuration export (no \"format\": "
                          f"\"{FORMAT}\"); make one with `postroom config export`",
                          code="config.import.format")
    if doc.get("version") != VERSION:
        raise ConfigError(f"this export is version {doc.get('version')!r}; this Postroom "
                          f"reads version {VERSION}: export it again, or upgrade Postroom",
                          code="config.import.version")
    return doc


def import_config(inst: Instance, doc: Mapping[str, Any], *, passphrase: str | None,
                  actor: Actor, skip_secrets: bool = False) -> ImportReport:
    """Import ``doc`` (see :func:`parse`) into ``inst``: connections, routes, policy and
    retention in one transaction (nothing at all on any error, a wrong passphrase included),
    then the apps, with new secrets. Audited."""
    from postroom.apps import check_name, check_sender_rule
    from postroom.audit import Action, record

    report = ImportReport()
    payload: dict[str, Any] = {"secrets": {}, "oauth_grants": []}
    if doc.get("secrets") is not None and not skip_secrets:
        if passphrase is None:
            raise ConfigError("this export holds encrypted secrets: give its passphrase, or "
                              "import without them (--no-secrets)", code="config.passphrase")
        payload = _open(doc["secrets"], passphrase)
        report.secrets = True
    eff = dbconfig.effective(inst.settings, inst.engine)
    file = dbconfig.file_settings(eff)
    rows: dict[str, dict[str, Any]] = {}
    for item in _list(doc, "connections"):
        entry = dict(item.get("entry") or {})
        name = str(entry.get("name", ""))
        if dbconfig.origin(file, name) is dbconfig.Origin.FILE:
            report.skipped.append(f"connection {name}: postroom.toml defines one of that name")
            continue
        if dbconfig.references(entry):
            report.skipped.append(f"connection {name}: it names an environment variable or a "
                                  "file; define it in postroom.toml")
            continue
        rows[name] = dbconfig.check_stored_connection(entry)
    names = {c.name for c in eff.connections} | set(rows)
    routes, file_named = [], {r.name for r in file.routes if r.name}
    for item in _list(doc, "routes"):
        route = dict(item.get("route") or {})
        missing = [n for n in route.get("chain", []) if n not in names]
        if missing or route.get("name") in file_named:
            why = (f"its chain names {', '.join(map(str, missing))}, not here" if missing
                   else "postroom.toml defines one of that name")
            report.skipped.append(f"route {route.get('name') or route.get('chain')}: {why}")
            continue
        routes.append(route)
    sections = {kind: _unlocked(doc, kind, inst, report) for kind in (
        dbconfig.Kind.POLICY, dbconfig.Kind.RETENTION)}
    features = _import_features(doc, file, payload.get("feature_secrets") or {}, report)
    apps = [a for a in _list(doc, "apps") if isinstance(a.get("name"), str)]
    for app in apps:
        check_name(app["name"])
        for rule in app.get("senders") or []:
            check_sender_rule(rule)
    with write_transaction(inst.engine) as conn:
        for name, body in rows.items():
            dbconfig.put_row(conn, dbconfig.Kind.CONNECTION, name, body, actor)
            report.imported.append(f"connection {name}")
        if routes:
            checked = dbconfig.check_stored_routes(routes, names)
            dbconfig.put_row(conn, dbconfig.Kind.ROUTES, "", checked, actor)
            report.imported.append(f"routes ({len(checked)})")
        for kind, values in sections.items():
            if values:
                dbconfig.put_row(conn, kind, "", values, actor)
                report.imported.append(f"[{kind.value}] {', '.join(sorted(values))}")
        for name, (body, secrets) in features.items():
            dbconfig.put_row(conn, dbconfig.Kind.FEATURE, name, body, actor)
            dbfeatures.write_secrets(conn, inst.secrets.vault, name, secrets, time.time())
            report.imported.append(f"[{name}]")
        _write_secrets(conn, inst, payload, set(rows))
        record(conn, actor, Action.CONFIG_IMPORT, "config",
               {"imported": report.imported, "skipped": report.skipped,
                "with_secrets": report.secrets})
        dbconfig.bump(conn)
    _import_apps(inst, apps, report)
    return report


def _list(doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"the export's {key!r} is not a list of tables; export again",
                          code="config.import.format")
    return items


def _unlocked(doc: Mapping[str, Any], kind: dbconfig.Kind, inst: Instance,
              report: ImportReport) -> dict[str, Any]:
    values = doc.get(kind.value) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"the export's {kind.value!r} is not a table; export again",
                          code="config.import.format")
    fixed = dbconfig.file_values(inst.settings, kind)
    for key in sorted(set(values) & set(fixed)):
        report.skipped.append(f"[{kind.value}] {key}: postroom.toml or the environment sets it")
    kept = {k: v for k, v in values.items() if k not in fixed}
    return dbconfig.check_stored_section(kind, kept, inst.settings) if kept else {}


def _write_secrets(conn: Any, inst: Instance, payload: Mapping[str, Any],
                   names: set[str]) -> None:
    vault = inst.secrets.vault
    prefixes = tuple(f"connection:{n}:" for n in names)
    for name, value in (payload.get("secrets") or {}).items():
        if isinstance(name, str) and name.startswith(prefixes) and isinstance(value, str):
            conn.execute(delete(secrets_table).where(secrets_table.c.name == name))
            conn.execute(insert(secrets_table).values(
                name=name, ciphertext=vault.encrypt(value), updated_at=time.time()))
    for grant in payload.get("oauth_grants") or []:
        if not isinstance(grant, dict) or grant.get("connection") not in names:
            continue
        row = {c.name: grant.get(c.name) for c in oauth_grants.columns}
        for key in _GRANT_SECRETS:
            if row[key] is not None:
                row[key] = vault.encrypt(str(row[key]))
        conn.execute(delete(oauth_grants).where(oauth_grants.c.connection == row["connection"]))
        conn.execute(insert(oauth_grants).values(**row))


def _import_apps(inst: Instance, apps: list[dict[str, Any]], report: ImportReport) -> None:
    known = {a["name"] for a in inst.apps.list()}
    for app in apps:
        name = app["name"]
        if name in known:
            report.skipped.append(f"app {name}: one of that name exists (its secret is kept)")
            continue
        report.app_secrets[name] = inst.apps.add(
            name, senders=app.get("senders") or (), connections=app.get("connections") or (),
            rate=app.get("rate"))
        report.imported.append(f"app {name}")
