"""The fallback decision: after a connection failed, what becomes of the message and of the
connection. The one rule, by what the failure is about (``DeliveryError.scope``):

- **The message or a recipient** (``Scope.MESSAGE``: a recipient's 5xx, ``DataRejected``:
  too big, content refused): **no other connection**; a permanent refusal fails it. The
  next provider would refuse it too, and "try until someone accepts" would spray rejected
  mail across accounts. Says nothing about the connection (no breaker count).
- **The connection's configuration** (``Scope.CONFIGURATION``: authentication refused,
  535 included, a mechanism not offered, credentials refused over plaintext, TLS mode
  wrong, certificate not trusted, the configured host not in DNS, a missing secret, an
  OAuth grant to renew): **the message is held**, never failed for it, even when the
  server's reply is a 5xx: the same message goes through once someone fixes the
  connection (Postfix's ``smtp_sasl_auth_soft_bounce = yes``). It counts against the
  connection (breaker) and the next connection of the chain is tried now; the message
  fails only when its lifetime (``delivery.max_lifetime``) ends.
- **The connection, now** (``Scope.CONNECTION``: refused, unreachable, timeout before the
  data, 421, a 4xx to MAIL FROM, the sender refused for this account, a feature the server
  lacks, a provider's 429 or 5xx): counts against the connection, **next connection**; at
  the end of the chain a permanent refusal fails the message, anything else is retried.
- **Unknown outcome**: the connection broke *after* the message data was sent, before the
  server's final reply. The server may have accepted it. Sending it elsewhere would risk a
  duplicate, so it is retried later on the *same* connection (same Message-ID, which lets
  the provider or recipient deduplicate), and the attempt says so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from postroom.exceptions import ConfigError, DeliveryError, MessageError, PostroomError, Scope


class Next(enum.Enum):
    FALLBACK = "fallback"  # try the next connection in the chain now
    STOP = "stop"  # the message or recipients are the problem: no other connection
    UNKNOWN = "unknown"  # maybe delivered: retry later on the same connection only


@dataclass(frozen=True, slots=True)
class Verdict:
    next: Next
    counts: bool  # against the connection: its circuit breaker
    holds: bool  # the message waits for a retry even when the server's refusal is final


_BY_SCOPE = {
    Scope.MESSAGE: Verdict(Next.STOP, counts=False, holds=False),
    Scope.CONFIGURATION: Verdict(Next.FALLBACK, counts=True, holds=True),
    Scope.CONNECTION: Verdict(Next.FALLBACK, counts=True, holds=False),
}
_UNKNOWN = Verdict(Next.UNKNOWN, counts=False, holds=True)


def scope_of(err: PostroomError) -> Scope:
    """What an error met while delivering is about. Not every one is a DeliveryError: a
    connection's settings (a DKIM key, an OAuth table, an undecryptable stored secret) raise
    ConfigError, a message policy MessageError."""
    if isinstance(err, DeliveryError):
        return err.scope
    if isinstance(err, ConfigError):
        return Scope.CONFIGURATION
    if isinstance(err, MessageError):
        return Scope.MESSAGE
    return Scope.CONNECTION


def verdict(err: DeliveryError) -> Verdict:
    return _UNKNOWN if err.after_data else _BY_SCOPE[err.scope]


def after_failure(err: DeliveryError) -> Next:
    return verdict(err).next


def counts_against_connection(err: DeliveryError) -> bool:
    """Whether a failure says the connection is unwell (for its circuit breaker). A message
    or recipient refused, or an unknown outcome, says nothing about the connection."""
    return verdict(err).counts


def fails_message(err: DeliveryError) -> bool:
    """Whether this failure, where no other connection is tried after it, fails the
    message's recipients now rather than leaving them for a later try."""
    return err.permanent and not verdict(err).holds


def misconfigured(err: DeliveryError) -> bool:
    """The connection is set up wrong: the message waits for the fix, whatever the reply."""
    return not err.after_data and err.scope is Scope.CONFIGURATION
