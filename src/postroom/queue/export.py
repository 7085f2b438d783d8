"""`postroom log --export csv|eml`: the log, as filtered, out of the database.

- ``csv``: one line per message (who, when, status, subject, tries, last error...; times in
  ISO 8601 UTC), for a spreadsheet or a script. Cells a spreadsheet would run as a formula
  (starting with ``= + - @``) get a leading ``'`` (OWASP "CSV injection"): subjects come
  from whoever wrote the mail.
- ``eml``: each message as it was handed in (the stored MIME, CRLF line ends), one
  ``<created UTC>-<id>.eml`` file per message in a folder (mail clients open .eml files;
  file names sort by time), or the same files in one ``.zip`` when the output path ends in
  ``.zip``. Messages whose body retention already purged have nothing to export and are
  counted as skipped.

Both stream: the log is read a page at a time (newest first, as `postroom log` shows it)
and a body one message at a time, so memory stays bounded however big the export is. Files
are written under a temporary name and renamed when complete: an interrupted export never
leaves a file that looks whole. They hold mail, so files are 0600 and a folder the export
creates is 0700, whatever the umask (postroom.fsperm).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select

from postroom.exceptions import MessageError
from postroom.fsperm import open_private, private_dir
from postroom.queue.sql import Queue
from postroom.store.log import LogFilter
from postroom.store.schema import PRIORITIES, messages

CSV_COLUMNS = ("id", "created_at", "updated_at", "status", "priority", "sender", "recipients",
               "from_header", "to_header", "subject", "message_id", "source", "connection",
               "attempt_count", "last_error", "tags", "size")
_PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
PAGE = 500


def iter_log(queue: Queue, *, limit: int | None = None, page: int = PAGE,
             **filters: Any) -> Iterator[dict[str, Any]]:
    """Every message the log filter ``LogFilter(**filters)`` matches (up to ``limit``),
    newest first, read a page at a time with the log's cursor."""
    wanted = LogFilter(**filters)
    before: tuple[float, str] | None = None
    left = limit
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        rows = queue.log.page(wanted, before=before, limit=size)
        yield from rows
        if len(rows) < size:
            return
        before = (rows[-1]["created_at"], rows[-1]["id"])
        if left is not None:
            left -= len(rows)


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def csv_row(row: dict[str, Any]) -> list[Any]:
    out: dict[str, Any] = {
        **row,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "priority": _PRIORITY_NAMES.get(row.get("priority", 0), row.get("priority")),
        "recipients": ", ".join(row["recipients"]),
        "tags": ", ".join(row.get("tags") or []),
        "connection": row.get("connection") or "",
        "last_error": row.get("last_error") or "",
    }
    return [_cell(out.get(c, "")) for c in CSV_COLUMNS]


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO,
              progress: Callable[[int], None] | None = None) -> int:
    """Header line, then one line per row; returns how many rows were written."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(csv_row(row))
        n += 1
        if progress is not None:
            progress(1)
    return n


def eml_name(row: dict[str, Any]) -> str:
    stamp = dt.datetime.fromtimestamp(row["created_at"], dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{row['id']}.eml"


def _body(queue: Queue, msg_id: str) -> bytes | None:
    with queue.engine.connect() as conn:
        raw = conn.execute(select(messages.c.raw).where(messages.c.id == msg_id)).scalar()
    return None if raw is None else bytes(raw)


def write_eml(queue: Queue, rows: Iterable[dict[str, Any]], dest: Path,
              progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Each message's MIME into folder ``dest`` (created if needed), or into the zip file
    ``dest`` when it ends in .zip. Returns (written, skipped because the body was purged)."""
    written = skipped = 0
    if dest.suffix.lower() == ".zip":
        if dest.is_dir():
            raise MessageError(f"--out {dest}: is a folder; name a .zip file", code="cli.out")
        part = dest.with_name(dest.name + ".part")
        try:
            with open_private(part, "wb") as raw_out, \
                    zipfile.ZipFile(raw_out, "w", zipfile.ZIP_DEFLATED) as zf:
                for row in rows:
                    raw = _body(queue, row["id"])
                    if raw is None:
                        skipped += 1
                    else:
                        zf.writestr(eml_name(row), raw)
                        written += 1
                    if progress is not None:
                        progress(1)
            os.replace(part, dest)
        except OSError as err:
            raise MessageError(f"--out {dest}: {err.strerror or err}", code="cli.out") from err
        finally:
            part.unlink(missing_ok=True)
        return written, skipped
    try:
        private_dir(dest)
        for row in rows:
            raw = _body(queue, row["id"])
            if raw is None:
                skipped += 1
            else:
                target = dest / eml_name(row)
                part = target.with_name(target.name + ".part")
                with open_private(part, "wb") as f:
                    f.write(raw)
                os.replace(part, target)
                written += 1
            if progress is not None:
                progress(1)
    except OSError as err:
        raise MessageError(f"--out {dest}: {err.strerror or err}", code="cli.out") from err
    return written, skipped


def export_csv_file(rows: Iterable[dict[str, Any]], dest: Path,
                    progress: Callable[[int], None] | None = None) -> int:
    """CSV into the file ``dest`` (replaced once complete)."""
    part = dest.with_name(dest.name + ".part")
    try:
        with open_private(part, "w", encoding="utf-8", newline="") as f:
            n = write_csv(rows, f, progress)
        os.replace(part, dest)
    except OSError as err:
        raise MessageError(f"--out {dest}: {err.strerror or err}", code="cli.out") from err
    finally:
        part.unlink(missing_ok=True)
    return n
