"""Transports: one module per kind, listed in this registry table (never an if/elif over
kinds). Each module defines ``Settings`` (a ConnectionBase subclass: its config keys) and
``Transport`` (a :class:`postroom.transports.base.Transport`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from postroom.settings import ConnectionBase
    from postroom.transports.base import Transport, TransportContext

REGISTRY: dict[str, str] = {
    "smtp": "postroom.transports.smtp",
    "memory": "postroom.transports.memory",
    "capture": "postroom.transports.capture",
    "gmail": "postroom.transports.gmail",
    "msgraph": "postroom.transports.msgraph",
}


def _module(kind: str, where: str) -> object:
    if kind not in REGISTRY:
        raise ConfigError(
            f"{where}.transport = {kind!r} is not a known transport; use one of: "
            f"{', '.join(sorted(REGISTRY))}",
            code="config.transport.unknown",
        )
    return importlib.import_module(REGISTRY[kind])


def settings_model(kind: str, where: str) -> type[ConnectionBase]:
    model: type[ConnectionBase] = _module(kind, where).Settings  # type: ignore[attr-defined]
    return model


def create(settings: ConnectionBase, ctx: TransportContext) -> Transport:
    mod = _module(settings.transport, f"connection {settings.name!r}")
    transport: Transport = mod.Transport(settings, ctx)  # type: ignore[attr-defined]
    return transport
