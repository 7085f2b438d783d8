"""The capture transport: delivers nowhere, records the message as sent.

``transport = "capture"`` in a connection lets an app be developed and tested against a real
Postroom (queue, log, retries, `postroom log` / `postroom show`) with no provider and no risk
of mail reaching anyone. Every recipient is reported accepted, and the attempt's transcript
says the message was captured, so a captured message can never be mistaken for a delivered
one in the log.
"""

from __future__ import annotations

from typing import Literal

from postroom.envelope import Envelope
from postroom.settings import ConnectionBase
from postroom.transports import base

# The reply recorded for every recipient; "captured" is what `postroom show` and the log print.
REPLY = "2.0.0 captured by Postroom, not delivered (transport = \"capture\")"


class Settings(ConnectionBase):
    transport: Literal["capture"] = "capture"


class Transport(base.Transport):
    settings_model = Settings
    title = "capture"

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        results = {rcpt: base.RecipientResult(250, REPLY) for rcpt in envelope.recipients}
        transcript = (
            f"*: connection {self.name!r} captures mail: the message was kept in the log "
            f"and delivered to nobody ({len(envelope.recipients)} recipient(s), "
            f"{len(envelope.raw)} bytes)"
        )
        return base.DeliveryResult(results, transcript=transcript, reply_code=250,
                                   reply_text=REPLY)

    async def check(self) -> str:
        return f"*: connection {self.name!r} captures mail; there is no server to check"
