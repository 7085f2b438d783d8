"""What an administrator can do, each action written once.

The web admin's pages, the ``/api/v1/admin`` endpoints and the ``postroom`` commands call
these functions, so there is one "resend", one "pause", one "add a connection". Each takes
the :class:`~postroom.audit.Actor` doing it, checks its role here (:func:`require`), makes
the change and writes the audit row, in the change's own transaction where it can.
"""

from __future__ import annotations

from postroom.audit import Actor, Role
from postroom.exceptions import PermissionDenied


def require(actor: Actor, need: Role, what: str) -> None:
    """Refuse ``what`` (e.g. "resend a message") unless ``actor``'s role allows ``need``."""
    if not actor.may(need):
        raise PermissionDenied(
            f"{actor.label} ({actor.role.value}) may not {what}: it needs the {need.value} "
            f"role; ask an admin, or run `postroom admin role {actor.name} {need.value}`")
