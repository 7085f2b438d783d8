"""An in-memory transport: keeps what it is given. For your own tests, and ours.

``transport = "memory"`` in a connection; every delivered envelope lands in ``outbox``.
``reject`` maps a recipient to an SMTP-style (code, text) to simulate refusals.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from postroom.envelope import Envelope
from postroom.settings import ConnectionBase
from postroom.transports import base


class Settings(ConnectionBase):
    transport: Literal["memory"] = "memory"


class Transport(base.Transport):
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
