"""Where a key of postroom.toml is: its line in the file, or the environment variable that
overrides it. Errors that name a key (postroom.settings) say ``postroom.toml:12:`` with it,
and `postroom config show` prints each value's origin.

tomllib gives values, not positions, so the file's text is scanned once, line by line, for
its table headers and keys: enough TOML to know which key each line sets, not a parser.
``[[arrays]]`` of tables are counted, so ``connections[1].port`` is the ``port`` under the
second ``[[connections]]`` header. A key written where the scan does not follow it (inside
an inline table in an array) is placed at the line of the nearest enclosing key or table.
Only called when something must be located: an error, `config show`, a reload snapshot.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Loc = tuple[str | int, ...]  # ("connections", 0, "port"), ("server", "smtp_listen")
ENV_PREFIX = "POSTROOM_"  # the overrides' prefix (postroom.settings reads the same)
MASK = "********"
# A key whose name holds one of these words holds a secret, unless it only names where the
# secret is (an environment variable, a file).
_SECRET_WORDS = ("password", "secret", "token", "key")
_REFERENCE_ENDS = ("_env", "_file", "_path", "_id")
# URLs whose every part past the scheme may be a credential: Apprise channels carry their
# tokens in the path (slack://TokenA/TokenB/TokenC).
_URL_SECRET_KEYS = frozenset({"channels"})
# user:password@ in any URL (server.database = "postgresql://postroom:PASSWORD@db/postroom")
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^@/\s]+@", re.I)


def is_secret(key: str) -> bool:
    name = key.lower()
    return any(w in name for w in _SECRET_WORDS) and not name.endswith(_REFERENCE_ENDS)


def masked(key: str, value: Any) -> Any:
    """``value`` with every secret in it (by its key's name, at any depth) replaced: for
    `config show`, and for an error that quotes a table (a connection with its password)."""
    if isinstance(value, Mapping):
        return {k: masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(key, v) for v in value]
    if is_secret(key) and value not in (None, "", [], {}):
        return MASK
    if isinstance(value, str) and "://" in value:
        if key.lower() in _URL_SECRET_KEYS:
            return value.partition("://")[0] + "://" + MASK
        return _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", value)
    return value


def _key_parts(text: str) -> list[str]:
    """``a."b.c".d`` -> ["a", "b.c", "d"]: a dotted TOML key, bare or quoted parts."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t.":
            i += 1
        elif ch in "\"'":
            end = text.find(ch, i + 1)
            end = n if end < 0 else end
            parts.append(text[i + 1:end])
            i = end + 1
        else:
            j = i
            while j < n and text[j] not in " \t.":
                j += 1
            parts.append(text[i:j])
            i = j
    return parts


def _split_assignment(line: str) -> tuple[str, str] | None:
    """``key = value`` -> (key, value), the ``=`` found outside quotes; None otherwise."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "=":
            return line[:i].strip(), line[i + 1:].strip()
        elif ch == "#":
            return None
    return None


def _depth_change(value: str) -> tuple[int, str]:
    """Brackets opened minus closed in ``value`` (strings and comments skipped), and the
    multi-line string delimiter left open at its end ("" when none)."""
    depth, i, n = 0, 0, len(value)
    while i < n:
        if value.startswith(('"""', "'''"), i):
            delim = value[i:i + 3]
            end = value.find(delim, i + 3)
            if end < 0:
                return depth, delim
            i = end + 3
            continue
        ch = value[i]
        if ch in "\"'":
            end = value.find(ch, i + 1)
            i = n if end < 0 else end + 1
            continue
        if ch == "#":
            break
        depth += (ch in "[{") - (ch in "]}")
        i += 1
    return depth, ""


def _inline_keys(value: str) -> list[str]:
    """The keys of an inline table written on one line: ``{ host = "a", port = 1 }``."""
    if not value.startswith("{"):
        return []
    keys = []
    for piece in value.strip("{} ").split(","):
        pair = _split_assignment(piece)
        if pair is not None and pair[0]:
            keys.append(_key_parts(pair[0])[0])
    return keys


@functools.lru_cache(maxsize=8)
def key_lines(text: str) -> dict[Loc, int]:
    """Each table and key of the TOML ``text`` -> its 1-based line."""
    lines: dict[Loc, int] = {}
    arrays: dict[Loc, int] = {}  # an array of tables (resolved path) -> its element count
    table: Loc = ()
    depth, open_string = 0, ""

    def resolve(parts: list[str]) -> Loc:
        out: Loc = ()
        for part in parts:
            out = (*out, part)
            if out in arrays:  # a header under an array of tables: its last element
                out = (*out, arrays[out] - 1)
        return out

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if open_string:  # inside a multi-line string: only its end matters
            if open_string in line:
                open_string = ""
            continue
        if depth > 0:  # inside a multi-line array or inline table
            change, open_string = _depth_change(line)
            depth += change
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            parts = _key_parts(line[2:line.find("]]")])
            array = (*resolve(parts[:-1]), parts[-1])
            arrays[array] = arrays.get(array, 0) + 1
            table = (*array, arrays[array] - 1)
            lines.setdefault(table, number)
            lines.setdefault(array, number)
            continue
        if line.startswith("["):
            table = resolve(_key_parts(line[1:line.find("]")]))
            lines.setdefault(table, number)
            continue
        pair = _split_assignment(line)
        if pair is None:
            continue
        key = (*table, *_key_parts(pair[0]))
        lines.setdefault(key, number)
        for inner in _inline_keys(pair[1]):
            lines.setdefault((*key, inner), number)
        depth, open_string = _depth_change(pair[1])
    return lines


def line_of(text: str, loc: Loc) -> int | None:
    """The line that sets ``loc``, or the nearest enclosing key or table; None if none."""
    index = key_lines(text)
    for end in range(len(loc), 0, -1):
        found = index.get(loc[:end])
        if found is not None:
            return found
    return None


def env_name(loc: Loc) -> str:
    """The ``POSTROOM_<SECTION>__<KEY>`` variable that would set a section's key."""
    return f"{ENV_PREFIX}{loc[0]}__{loc[1]}".upper()


def where(path: Path | None, text: str, environ: Mapping[str, str], loc: Loc) -> str:
    """``"postroom.toml:12"``, ``"environment POSTROOM_SERVER__SMTP_LISTEN"``, or "" when
    neither sets ``loc`` (a default, or a key missing from its table and that table absent)."""
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], str):
        name = env_name(loc)
        if any(k.upper() == name for k in environ):
            return f"environment {name}"
    if path is None:
        return ""
    line = line_of(text, loc)
    return f"{path}:{line}" if line is not None else str(path)
