"""The suppression list, as an administrator manages it: list (viewer), add, remove and import
(admin), each change audited (postroom.suppression does the work).

`postroom suppressions ...`, ``/api/v1/admin/suppressions`` and the Suppressions page call
these. An import reads CSV (``address[,scope[,reason]]``, a header row allowed) or one
address per line, at most MAX_IMPORT_BYTES, and says what it did with each bad line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import MessageError
from postroom.ops import require
from postroom.suppression import (
    GLOBAL,
    Cursor,
    Entry,
    Source,
    Suppressions,
    normalise,
    normalise_scope,
)

if TYPE_CHECKING:
    from postroom.runtime import Instance

MAX_IMPORT_BYTES = 5 * 1024 * 1024  # a few hundred thousand addresses
MAX_ERRORS = 100  # bad lines described one by one; past that, counted only
_HEADER_WORDS = frozenset({"address", "email", "e-mail", "email address", "recipient"})


@dataclass
class Imported:
    """What an import did: entries new, already listed, and each bad line (number, why)."""

    added: int = 0
    existing: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    bad_lines: int = 0  # every bad line, also those past MAX_ERRORS

    @property
    def read(self) -> int:
        return self.added + self.existing + self.bad_lines


def suppressions(inst: Instance) -> Suppressions:
    return Suppressions.of(inst.settings, inst.engine)


def list_entries(inst: Instance, actor: Actor, *, contains: str | None = None,
                 scope: str | None = None, source: str | None = None,
                 after: Cursor | None = None, limit: int = 100) -> list[Entry]:
    """Entries newest first (see Suppressions.list)."""
    require(actor, Role.VIEWER, "list the suppression list")
    if source and source not in {s.value for s in Source}:
        raise MessageError(f"source {source!r}: use one of {', '.join(s.value for s in Source)}",
                           code="suppression.source")
    return suppressions(inst).list(contains=contains, scope=scope, source=source,
                                   after=after, limit=limit)


def add_entry(inst: Instance, actor: Actor, address: str, scope: str = GLOBAL,
              reason: str = "") -> Entry:
    """Add one address by hand; refused (409) when it is listed in that scope already."""
    require(actor, Role.ADMIN, "add to the suppression list")
    added = suppressions(inst).add(address, scope, reason or f"added by {actor.label}",
                                   Source.MANUAL)
    if added is None:
        raise MessageError(f"{normalise(address)} is on the suppression list already for "
                           f"{_scope_words(normalise_scope(scope))}; remove it first to change "
                           "the reason", code="suppression.exists")
    record(inst.engine, actor, Action.SUPPRESSION_ADD, f"suppression:{added.address}",
           {"scope": added.scope, "reason": added.reason})
    return added


def remove_entry(inst: Instance, actor: Actor, address: str,
                 scope: str | None = GLOBAL) -> int:
    """Remove an address from one scope (None: from every scope); later mail to it is sent
    again. Refused (404) when it is not listed there."""
    require(actor, Role.ADMIN, "remove from the suppression list")
    gone = suppressions(inst).remove(address, scope)
    if not gone:
        where = "any scope" if scope is None else _scope_words(normalise_scope(scope))
        raise MessageError(f"{normalise(address)} is not on the suppression list for {where}; "
                           "`postroom suppressions list --contains ADDRESS` shows its entries",
                           code="suppression.unknown")
    record(inst.engine, actor, Action.SUPPRESSION_REMOVE, f"suppression:{normalise(address)}",
           {"scope": scope or "any", "removed": gone})
    return gone


def too_big(size: int | None) -> MessageError:
    """The refusal of an import of ``size`` bytes (None: over the limit, not all read)."""
    what = "over the limit of" if size is None else f"{size / 1048576:.1f} MiB; the most is"
    return MessageError(f"the import file is {what} {MAX_IMPORT_BYTES // 1048576} MiB for one "
                        "import: split it into smaller files", code="suppression.import_size")


def import_entries(inst: Instance, actor: Actor, data: bytes, *, scope: str = GLOBAL,
                   reason: str = "") -> Imported:
    """Add every address of ``data`` (CSV or one per line; a row's own scope and reason win
    over ``scope`` and ``reason``). Bad lines are skipped and reported, the rest added."""
    require(actor, Role.ADMIN, "import into the suppression list")
    if len(data) > MAX_IMPORT_BYTES:
        raise too_big(len(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MessageError(f"the file is not UTF-8 text (byte {err.start}); save it as UTF-8 "
                           "CSV or plain text, one address per line",
                           code="suppression.import_encoding") from err
    default_scope = normalise_scope(scope)
    why = reason.strip() or f"imported by {actor.label}"
    result = Imported()
    rows: dict[tuple[str, str], str] = {}
    for number, cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in cells]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        if not rows and not result.bad_lines and cells[0].lower() in _HEADER_WORDS:
            continue  # a header row
        try:
            key = (normalise(cells[0]),
                   normalise_scope(cells[1]) if len(cells) > 1 and cells[1] else default_scope)
        except MessageError as err:
            result.bad_lines += 1
            if len(result.errors) < MAX_ERRORS:
                result.errors.append((number, err.message))
            continue
        rows.setdefault(key, cells[2] if len(cells) > 2 and cells[2] else why)
    result.added = _add_grouped(suppressions(inst), rows)
    result.existing = len(rows) - result.added
    record(inst.engine, actor, Action.SUPPRESSION_IMPORT, "suppression:import",
           {"added": result.added, "existing": result.existing, "bad_lines": result.bad_lines,
            "scope": default_scope})
    return result


def _add_grouped(store: Suppressions, rows: dict[tuple[str, str], str]) -> int:
    """Add the rows in batches of one reason each (most files have one reason)."""
    by_reason: dict[str, list[tuple[str, str]]] = {}
    for key, row_reason in rows.items():
        by_reason.setdefault(row_reason, []).append(key)
    return sum(store.add_many(keys, reason=r, source=Source.IMPORT)
               for r, keys in by_reason.items())


def _scope_words(scope: str) -> str:
    return "every sender (*)" if scope == GLOBAL else f"sender domain {scope}"
