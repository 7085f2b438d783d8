"""Acting on many messages at once (retry, resend, delete), counting a filter, exporting it.

A bulk action is given either a list of ids (a selection on a page) or a log filter (every
match). It runs through the engine's own per-message code (queue.maintenance.retry,
Queue.resend_sync, maintenance.delete_messages) in batches, one short transaction each, so
delivery carries on in between; it is audited once, with the filter or the ids and how many
messages it touched. Callers in async code run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import csv
import enum
import io
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postroom import audit
from postroom.audit import Action, Actor, Role
from postroom.exceptions import MessageError, PostroomError
from postroom.ops import require
from postroom.store.log import Cursor, LogFilter

if TYPE_CHECKING:
    from postroom.runtime import Instance

COUNT_CAP = 10_000  # "more than 10,000": counting stops here
MAX_IDS = 1000  # ids in one request; more: act on a filter
BATCH = 200
SHOWN_ERRORS = 5
AUDITED_IDS = 50


class BulkAction(enum.StrEnum):
    RETRY = "retry"  # due now; failed recipients pending again (maintenance.retry)
    RESEND = "resend"  # a new copy to the original recipients (Queue.resend_sync)
    DELETE = "delete"  # the message and its attempts; never one being sent


_AUDIT = {BulkAction.RETRY: Action.MESSAGE_RETRY, BulkAction.RESEND: Action.MESSAGE_RESEND,
          BulkAction.DELETE: Action.MESSAGE_DELETE}


class ExportFormat(enum.StrEnum):
    CSV = "csv"
    EML = "eml"  # a zip of .eml files: holds the bodies


@dataclass
class BulkResult:
    action: BulkAction
    done: int = 0  # messages acted on
    skipped: int = 0  # refused one by one (being sent, body purged, gone meanwhile)
    errors: list[str] = field(default_factory=list)  # the first few reasons for skipping


def parse_action(value: str) -> BulkAction:
    try:
        return BulkAction(value)
    except ValueError:
        raise MessageError(f"action {value!r}: use one of "
                           f"{', '.join(a.value for a in BulkAction)}",
                           code="bulk.action") from None


def parse_format(value: str) -> ExportFormat:
    try:
        return ExportFormat(value)
    except ValueError:
        raise MessageError(f"format {value!r}: use csv or eml", code="export.format") from None


def page(inst: Instance, actor: Actor, flt: LogFilter, *, before: Cursor | None = None,
         limit: int = 50) -> list[dict[str, Any]]:
    """A page of the log, newest first, without bodies (store.log.Log.page)."""
    require(actor, Role.VIEWER, "read the log")
    return inst.queue.log.page(flt, before=before, limit=limit)


def count(inst: Instance, actor: Actor, flt: LogFilter, *, cap: int = COUNT_CAP) -> int:
    """How many messages match ``flt``, counting at most ``cap`` (then: "more than")."""
    require(actor, Role.VIEWER, "read the log")
    return inst.queue.log.count(flt, cap=cap)


def _batches(inst: Instance, ids: Sequence[str] | None,
             flt: LogFilter | None) -> Iterator[list[str]]:
    if ids is not None:
        for i in range(0, len(ids), BATCH):
            yield list(ids[i:i + BATCH])
    else:
        assert flt is not None
        yield from inst.queue.log.ids(flt, batch=BATCH)


def run(inst: Instance, actor: Actor, action: BulkAction, *,
        ids: Sequence[str] | None = None, flt: LogFilter | None = None) -> BulkResult:
    """Apply ``action`` to the messages ``ids`` or to every match of ``flt`` (exactly one of
    the two). Blocking; one audit row for the whole run."""
    require(actor, Role.ADMIN, f"{action.value} messages")
    if (ids is None) == (flt is None):
        raise MessageError("give the messages either by id or by a filter, not both",
                           code="bulk.target")
    if ids is not None:
        ids = list(dict.fromkeys(i for i in ids if i))
        if not ids:
            raise MessageError("no message selected: tick some, or act on the whole filter",
                               code="bulk.empty")
        if len(ids) > MAX_IDS:
            raise MessageError(f"{len(ids)} ids: at most {MAX_IDS} at once; act on a filter "
                               "instead", code="bulk.too_many")
    result = BulkResult(action)
    try:
        for batch in _batches(inst, ids, flt):
            _one_batch(inst, action, batch, result)
    finally:
        # Written even when a batch failed half-way: what was done is on record.
        detail: dict[str, Any] = {"done": result.done, "skipped": result.skipped}
        if flt is not None:
            detail["filter"] = flt.query_string()
        else:
            assert ids is not None
            detail["ids"] = list(ids[:AUDITED_IDS])
            detail["selected"] = len(ids)
        obj = ids[0] if ids is not None and len(ids) == 1 else "bulk"
        audit.record(inst.engine, actor, _AUDIT[action], obj, detail)
    return result


def _skip(result: BulkResult, msg_id: str, err: PostroomError) -> None:
    result.skipped += 1
    if len(result.errors) < SHOWN_ERRORS:
        result.errors.append(f"{msg_id}: {err}")


def _one_batch(inst: Instance, action: BulkAction, batch: list[str],
               result: BulkResult) -> None:
    from postroom.queue import maintenance
    from postroom.store.schema import SENDING, messages

    queue = inst.queue
    if action is BulkAction.DELETE:
        def op(conn: Any) -> tuple[int, int]:
            return maintenance.delete_messages(conn, batch, messages.c.status != SENDING)

        deleted, _attempts = queue.writer.run_sync(op)
        result.done += deleted
        result.skipped += len(batch) - deleted
        return
    for msg_id in batch:
        try:
            if action is BulkAction.RETRY:
                maintenance.retry(queue, msg_id)
            else:
                queue.resend_sync(msg_id)
            result.done += 1
        except PostroomError as err:  # this one cannot: say why, go on with the others
            _skip(result, msg_id, err)


# -- export -------------------------------------------------------------------------------
def begin_export(inst: Instance, actor: Actor, fmt: ExportFormat, flt: LogFilter) -> None:
    """Check ``actor`` may export in ``fmt`` (EML holds bodies: the role [admin] bodies
    names) and record the export, before a byte goes out."""
    if fmt is ExportFormat.EML:
        require(actor, body_role(inst), "export message bodies (EML)")
    else:
        require(actor, Role.VIEWER, "export the log")
    audit.record(inst.engine, actor, Action.MESSAGE_EXPORT, "log",
                 {"format": fmt.value, "filter": flt.query_string()})


def body_role(inst: Instance) -> Role:
    """The lowest role that may see message bodies ([admin] bodies)."""
    from postroom.admin.config import AdminSettings

    return Role(inst.settings.section(AdminSettings).bodies)


def csv_stream(inst: Instance, flt: LogFilter) -> Iterator[bytes]:
    """The filter's matches as CSV (queue.export's columns), a page of rows per chunk."""
    from postroom.queue import export

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(export.CSV_COLUMNS)
    for i, row in enumerate(export.iter_log(inst.queue, **_filters(flt)), 1):
        writer.writerow(export.csv_row(row))
        if i % export.PAGE == 0:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


class _Chunks(io.RawIOBase):
    """A write-only stream that hands what zipfile wrote to the response, chunk by chunk
    (zipfile writes to an unseekable stream with data descriptors)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.parts.append(data)
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def eml_zip_stream(inst: Instance, flt: LogFilter) -> Iterator[bytes]:
    """A zip of one ``<created UTC>-<id>.eml`` per match (queue.export's names), one body
    in memory at a time; purged bodies are left out."""
    from postroom.queue import export

    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:
        for row in export.iter_log(inst.queue, **_filters(flt)):
            raw = inst.queue.log.body(row["id"])
            if raw is not None:
                zf.writestr(export.eml_name(row), raw)
            chunk = sink.take()
            if chunk:
                yield chunk
    yield sink.take()


def _filters(flt: LogFilter) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(flt)
