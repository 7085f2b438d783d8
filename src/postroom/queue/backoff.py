"""Retry timing, as Postfix does it: the wait doubles from min_backoff up to max_backoff."""

from __future__ import annotations


def backoff(attempts: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try (1-based)."""
    if attempts < 1:
        return 0.0
    # Cap the exponent: 2**60 seconds is already far beyond any max_backoff.
    return float(min(max_backoff, min_backoff * 2 ** min(attempts - 1, 60)))
