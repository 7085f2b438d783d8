"""Apps, as an administrator manages them: create, rotate, limit, remove (postroom.apps does
the work; here the role check, the connection names' check and the audit row).

The web admin's Apps page, ``/api/v1/admin/apps`` and `postroom app ...` call these. A secret
is returned once, by :func:`add_app` and :func:`rotate_app`; it is never stored in clear nor
written to the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import MessageError
from postroom.ops import require

if TYPE_CHECKING:
    from postroom.runtime import Instance


@dataclass(frozen=True)
class Credentials:
    """What an app authenticates with, shown once: SMTP AUTH (name, secret) and the HTTP
    API's Bearer key."""

    name: str
    secret: str
    api_key: str


def list_apps(inst: Instance, actor: Actor) -> list[dict[str, Any]]:
    """Every app with its limits and when it was made, last used and rotated (no secret)."""
    require(actor, Role.VIEWER, "list apps")
    return inst.apps.list()


def check_connections(inst: Instance, names: Sequence[str] | None) -> None:
    """Refuse a connection limit naming a connection that does not exist (the file's or the
    database's, as the running configuration has them)."""
    known = {c.name for c in inst.settings.connections}
    for name in names or []:
        if name not in known:
            raise MessageError(f"--connection {name!r}: no such connection (configured: "
                               f"{', '.join(sorted(known)) or 'none'})", code="app.connection")


def _credentials(inst: Instance, name: str, secret: str) -> Credentials:
    return Credentials(name, secret, inst.apps.api_key(name, secret))


def add_app(inst: Instance, actor: Actor, name: str, *, senders: Sequence[str] = (),
            connections: Sequence[str] = (), rate: str | None = None) -> Credentials:
    """Create an app; its credentials are returned here only."""
    require(actor, Role.ADMIN, "create an app")
    check_connections(inst, connections)
    secret = inst.apps.add(name, senders=senders, connections=connections, rate=rate or None)
    record(inst.engine, actor, Action.APP_ADD, f"app:{name}",
           {"senders": list(senders), "connections": list(connections), "rate": rate or None})
    return _credentials(inst, name, secret)


def rotate_app(inst: Instance, actor: Actor, name: str) -> Credentials:
    """A new secret for ``name``: the old one, and every session opened with it, stop
    working (within a second or two in other processes)."""
    require(actor, Role.ADMIN, "rotate an app's secret")
    secret = inst.apps.rotate(name)
    record(inst.engine, actor, Action.APP_ROTATE, f"app:{name}")
    return _credentials(inst, name, secret)


def set_limits(inst: Instance, actor: Actor, name: str, *,
               senders: Sequence[str] | None = None,
               connections: Sequence[str] | None = None, rate: str | None = None,
               clear_rate: bool = False) -> None:
    """Change an app's limits: None leaves one as it is, an empty list lifts it."""
    require(actor, Role.ADMIN, "change an app's limits")
    if rate and clear_rate:
        raise MessageError("give a rate or lift it, not both", code="app.rate")
    check_connections(inst, connections)
    inst.apps.set_limits(name, senders=senders, connections=connections, rate=rate or None,
                         clear_rate=clear_rate)
    changed: dict[str, Any] = {}
    if senders is not None:
        changed["senders"] = list(senders)
    if connections is not None:
        changed["connections"] = list(connections)
    if rate or clear_rate:
        changed["rate"] = None if clear_rate else rate
    record(inst.engine, actor, Action.APP_LIMITS, f"app:{name}", changed)


def remove_app(inst: Instance, actor: Actor, name: str) -> bool:
    """Remove an app: its credentials stop working, its messages stay in the log. False
    when there is no such app."""
    require(actor, Role.ADMIN, "remove an app")
    gone = inst.apps.remove(name)
    if gone:
        record(inst.engine, actor, Action.APP_REMOVE, f"app:{name}")
    return gone
