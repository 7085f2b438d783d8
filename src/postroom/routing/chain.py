"""The fallback decision: after a connection failed, try the next one in the chain or not.

Documented rule (README "Routes and fallback"):

- **Next connection** when the failure is about the *connection*, so another provider may
  well succeed: refused / unreachable / DNS (``ConnectError``), timeout before the message
  data was sent (``TimeoutError_``), TLS failure (``TLSError``), authentication failure
  (``AuthError``), the server refusing the sender for this account (``SenderRejected``),
  a feature the server lacks (``UnsupportedFeature``, e.g. SMTPUTF8), a connection-level
  4xx (421 at the greeting, 4xx to MAIL FROM), a provider's 429 or 5xx (HTTP transports
  raise these as connection-level errors), and a connection that is not configured.
- **Never** on a recipient's 5xx: that recipient has failed for good, wherever it is sent.
  Nor when the message itself was refused (``DataRejected``: too big, content refused): the
  next provider would refuse it too, and "try until someone accepts" would spray rejected
  mail across accounts.
- **Unknown outcome**: the connection broke *after* the message data was sent, before the
  server's final reply. The server may have accepted it. Sending it elsewhere would risk a
  duplicate, so it is retried later on the *same* connection (same Message-ID, which lets
  the provider or recipient deduplicate), and the attempt says so.
"""

from __future__ import annotations

import enum

from postroom.exceptions import DataRejected, DeliveryError


class Next(enum.Enum):
    FALLBACK = "fallback"  # try the next connection in the chain now
    STOP = "stop"  # the message or recipients are the problem: no other connection
    UNKNOWN = "unknown"  # maybe delivered: retry later on the same connection only


def after_failure(err: DeliveryError) -> Next:
    if err.after_data:
        return Next.UNKNOWN
    if isinstance(err, DataRejected) or err.code.startswith("message."):
        return Next.STOP
    return Next.FALLBACK


def counts_against_connection(err: DeliveryError) -> bool:
    """Whether a failure says the connection is unwell (for its circuit breaker). A message
    or recipient refused, or an unknown outcome, says nothing about the connection."""
    return after_failure(err) is Next.FALLBACK and not err.code.startswith("config.")
