"""The shape of one provider's entry in the webhook contract suite
(tests/test_provider_webhooks.py; entries beside the sending ones, in
tests/provider_cases/<kind>.py as ``WEBHOOK``, listed in ``provider_cases.WEBHOOKS``).

A case gives a payload taken from the provider's documentation, a function that signs it
with the real algorithm and a test key, the events it must become, and how to tamper with
what the signature covers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom.webhooks import Kind

# (body, signed at) -> (body as sent, headers): the provider's signing, with the case's key.
Signer = Callable[[bytes, float], tuple[bytes, dict[str, str]]]


@dataclass(frozen=True)
class Expected:
    """One event the payload must become."""

    kind: Kind
    provider_id: str | None
    recipient: str | None
    permanent: bool | None = None


@dataclass(frozen=True)
class HookCase:
    kind: str  # the transport kind
    settings: Mapping[str, Any]  # the connection's keys (the sending case's)
    key: str  # the connection's webhook key (signing key, public key, or user:password)
    wrong_key: str  # a key of the same form that must not verify the signed request
    body: bytes  # the documented payload, unsigned
    sign: Signer
    events: Sequence[Expected]
    # Changes something the signature covers (None: the provider signs nothing, basic auth).
    tamper: Callable[[bytes], bytes] | None = None
    timestamped: bool = True  # the signature covers a time: an old request is refused
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with every request

    def __str__(self) -> str:
        return self.kind
