"""Adding a ``[[connections]]`` entry to the user's postroom.toml without disturbing it.

The file is never rewritten: the new entry is appended as a commented block, after the
whole result (the old text plus the block) has been parsed and validated exactly as
``postroom serve`` would load it. A name already in use is refused with the fix.
"""

from __future__ import annotations

import json
import os
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from postroom.exceptions import ConfigError
from postroom.fsperm import open_private


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a TOML basic string (json never writes the "\/" escape).
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def connection_block(entry: Mapping[str, Any], comments: Sequence[str] = ()) -> str:
    lines = [f"# {line}".rstrip() for c in comments
             for line in textwrap.wrap(c, 96, subsequent_indent="  ") or [""]]
    lines.append("[[connections]]")
    lines += [f"{_key(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def existing_names(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = _parse(path.read_text(encoding="utf-8"), path)
    conns = data.get("connections", [])
    return [str(c.get("name")) for c in conns if isinstance(c, dict)] if isinstance(
        conns, list) else []


def _parse(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err}); fix it first, nothing was "
                          "written", code="config.syntax") from err


def append_connection(path: Path, entry: Mapping[str, Any],
                      comments: Sequence[str] = ()) -> None:
    """Append ``entry`` (with a ``name``) to ``path`` after checking that the result loads.
    Creates the file from the commented template when it does not exist."""
    from postroom import settings as settings_mod
    from postroom.bootstrap import write_config_template

    name = str(entry["name"])
    if not path.exists():
        write_config_template(path)
    text = path.read_text(encoding="utf-8")
    data = _parse(text, path)
    if "connections" in data and not isinstance(data["connections"], list):
        raise ConfigError(f"{path}: 'connections' is not an array of tables; write it as "
                          "[[connections]] entries first", code="config.type")
    if name in existing_names(path):
        raise ConfigError(
            f"{path} already has a connection named {name!r}; choose another name with "
            f"--name, or remove that [[connections]] entry first (`postroom connections` "
            "lists them)", code="config.dupe")
    block = connection_block(entry, comments)
    sep = "" if text.endswith("\n") or not text else "\n"
    new_text = f"{text}{sep}\n{block}"
    try:
        tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"{path}: a [[connections]] entry cannot be appended ({err}); is 'connections' "
            "written as an inline array (connections = [...])? Write each one as a "
            "[[connections]] table first; nothing was written", code="config.type") from err
    # Validated as `postroom serve` will read it, from the same folder (relative paths).
    tmp = path.with_name(f".{path.name}.wizard-{os.getpid()}.tmp")
    try:
        # 0600 like the file itself: the text may hold credentials.
        with open_private(tmp, "w", encoding="utf-8") as f:
            f.write(new_text)
        loaded = settings_mod.load(tmp, environ={})
    finally:
        tmp.unlink(missing_ok=True)
    loaded.connection(name)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"{sep}\n{block}")
        f.flush()
        os.fsync(f.fileno())
