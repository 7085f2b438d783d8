"""Feature sections (``[[alerts]]``...) stored in the database, laid over postroom.toml like
the stored connections (postroom.store.dbconfig), and moved by `postroom config
export|import` (postroom.config_transfer).

A feature takes part by opting in on its section model (registered with
postroom.settings.register_section): ``stored_secrets``, a ClassVar naming the keys whose
values are secrets -- of each table, for a section of tables (``array_field``; each named
by its ``name``), else of the section. Those values go to the secrets table, encrypted,
under ``feature:<section>:<table name>:<key>`` (the value as JSON: a list of Apprise URLs
is one secret); the ``config_entries`` row (kind ``feature``, named after the section)
holds the rest, and may not name an environment variable or a file (dbconfig.references:
those are read with the server's rights). A section the file or the environment gives wins
whole: the stored one is reported and left out, never merged key by key (two sets of alert
rules would each alert).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import Connection, delete, insert, select

from postroom.config_load import validate_section
from postroom.exceptions import ConfigError
from postroom.settings import feature_model
from postroom.store.schema import secrets as secrets_table

if TYPE_CHECKING:
    from postroom.secrets import Vault
    from postroom.settings import Settings

PREFIX = "feature:"


def storable(name: str) -> type[BaseModel] | None:
    """The model of feature section ``name`` when it opts in to being stored, else None."""
    model = feature_model(name)
    return model if model is not None and hasattr(model, "stored_secrets") else None


def storable_names(settings: Settings) -> list[str]:
    """The feature sections of ``settings`` that may be stored (and exported)."""
    return [name for name, _ in settings.features if storable(name) is not None]


def _model(name: str) -> type[BaseModel]:
    model = storable(name)
    if model is None:
        raise ConfigError(f"[{name}] cannot be stored in the database: define it in "
                          "postroom.toml", code="config.feature")
    return model


def _items(model: type[BaseModel], section: BaseModel) -> list[tuple[str, BaseModel]]:
    """(table name, table) of a section: its tables, or the section itself (name "")."""
    array_field = getattr(model, "array_field", None)
    if isinstance(array_field, str):
        return [(str(getattr(item, "name", i)), item)
                for i, item in enumerate(getattr(section, array_field))]
    return [("", section)]


def secret_name(section: str, item: str, key: str) -> str:
    return f"{PREFIX}{section}:{item}:{key}"


def split(name: str, data: Any) -> tuple[Any, dict[str, str]]:
    """A section as given (a table, or a list of tables) -> what its row holds and its
    secrets by secret name. Validated as the file's section; refused when it names an
    environment variable or a file."""
    from postroom.store.dbconfig import references

    tables = data if isinstance(data, list) else [data]
    refs = [ref for i, table in enumerate(tables)
            for ref in references(table, f"[{i}]" if isinstance(data, list) else "")]
    if refs:
        raise ConfigError(
            f"[{name}] {', '.join(refs)}: a stored section may not name "
            "an environment variable or a file (Postroom would read it with its own rights); "
            "give the secret itself (it is stored encrypted), or define the section in "
            "postroom.toml", code="config.stored.reference")
    return parts(name, validate_section(_model(name), name, data))


def parts(name: str, section: BaseModel) -> tuple[Any, dict[str, str]]:
    """A validated section -> what its row holds (the keys set) and its secrets."""
    model = _model(name)
    secret_keys: tuple[str, ...] = model.stored_secrets  # type: ignore[attr-defined]
    tables, secrets = [], {}
    for item, table in _items(model, section):
        body: dict[str, Any] = table.model_dump(mode="json", exclude_unset=True)
        if item:
            body["name"] = item  # the key of its secrets, even when it is the default
        for key in secret_keys:
            value = body.pop(key, None)
            if value not in (None, "", []):
                secrets[secret_name(name, item, key)] = json.dumps(value)
        tables.append(body)
    return (tables if isinstance(getattr(model, "array_field", None), str) else tables[0]), secrets


def unsplit(name: str, body: Any, secrets: Mapping[str, str]) -> Any:
    """A stored row with its secrets put back: the section as written (not validated)."""
    model = _model(name)
    secret_keys: tuple[str, ...] = model.stored_secrets  # type: ignore[attr-defined]
    array = isinstance(getattr(model, "array_field", None), str)
    tables = body if array else [body]
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"the stored [{name}] is not a table or a list of tables",
                          code="config.type")
    full = []
    for table in tables:
        item = str(table.get("name", "")) if array else ""
        with_secrets = dict(table)
        for key in secret_keys:
            stored = secrets.get(secret_name(name, item, key))
            if stored is not None:
                with_secrets[key] = json.loads(stored)
        full.append(with_secrets)
    return full if array else full[0]


def join(name: str, body: Any, secrets: Mapping[str, str]) -> BaseModel:
    """A stored row and its secrets -> the section, validated."""
    section: BaseModel = validate_section(_model(name), name, unsplit(name, body, secrets))
    return section


def read_secrets(conn: Connection, vault: Vault) -> dict[str, str]:
    """Every stored feature secret, decrypted, by name."""
    return {r.name: vault.decrypt(r.ciphertext) for r in conn.execute(
        select(secrets_table.c.name, secrets_table.c.ciphertext)
        .where(secrets_table.c.name.like(PREFIX + "%")))}


def write_secrets(conn: Connection, vault: Vault, name: str, secrets: Mapping[str, str],
                  now: float) -> None:
    """Replace section ``name``'s stored secrets with ``secrets``, in ``conn``'s
    transaction."""
    conn.execute(delete(secrets_table).where(
        secrets_table.c.name.like(f"{PREFIX}{name}:%")))
    for secret, value in secrets.items():
        conn.execute(insert(secrets_table).values(name=secret, ciphertext=vault.encrypt(value),
                                                  updated_at=now))


def merged(file: Settings, rows: Mapping[tuple[str, str], Any], secrets: Mapping[str, str],
           kind: str) -> tuple[tuple[tuple[str, BaseModel], ...], list[str]]:
    """The file's feature sections and the stored ones it leaves out (rows of ``kind``),
    and what was left out, with the reason."""
    given = dict(file.features)
    out = list(file.features)
    notes: list[str] = []
    for (row_kind, name), body in sorted(rows.items()):
        if row_kind != kind:
            continue
        if name in given:
            notes.append(f"stored [{name}] is ignored: postroom.toml (or the environment) "
                         "defines it (the file wins); delete the stored one")
            continue
        try:
            out.append((name, join(name, body, secrets)))
        except ConfigError as err:
            notes.append(f"stored [{name}] is ignored: {err.message}")
    return tuple(out), notes


def vault_for(settings: Settings) -> Vault:
    """The instance's vault (its key file, or POSTROOM_SECRET_KEY), to read the stored
    features' secrets as the configuration is loaded."""
    from postroom.runtime import key_file
    from postroom.secrets import Vault, load_or_create_key

    return Vault(load_or_create_key(key_file(settings)))
