"""What every bench script shares: its own block in docs/benchmarks.md.

Each bench owns the text between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``,
placed below the ``<!-- END GENERATED`` line (everything above that line belongs to
bench/relay_bench.py, which rewrites it)."""

from __future__ import annotations

from pathlib import Path

GEN_END = "<!-- END GENERATED"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def write_block(name: str, text: str, out: Path) -> None:
    """Replace bench ``name``'s block in ``out`` with ``text`` (which starts and ends with
    its markers), or append it below the generated part the first time."""
    begin, end = markers(name)
    doc = out.read_text() if out.exists() else ""
    if GEN_END not in doc:  # a new file: the relay bench's part comes first when it runs
        doc += ("\n" if doc else "") + GEN_END + " -->\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    out.write_text(doc)
