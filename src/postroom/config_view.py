"""The effective configuration as flat ``key = value`` items, each with where it came from
(``postroom.toml:12``, an environment variable, the database, the default), secrets masked:
what `postroom config show` prints, what a running server writes to its data folder at start
and on every reload (``effective-config.json``), and what `postroom config check` compares a
file with. Also which keys a running server applies without a restart.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from postroom.config_source import MASK as MASK
from postroom.config_source import env_name, line_of, masked
from postroom.settings import SECTIONS, Settings

SNAPSHOT = "effective-config.json"  # in the data folder; mode 600 (it names files, hosts)

# What `serve` and `worker` apply on a reload (postroom.hup); any other key changed in the
# file is reported as needing a restart and keeps its running value.
LIVE_TOP = frozenset({"connections", "routes", "policy", "retention", "oauth", "sendmail"})
LIVE_SERVER = frozenset({"tls_cert", "tls_key", "trusted_networks", "trusted_without_auth",
                         "max_recipients", "max_message_size", "max_auth_failures",
                         "smtp_auth_deadline"})
# Feature sections whose chores read the settings at each tick (postroom.server).
LIVE_FEATURES = frozenset({"alerts", "reports"})


@dataclass(frozen=True)
class Item:
    key: str  # "server.smtp_listen", "connections.primary.port", "routes[0].chain"
    value: Any  # as JSON, a secret masked
    source: str  # "postroom.toml:12", "environment POSTROOM_X__Y", "database", "default"


def needs_restart(key: str) -> bool:
    """True for a key (as :class:`Item` names it) a running server only reads at start."""
    top, _, rest = key.partition(".")
    top = top.split("[", 1)[0]
    if top in LIVE_TOP or top in LIVE_FEATURES:
        return False
    if top == "server":
        return rest.split(".", 1)[0] not in LIVE_SERVER
    return True


def _fields(model: BaseModel, prefix: str, origin: Callable[[str], str]) -> Iterable[Item]:
    """One item per field of a section model; ``origin(key)`` -> where it came from."""
    dumped = model.model_dump(mode="json", by_alias=True)
    for field, info in type(model).model_fields.items():
        key = info.alias or field
        value = dumped.get(key)
        # a path names where a secret is (server.tls_key), it is not one
        is_path = isinstance(getattr(model, field), Path)
        yield Item(f"{prefix}.{key}", value if is_path else masked(key, value), origin(key))


def _file_line(config: Path | None, text: str, loc: tuple[str | int, ...]) -> str:
    line = line_of(text, loc) if config is not None else None
    return f"{config}:{line}" if line is not None else str(config)


def items(effective: Settings, *, text: str, environ: Mapping[str, str] | None = None,
          stored: Mapping[str, Mapping[str, Any]] | None = None) -> list[Item]:
    """Every key of ``effective`` (the settings a server runs with: file, environment and
    database), with its source; ``text``: the file's content; ``stored``: the [policy] and
    [retention] keys the database sets (ConfigStore.policy()/.retention())."""
    from postroom.store.dbconfig import Origin, file_settings, key_origins, origin

    env = os.environ if environ is None else environ
    file = file_settings(effective)
    config = effective.config_path
    out: list[Item] = []
    for name in SECTIONS:
        origins = key_origins(effective, name, (stored or {}).get(name), env)

        def source(key: str, name: str = name, origins: Mapping[str, Origin] = origins) -> str:
            found = origins.get(key, Origin.DEFAULT)
            if found is Origin.ENVIRONMENT:
                return f"environment {env_name((name, key))}"
            if found is Origin.FILE:
                return _file_line(config, text, (name, key))
            return found.value
        out += _fields(getattr(effective, name), name, source)
    file_features = dict(file.features)
    for name, model in effective.features:
        mine = file_features.get(name)

        def feature_source(key: str, name: str = name, mine: BaseModel | None = mine) -> str:
            if mine is None:
                return Origin.DATABASE.value
            if any(k.upper() == env_name((name, key)) for k in env):
                return f"environment {env_name((name, key))}"
            if key in mine.model_fields_set or getattr(type(mine), "array_field", "") == key:
                return _file_line(config, text, (name,))
            return Origin.DEFAULT.value
        out += _fields(model, name, feature_source)
    file_index = {c.name: i for i, c in enumerate(file.connections)}
    for conn in effective.connections:
        body = conn.model_dump(mode="json", by_alias=True, exclude_unset=True)
        in_file = origin(effective, conn.name) is Origin.FILE
        for key, value in body.items():
            where = (_file_line(config, text, ("connections", file_index[conn.name], key))
                     if in_file else Origin.DATABASE.value)
            out.append(Item(f"connections.{conn.name}.{key}", masked(key, value), where))
    file_routes = list(file.routes)
    for i, route in enumerate(effective.routes):
        body = route.model_dump(mode="json", by_alias=True, exclude_unset=True)
        where = (_file_line(config, text, ("routes", file_routes.index(route)))
                 if route in file_routes else Origin.DATABASE.value)
        out.append(Item(f"routes[{i}]", masked("route", body), where))
    return out


def values(found: Iterable[Item]) -> dict[str, Any]:
    """key -> value, to compare two configurations."""
    return {item.key: item.value for item in found}


def changes(before: Mapping[str, Any], after: Mapping[str, Any]
            ) -> list[tuple[str, Any, Any]]:
    """(key, before, after) for each key added, removed (None) or changed; a masked secret
    compares equal to itself, so a changed secret is not seen here."""
    keys = sorted(set(before) | set(after))
    return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]


def summary(keys: Iterable[str], before: Mapping[str, Any], after: Mapping[str, Any]
            ) -> list[str]:
    """``keys`` (changed) for a person: a connection added or removed as one entry
    ("connections.b (added)"), the other keys as they are."""
    out: list[str] = []
    for key in keys:
        top, _, rest = key.partition(".")
        name = rest.partition(".")[0]
        if top == "connections" and name:
            table = f"connections.{name}."
            if not any(k.startswith(table) for k in before):
                key = f"connections.{name} (added)"
            elif not any(k.startswith(table) for k in after):
                key = f"connections.{name} (removed)"
        if key not in out:
            out.append(key)
    return out


# -- the running server's snapshot ------------------------------------------------------------
def write_snapshot(data_dir: Path, found: list[Item], *, pid: int) -> None:
    """Replace data_dir/effective-config.json (readable by the owner alone)."""
    from postroom.fsperm import open_private

    path = data_dir / SNAPSHOT
    tmp = path.with_name(path.name + ".tmp")
    doc = {"pid": pid, "written": time.time(),
           "items": [[i.key, i.value, i.source] for i in found]}
    with open_private(tmp, "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=1)
    tmp.replace(path)  # whole or absent: `config check` never reads half of one


def read_snapshot(data_dir: Path) -> list[Item] | None:
    """What the running (or last) server wrote, or None when there is no readable one."""
    try:
        doc = json.loads((data_dir / SNAPSHOT).read_text(encoding="utf-8"))
        return [Item(str(k), v, str(s)) for k, v, s in doc["items"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
