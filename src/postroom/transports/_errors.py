"""A provider's error, as data: what its answer said (:class:`ApiError`), what one of its
documented errors means (:class:`ErrorRule`, a row of the provider's ``errors`` table), and
how long a 429/503 asks to wait (:func:`retry_after`). transports._http applies them."""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass

from postroom.exceptions import DataRejected, DeliveryError, Scope


@dataclass(frozen=True)
class ApiError:
    """A provider's error body, read by the provider module."""

    status: int
    code: str  # the provider's own code or reason ("insufficientPermissions", "10", ...)
    message: str


@dataclass(frozen=True)
class ErrorRule:
    """What one documented provider error means, as data (a provider's ``errors`` table maps
    its error code, a str, or an HTTP status, an int, to one). ``code`` is Postroom's stable
    code: the advice catalog's entry for it (diagnostics/advice.toml) says cause and fix in
    the provider's words; ``fix`` is the short form shown with the error itself.
    ``auth``: worded by the connection's auth scheme instead ("refused": the credential
    is wrong; "forbidden": it lacks a permission)."""

    code: str
    fix: str = ""
    kind: type[DeliveryError] = DataRejected
    permanent: bool = True
    scope: Scope | None = None  # None: the kind's own (DataRejected: the message)
    auth: str | None = None  # "refused" | "forbidden"


# RFC 9110 section 10.2.3: Retry-After is delay-seconds or an HTTP-date. Postroom waits at
# least a second (a 0 would make every worker hammer the provider) and at most an hour (a
# provider's "come back tomorrow" is a quota, better shown than obeyed blindly).
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1.0, 3600.0


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait, clamped to [1, 3600]; None when absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)
