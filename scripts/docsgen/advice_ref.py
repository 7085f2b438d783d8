"""docs/reference/advice.md: every cause and fix of the advice catalog
(src/postroom/diagnostics/advice.toml), grouped as the file groups them ("# ---- TLS ----"
comment lines), each entry under its id as its anchor.

The texts come from postroom.diagnostics.advice.catalog() (as Postroom prints them); the
groups and each entry's match criteria from the file itself, which the catalog keeps no
record of.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from typing import Any

from docsgen.markdown import GENERATED, code, heading, prose, slug
from postroom.diagnostics.advice import Facts, catalog

_GROUP = re.compile(r"^# -{3,} (.+?) -{3,}\s*$")
_ID = re.compile(r'^id\s*=\s*"([^"]+)"')


def render() -> str:
    text = resources.files("postroom.diagnostics").joinpath("advice.toml").read_text("utf-8")
    groups = _groups(text)
    matches = {e["id"]: e["match"] for e in tomllib.loads(text)["entry"]}
    entries = catalog()
    order: dict[str, list[str]] = {}
    for entry in entries:
        order.setdefault(groups.get(entry.id, "Other"), []).append(entry.id)
    by_id = {e.id: e.advice for e in entries}
    lines = [
        "# Advice catalog", "",
        GENERATED.format(source="`src/postroom/diagnostics/advice.toml`"), "",
        f"Every failure Postroom can explain: {len(entries)} entries, each with its cause and "
        "its fix. The log, `postroom test`, `postroom show` and the web admin print the "
        "entry that fits a failure best; its id links here (`#<id>`). In a fix, HOST, PORT "
        "and CONNECTION stand for the failing server and connection.", "",
        *(f"- [{prose(group)}](#{slug(group)}) ({len(ids)})" for group, ids in order.items()),
        "",
    ]
    for group, ids in order.items():
        lines += [heading(2, group[:1].upper() + group[1:], slug(group)), ""]
        for ident in ids:
            advice = by_id[ident].filled(Facts())  # {host} -> HOST...
            lines += [heading(3, ident, ident), "",
                      f"**Cause:** {prose(advice.cause)}", "",
                      f"**Fix:** {prose(advice.fix)}", ""]
            if advice.docs:
                lines += ["**Read:** " + ", ".join(f"<{url}>" for url in advice.docs), ""]
            lines += [f"**Matches:** {_criteria(matches[ident])}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _groups(text: str) -> dict[str, str]:
    """Entry id -> the title of the "# ---- title ----" line above it."""
    out: dict[str, str] = {}
    group = "Other"
    for line in text.splitlines():
        if m := _GROUP.match(line):
            group = re.sub(r"\s*\(.*\)$", "", m.group(1))  # "(transports/_http.py...)"
        elif m := _ID.match(line):
            out[m.group(1)] = group
    return out


def _criteria(match: Any) -> str:
    """An entry's match tables in words: each table is one way the entry is chosen."""
    tables = match if isinstance(match, list) else [match]
    ways = []
    for table in tables:
        parts = []
        for key, value in table.items():
            values = value if isinstance(value, list) else [value]
            parts.append(f"{key} " + " or ".join(code(str(v)) for v in values))
        ways.append(", ".join(parts))
    return "; or ".join(ways)
