"""The pieces of reading postroom.toml that need neither pydantic nor the models: where the
file is looked for, how an environment override's text becomes a value, and the parsers of
listen addresses, SMTP URLs and sizes.

postroom.settings and postroom.config_load use them and re-export them under their old
names; postroom-sendmail's light loader (ingress/sendmail_settings.py), which starts once
per message, uses them without importing pydantic.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

ENV_PREFIX = "POSTROOM_"
DEFAULT_CONFIG = "postroom.toml"
# POSTROOM_* names that are not overrides of a key.
ENV_NOT_KEYS = frozenset({"POSTROOM_CONFIG", "POSTROOM_SECRET_KEY"})


def value_from_text(raw: str) -> Any:
    """A TOML value when ``raw`` parses as one (numbers, booleans, arrays), else the string:
    how an environment override, and a value typed on a command line, are read."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


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


class ServerPaths(Protocol):
    """What :class:`InstancePaths` reads of [server]."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def database(self) -> str: ...


class InstancePaths:
    """Where an instance's files are, from [server] and the configuration's folder: one
    copy for postroom.settings.Settings and postroom-sendmail's light settings."""

    base_dir: Path
    server: ServerPaths

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self.server.data_dir).resolve()

    @property
    def database_url(self) -> str:
        return self.server.database or f"sqlite:///{self.data_dir / 'postroom.db'}"

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:2525, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str) -> int:
    """"2GB" -> 2000000000, "512MiB" -> 536870912, "1500" -> 1500 (bytes)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"expected a size such as \"2GB\", \"500MB\", \"512MiB\" or a "
                         f"number of bytes, got {value!r}")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def parse_smtp_url(value: str) -> tuple[str, str, int]:
    """"smtp://127.0.0.1:2525" -> ("smtp", "127.0.0.1", 2525); smtps:// is implicit TLS."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("smtp", "smtps") or "/" in rest:
        raise ValueError(f"expected smtp://HOST:PORT or smtps://HOST:PORT (e.g. "
                         f"smtp://127.0.0.1:2525, Postroom's smtp_listen), got {value!r}")
    host, port = parse_listen(rest)
    return scheme, host, port
