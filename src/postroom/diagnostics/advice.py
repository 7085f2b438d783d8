"""Error advice: what a failure means and how to fix it, from one data file (advice.toml).

An error is described by :class:`Facts`: Postroom's stable error ``code``, the SMTP reply
code, the enhanced status code (RFC 3463, read from the reply text), the reply text, the
server's host (which provider) and what the transcript shows (the security mode, whether
the server said anything, what was sent). Each catalog entry has one or more ``match``
tables; every criterion of a table must hold. Of the entries that match, the most specific
wins (a provider's exact text beats a reply code, which beats a bare error code); ties go to
the entry written first.

Criteria of a match table (each optional, at least one):

- ``code``: our error codes; "auth" also matches "auth.rejected" (dotted prefix)
- ``not_code``: codes the error must not have (the same prefix rule)
- ``reply``: SMTP reply codes, exact ("535") or a class ("5xx")
- ``enhanced``: enhanced status codes, each part may be "*" ("*.7.26")
- ``text``: a regular expression searched (case-insensitive) in the reply text or message
- ``host``: a regular expression for the server's host name (provider-specific advice)
- ``security``: the connection's mode ("none", "starttls", "smtps")
- ``transcript``: a regular expression (multi-line) searched in the session transcript
- ``server_spoke``: whether the server said anything at all in the session
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from postroom.exceptions import ConfigError, DeliveryError, PostroomError

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_CONNECTING = re.compile(r"^\*\s+connecting to (\S+):(\d+) \((\w+)\)", re.M)
_CRITERIA = {"code", "not_code", "reply", "enhanced", "text", "host", "security", "transcript",
             "server_spoke"}
# Specificity: a provider's words (text) beat our error code alone, which beats a reply code
# alone; criteria add up. "auth.rejected" (two segments) counts 4, "auth" 2.
_WEIGHT = {"reply": 2, "enhanced": 3, "text": 5, "host": 4, "transcript": 3, "security": 1,
           "server_spoke": 1}


@dataclass(frozen=True)
class Facts:
    """What is known about one failure."""

    code: str | None = None
    reply_code: int | None = None
    text: str = ""
    host: str | None = None
    security: str | None = None
    transcript: str = ""
    enhanced: str | None = None  # read from ``text`` when not given
    port: int | None = None
    connection: str | None = None  # the connection's name, for {connection} in a fix
    signin: str | None = None  # how to sign in on this instance, for {signin} (OAuth)

    @property
    def status(self) -> str | None:
        if self.enhanced:
            return self.enhanced
        m = _ENHANCED.search(self.text)
        return ".".join(m.groups()) if m else None

    @property
    def words(self) -> str:
        """The text as one sentence: multi-line replies repeat the enhanced status code at the
        start of every line ("550-5.7.26 ... hard\n550 5.7.26 fail policy"), which would split
        the provider's phrases; they are dropped here (``status`` keeps the code)."""
        return " ".join(_ENHANCED.sub(" ", self.text).split())

    @property
    def server_spoke(self) -> bool:
        return any(line.startswith("S: ") for line in self.transcript.splitlines())

    def with_transcript_facts(self) -> Facts:
        """Fill host and security from the transcript's "connecting to HOST:PORT (MODE)"."""
        m = _CONNECTING.search(self.transcript)
        if not m:
            return self
        return replace(self, host=self.host or m.group(1), security=self.security or m.group(3),
                       port=self.port or int(m.group(2)))


@dataclass(frozen=True)
class Advice:
    id: str
    cause: str
    fix: str
    docs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "cause": self.cause, "fix": self.fix, "docs": list(self.docs)}

    def filled(self, facts: Facts) -> Advice:
        """With {host} and {port} replaced by the failing server's (HOST/PORT if unknown),
        {connection} by its name and {signin} by how to sign in (OAuth)."""
        name = facts.connection or "CONNECTION"
        values = {"{host}": facts.host or "HOST", "{port}": str(facts.port or "PORT"),
                  "{signin}": facts.signin or f"run `postroom oauth login {name}`",
                  "{connection}": name}

        def fill(text: str) -> str:
            for key, value in values.items():
                text = text.replace(key, value)
            return text

        return Advice(self.id, fill(self.cause), fill(self.fix), self.docs)


@dataclass(frozen=True)
class _Match:
    codes: tuple[str, ...] = ()
    not_codes: tuple[str, ...] = ()
    replies: tuple[str, ...] = ()
    enhanced: tuple[tuple[str, str, str], ...] = ()
    text: re.Pattern[str] | None = None
    host: re.Pattern[str] | None = None
    security: tuple[str, ...] = ()
    transcript: re.Pattern[str] | None = None
    server_spoke: bool | None = None
    specificity: int = 0

    def score(self, f: Facts) -> int | None:
        """The specificity when every criterion holds, else None."""
        if self.codes and not (f.code and any(_code_in(f.code, c) for c in self.codes)):
            return None
        if f.code and any(_code_in(f.code, c) for c in self.not_codes):
            return None
        if self.replies and not (f.reply_code and any(_reply_in(f.reply_code, r)
                                                      for r in self.replies)):
            return None
        if self.enhanced:
            status = f.status
            if not status or not any(_status_in(status, e) for e in self.enhanced):
                return None
        if self.text and not self.text.search(f.words):
            return None
        if self.host and not (f.host and self.host.search(f.host)):
            return None
        if self.security and f.security not in self.security:
            return None
        if self.transcript and not self.transcript.search(f.transcript):
            return None
        if self.server_spoke is not None and f.server_spoke != self.server_spoke:
            return None
        return self.specificity


@dataclass(frozen=True)
class Entry:
    advice: Advice
    matches: tuple[_Match, ...] = field(default=())

    @property
    def id(self) -> str:
        return self.advice.id

    def score(self, facts: Facts) -> int | None:
        scores = [s for m in self.matches if (s := m.score(facts)) is not None]
        return max(scores) if scores else None


def _code_in(code: str, pattern: str) -> bool:
    return code == pattern or code.startswith(pattern + ".")


def _reply_in(code: int, pattern: str) -> bool:
    text = str(code)
    return len(pattern) == 3 and all(p in ("x", c) for p, c in zip(pattern, text, strict=True))


def _status_in(status: str, pattern: tuple[str, str, str]) -> bool:
    return all(p in ("*", s) for p, s in zip(pattern, status.split("."), strict=True))


# -- the catalog ------------------------------------------------------------------------------
def _bad(where: str, what: str) -> ConfigError:
    return ConfigError(f"advice catalog, {where}: {what}", code="config.advice")


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str | int) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(i, str | int) for i in items):
        raise _bad(where, f"{key} must be a string or a list of strings")
    return tuple(str(i) for i in items)


def _regex(value: Any, where: str, key: str, flags: int = 0) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise _bad(where, f"{key} must be a regular expression")
    try:
        return re.compile(value, re.IGNORECASE | flags)
    except re.error as err:
        raise _bad(where, f"{key} {value!r}: {err}") from err


def _match(table: Any, where: str) -> _Match:
    if not isinstance(table, dict) or not table:
        raise _bad(where, "each match must be a table with at least one criterion")
    unknown = set(table) - _CRITERIA
    if unknown:
        raise _bad(where, f"unknown criteria {sorted(unknown)} (known: {sorted(_CRITERIA)})")
    codes = _strings(table["code"], where, "code") if "code" in table else ()
    not_codes = _strings(table["not_code"], where, "not_code") if "not_code" in table else ()
    replies = _strings(table["reply"], where, "reply") if "reply" in table else ()
    for r in replies:
        if not re.fullmatch(r"[2-5][0-9x][0-9x]", r):
            raise _bad(where, f"reply {r!r}: use a code like 535 or a class like 5xx")
    enhanced: list[tuple[str, str, str]] = []
    for e in _strings(table["enhanced"], where, "enhanced") if "enhanced" in table else ():
        parts = e.split(".")
        if len(parts) != 3 or not all(p == "*" or p.isdigit() for p in parts):
            raise _bad(where, f"enhanced {e!r}: use a status like 5.7.8 or *.7.26")
        enhanced.append((parts[0], parts[1], parts[2]))
    spoke = table.get("server_spoke")
    if spoke is not None and not isinstance(spoke, bool):
        raise _bad(where, "server_spoke must be true or false")
    score = max((2 + 2 * c.count(".") for c in codes), default=0)
    score += sum(_WEIGHT[k] for k in ("text", "host", "transcript", "security", "server_spoke")
                 if k in table)
    if replies:
        score += 1 if any("x" in r for r in replies) else _WEIGHT["reply"]
    if enhanced:
        score += 2 if any("*" in e for e in enhanced) else _WEIGHT["enhanced"]
    return _Match(
        codes=codes,
        not_codes=not_codes,
        replies=replies,
        enhanced=tuple(enhanced),
        text=_regex(table["text"], where, "text") if "text" in table else None,
        host=_regex(table["host"], where, "host") if "host" in table else None,
        security=_strings(table["security"], where, "security") if "security" in table else (),
        transcript=(_regex(table["transcript"], where, "transcript", re.M | re.S)
                    if "transcript" in table else None),
        server_spoke=spoke,
        specificity=score,
    )


def load_catalog(text: str) -> tuple[Entry, ...]:
    """Parse and check a catalog (the format in the module docstring)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _bad("syntax", str(err)) from err
    raw = data.get("entry")
    if not isinstance(raw, list) or not raw:
        raise _bad("top", "no [[entry]] tables")
    entries: list[Entry] = []
    seen: set[str] = set()
    for i, e in enumerate(raw):
        where = f"entry {i + 1}"
        if not isinstance(e, dict):
            raise _bad(where, "not a table")
        ident = e.get("id")
        if not isinstance(ident, str) or not re.fullmatch(r"[a-z0-9_.-]+", ident):
            raise _bad(where, "id must be lower-case letters, digits, '.', '_' or '-'")
        where = f"entry {ident!r}"
        if ident in seen:
            raise _bad(where, "id used twice")
        seen.add(ident)
        unknown = set(e) - {"id", "cause", "fix", "docs", "match"}
        if unknown:
            raise _bad(where, f"unknown keys {sorted(unknown)}")
        for key in ("cause", "fix"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise _bad(where, f"{key} must be a non-empty string")
        docs = _strings(e["docs"], where, "docs") if "docs" in e else ()
        matches = e.get("match")
        if isinstance(matches, dict):
            matches = [matches]
        if not isinstance(matches, list) or not matches:
            raise _bad(where, "match must be a table or a list of tables")
        entries.append(Entry(Advice(ident, " ".join(e["cause"].split()),
                                    " ".join(e["fix"].split()), docs),
                             tuple(_match(m, where) for m in matches)))
    return tuple(entries)


@cache
def catalog() -> tuple[Entry, ...]:
    """The catalog shipped with Postroom (postroom/diagnostics/advice.toml)."""
    text = resources.files("postroom.diagnostics").joinpath("advice.toml").read_text("utf-8")
    return load_catalog(text)


def advise(facts: Facts, entries: tuple[Entry, ...] | None = None) -> Advice | None:
    """The most specific entry that matches ``facts`` (None when nothing does)."""
    facts = facts.with_transcript_facts()
    best: tuple[int, int, Entry] | None = None
    for order, entry in enumerate(catalog() if entries is None else entries):
        score = entry.score(facts)
        if score is not None and (best is None or (score, -order) > (best[0], -best[1])):
            best = (score, order, entry)
    return best[2].advice.filled(facts) if best else None


def facts_for_error(err: BaseException, *, host: str | None = None,
                    security: str | None = None) -> Facts:
    code = err.code if isinstance(err, PostroomError) else None
    if isinstance(err, DeliveryError):
        text = " ".join(t for t in (err.reply_text, err.message) if t)
        return Facts(code, err.reply_code, text, host, security, err.transcript)
    return Facts(code, None, str(err), host, security)


def advise_error(err: BaseException, *, host: str | None = None,
                 security: str | None = None) -> Advice | None:
    """Advice for an exception (ours, or a foreign one by its message)."""
    return advise(facts_for_error(err, host=host, security=security))


def advice_for_attempt(
    attempt: Mapping[str, Any],
    *,
    settings: Any = None,
    host: str | None = None,
) -> dict[str, Any] | None:
    """Advice for one attempt record (``attempts`` row as ``Queue.get`` returns it): for the
    session's error, else for the first refused recipient (permanent refusals first). With
    ``settings`` (postroom.settings.Settings), the attempt's connection gives the host and
    security mode when the transcript does not. Returns Advice.to_dict() (plus "recipient"
    when it is about one recipient), or None when the attempt succeeded or nothing matches."""
    conn_host, conn_security, conn_port = host, None, None
    name = str(attempt.get("connection") or "") or None
    signin = sign_in_hint(settings, name) if name else None
    if settings is not None and attempt.get("connection"):
        try:
            conn = settings.connection(str(attempt["connection"]))
        except PostroomError:
            conn = None
        conn_host = conn_host or getattr(conn, "host", None)
        conn_security = getattr(conn, "security", None)
        conn_port = getattr(conn, "effective_port", None)
    transcript = str(attempt.get("transcript") or "")
    if attempt.get("error_code"):
        text = " ".join(str(t) for t in (attempt.get("reply_text"), attempt.get("error_message"))
                        if t)
        found = advise(Facts(str(attempt["error_code"]), _int(attempt.get("reply_code")), text,
                             conn_host, conn_security, transcript, port=conn_port,
                             connection=name, signin=signin))
        return found.to_dict() if found else None
    refused = [(rcpt, r) for rcpt, r in (attempt.get("recipients") or {}).items()
               if isinstance(r, Mapping) and not 200 <= (_int(r.get("code")) or 0) < 300]
    refused.sort(key=lambda item: 0 if str(item[1].get("state")) == "failed" else 1)
    for rcpt, r in refused:
        found = advise(Facts(None, _int(r.get("code")), str(r.get("reply") or ""), conn_host,
                             conn_security, transcript, port=conn_port))
        if found:
            return {**found.to_dict(), "recipient": rcpt}
    return None


def sign_in_hint(settings: Any, connection: str) -> str:
    """How to sign ``connection`` in again on this instance: with the link `postroom oauth
    login` prints where a Postroom serves it (server.http_listen on, or [oauth] public_url),
    else with a code (the device flow)."""
    from postroom.oauth.errors import sign_in_how
    from postroom.oauth.providers import PROVIDERS

    if settings is None:
        return f"run `postroom oauth login {connection}`"
    try:
        conn = settings.connection(connection)
    except PostroomError:
        conn = None
    cfg = getattr(conn, "oauth", None)
    known = PROVIDERS.get(str(getattr(cfg, "provider", "")))
    device = known is None or not set(
        known.scopes.get(str(getattr(conn, "transport", "")), known.scopes.get("*", ()))
    ) & set(known.device_refuses)
    oauth = getattr(settings, "oauth", None)
    if getattr(settings, "http_listen", None) or getattr(oauth, "public_url", None):
        return (f"run `postroom oauth login {connection}` and open the link it prints"
                + (" (no browser at hand: add --device)" if device else ""))
    return sign_in_how(connection, "", device=device)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
