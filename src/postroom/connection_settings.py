"""What every ``[[connections]]`` entry has (ConnectionBase; each transport's own Settings
subclass adds its keys) and its ``policy`` table.

Apart from postroom.settings, which reads the configuration, because these models bring the
DKIM, OAuth and routing ones: postroom-sendmail, which starts once per message and never
delivers, reads the configuration without them (``settings.load(connections=False)``).
postroom.settings still gives both names (``from postroom.settings import ConnectionBase``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from postroom.dkim import DkimSettings
from postroom.oauth.config import OAuthSettings
from postroom.settings import PolicySettings, parse_rate


class ConnectionPolicy(PolicySettings):
    """A connection's own `policy` table: over the global [policy] (postroom.policy)."""

    inherit: bool = True  # false: the global [policy] does not apply to this connection


class ConnectionBase(BaseModel):
    """Fields every connection has; each transport adds its own (transports/<kind>.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # routes, the CLI and the log use it
    transport: str  # the kind: smtp, gmail, msgraph, or an HTTPS API provider
    # Limits shared by every worker and node; over them, mail waits in the queue.
    rate_limit: list[str] = []  # e.g. ["20/second", "2000/day"] (Gmail's daily cap...)
    max_sessions: int | None = Field(default=None, ge=1)  # parallel sessions, all workers
    policy: ConnectionPolicy | None = None  # message policy over the global [policy]
    oauth: OAuthSettings | None = None  # OAuth 2.0 provider and client (postroom.oauth)
    dkim: DkimSettings | None = None  # sign what this connection sends (postroom.dkim)

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rates(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if isinstance(items, list):
            for item in items:
                parse_rate(str(item))
        return items

    @property
    def rates(self) -> list[tuple[int, float]]:
        return [parse_rate(r) for r in self.rate_limit]
