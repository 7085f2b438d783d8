"""How `postroom serve` and `postroom worker` write their log lines to stderr: ``[log] format``
text (for a person at a terminal), json (one JSON object a line) or logfmt (``key=value``
pairs, as Heroku and Grafana Loki read them); journald keeps stderr as it is.

A record may carry structured fields in its ``postroom`` attribute (``extra={"postroom":
{...}}``, as postroom.maillog does): json and logfmt write them as keys of their own, so a
log shipper can filter on ``id`` or ``status`` without parsing the sentence.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

FIELDS = "postroom"  # the LogRecord attribute holding a record's structured fields
# One encoder for every line: json.dumps with options builds a new one per call, which costs
# as much again as the encoding itself (two lines a message on a busy server).
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
_PLAIN = re.compile(r'[^\s="\\]+')  # a logfmt value written without quotes
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    value = getattr(record, FIELDS, None)
    return dict(value) if isinstance(value, dict) else {}


def _base(record: logging.LogRecord) -> dict[str, Any]:
    """The keys every line has: time (UTC, ISO 8601 with milliseconds), level, logger,
    message; then the record's own fields; then the traceback, if any."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    out: dict[str, Any] = {"ts": f"{at}.{int(record.msecs):03d}Z",
                           "level": record.levelname.lower(), "logger": record.name,
                           "msg": record.getMessage()}
    for key, value in fields_of(record).items():
        out.setdefault(key, value)  # a field never hides one of the four above
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line (non-ASCII kept as is; a newline inside a value is escaped,
    so a line is always one record)."""

    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)


def _logfmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text and _PLAIN.fullmatch(text):
        return text
    # Quoted as Go's strconv.Quote would for these characters: what logfmt parsers undo.
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=postroom.mail msg="..." id=... status=sent``."""

    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in out.items())


class _Chosen:
    """The format the process's stderr handler uses (set by :func:`formatter`)."""

    name = "text"


def formatter(name: str) -> logging.Formatter:
    """The formatter for ``[log] format`` (validated by settings.LogSettings), remembered as
    this process's (see :func:`structured`)."""
    _Chosen.name = name
    if name == "json":
        return JsonFormatter()
    if name == "logfmt":
        return LogfmtFormatter()
    return logging.Formatter(TEXT_FORMAT)


def structured() -> bool:
    """Whether stderr takes json or logfmt lines: then a message for the operator (the
    server's start-up notes) is a log record too, never a bare line a parser would choke
    on."""
    return _Chosen.name != "text"
