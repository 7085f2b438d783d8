"""A message's states and priorities: plain values, importable without SQLAlchemy (the
sendmail command's standard-library path to the store needs them too)."""

from __future__ import annotations

# Message states. "partial" = some recipients delivered, the rest failed permanently (final).
QUEUED, SENDING, SENT, PARTIAL, DEFERRED, FAILED = (
    "queued",
    "sending",
    "sent",
    "partial",
    "deferred",
    "failed",
)
# Final, never sent: every recipient is on the suppression list (postroom.suppression); a
# recipient left out of RCPT TO for it has the rcpt_status state "suppressed".
SUPPRESSED = "suppressed"
STATUSES = (QUEUED, SENDING, SENT, PARTIAL, DEFERRED, FAILED, SUPPRESSED)
WAITING = (QUEUED, DEFERRED)
PRIORITIES = {"high": 1, "normal": 0, "low": -1}
