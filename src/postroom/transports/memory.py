"""An in-memory transport: keeps what it is given. For your own tests, and ours.

``transport = "memory"`` in a connection; every envelope delivered through it (by a worker
in the same process, e.g. ``Mailer.deliver_due()``) lands in :func:`outbox`;
:func:`reject` makes a recipient be refused with an SMTP-style (code, text); :func:`reset`
forgets both (call it between tests)::

    from postroom.transports import memory

    mailer.send(from_="shop@example.com", to="bob@example.org", subject="Hi", text="...")
    mailer.deliver_due()
    [env] = memory.outbox("test")        # the connection's name
    assert env.recipients == ["bob@example.org"]
"""

from __future__ import annotations

from typing import ClassVar, Literal

from postroom.envelope import Envelope
from postroom.settings import ConnectionBase
from postroom.transports import base


class Settings(ConnectionBase):
    transport: Literal["memory"] = "memory"


class Transport(base.Transport):
    settings_model = Settings
    title = "memory"
    # Shared per connection name, so a test can look at what a worker delivered.
    outboxes: ClassVar[dict[str, list[Envelope]]] = {}
    rejections: ClassVar[dict[str, tuple[int, str]]] = {}

    @property
    def outbox(self) -> list[Envelope]:
        return self.outboxes.setdefault(self.name, [])

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        results: dict[str, base.RecipientResult] = {}
        accepted: list[str] = []
        for rcpt in envelope.recipients:
            code, text = self.rejections.get(rcpt, (250, "2.1.5 Ok"))
            results[rcpt] = base.RecipientResult(code, text)
            if 200 <= code < 300:
                accepted.append(rcpt)
        if accepted:
            self.outbox.append(
                Envelope(envelope.sender, accepted, envelope.raw, envelope.source, id=envelope.id)
            )
        return base.DeliveryResult(results, transcript=f"*: kept in memory for {accepted}")


def outbox(connection: str) -> list[Envelope]:
    """What was delivered through the memory connection named ``connection``, in order."""
    return Transport.outboxes.setdefault(connection, [])


def reject(address: str, code: int = 550, text: str = "5.1.1 User unknown") -> None:
    """Make every memory connection refuse ``address`` with this reply (4xx: retried)."""
    Transport.rejections[address] = (code, text)


def reset() -> None:
    """Forget every outbox and rejection."""
    Transport.outboxes.clear()
    Transport.rejections.clear()
