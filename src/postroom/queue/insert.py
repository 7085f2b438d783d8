"""A row for the group commit (postroom.queue.commit) to INSERT. A module of its own that
imports nothing of the queue's, so that what the queue itself uses (postroom.events) can
build one without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Executable


@dataclass(frozen=True, slots=True)
class RowInsert:
    """One row to INSERT; a batch's rows for the same statement go in one executemany."""

    stmt: Executable
    row: dict[str, Any]
