"""`postroom log --export csv|eml [--out PATH]` (the formats: postroom.queue.export)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.commands._common import console, fail, guard, progress
from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from postroom.runtime import Instance

FORMATS = ("csv", "eml")


def export_log(inst: Instance, fmt: str, out: Path | None, *, limit: int | None,
               **filters: Any) -> None:
    """Export what `postroom log` with these filters matches: every match unless ``limit``."""
    from postroom.queue import export

    if fmt not in FORMATS:
        fail(MessageError(f"--export {fmt!r}: use csv or eml", code="cli.export"))
    rows = export.iter_log(inst.queue, limit=limit, **filters)
    con = console(stderr=True)  # stdout may be the CSV itself
    if fmt == "csv":
        if out is None:
            n = guard(lambda: export.write_csv(rows, sys.stdout))
            sys.stdout.flush()
            return
        with progress(f"exporting to {out}", None) as advance:
            n = guard(lambda: export.export_csv_file(rows, out, advance))
        con.print(f"{n} message(s) written to {out}", markup=False)
        return
    if out is None:
        fail(MessageError("--export eml needs --out: a folder (one .eml file per message) or "
                          "a FILE.zip", code="cli.out"))
    with progress(f"exporting to {out}", None) as advance:
        written, skipped = guard(lambda: export.write_eml(inst.queue, rows, out, advance))
    where = "into" if out.suffix.lower() == ".zip" else "in"
    con.print(f"{written} message(s) written {where} {out}"
              + (f"; {skipped} skipped: body purged by retention" if skipped else ""),
              markup=False)
