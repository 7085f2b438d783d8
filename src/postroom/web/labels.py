"""The words of the pages for the states the store keeps as English tokens: a message's status,
a recipient's state, an attempt's outcome, a connection's health, an OAuth grant's state and
a doctor finding's level. One table says, for each, the label shown (through gettext, in
the page's language) and its badge's tone; the token itself stays what URLs, forms, CSS
classes and the API carry.

The templates reach it through the globals ``label(Vocabulary.X, token)`` and
``tone(Vocabulary.X, token)`` (render.environment binds ``label`` to the environment's
language) and the ``badge`` macro of ``_macros.html``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


def N_(message: str) -> str:
    """Marks ``message`` for extraction (Babel's default keyword); translated when shown."""
    return message


class Vocabulary(enum.StrEnum):
    """Which kind of token: the same word may say different things ("ok")."""

    STATUS = "status"  # a message's status, a recipient's state, an attempt's outcome
    HEALTH = "health"  # a connection's circuit breaker: up, degraded, down
    OAUTH = "oauth"  # an OAuth grant: ok, dead
    FINDING = "finding"  # a doctor finding: ok, info, warn, fail
    SEVERITY = "severity"  # an event's (postroom.events.Severity): info, warning, error


class Tone(enum.StrEnum):
    """A badge's colour class in admin.css."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    NONE = ""


@dataclass(frozen=True)
class Label:
    text: str  # the English msgid
    tone: Tone = Tone.NONE


LABELS: dict[Vocabulary, dict[str, Label]] = {
    Vocabulary.STATUS: {
        "queued": Label(N_("queued")),
        "sending": Label(N_("sending")),
        "sent": Label(N_("sent"), Tone.OK),
        "partial": Label(N_("partial"), Tone.WARN),
        "deferred": Label(N_("deferred"), Tone.WARN),
        "failed": Label(N_("failed"), Tone.FAIL),
        # never sent: every recipient (a message) or this one is on the suppression list
        "suppressed": Label(N_("suppressed"), Tone.WARN),
        # recipients' states and attempts' outcomes that are not message statuses
        "pending": Label(N_("pending")),
        "fallback": Label(N_("fell back"), Tone.WARN),
        "copy": Label(N_("copy")),
        "unknown": Label(N_("unknown"), Tone.WARN),
    },
    Vocabulary.HEALTH: {
        "up": Label(N_("up"), Tone.OK),
        "degraded": Label(N_("degraded"), Tone.WARN),
        "down": Label(N_("down"), Tone.FAIL),
    },
    Vocabulary.OAUTH: {
        "ok": Label(N_("signed in"), Tone.OK),
        "dead": Label(N_("sign in again"), Tone.FAIL),
        "none": Label(N_("not signed in"), Tone.WARN),
    },
    Vocabulary.FINDING: {
        "ok": Label(N_("ok"), Tone.OK),
        "info": Label(N_("info")),
        "warn": Label(N_("warning"), Tone.WARN),
        "fail": Label(N_("failure"), Tone.FAIL),
    },
    Vocabulary.SEVERITY: {
        "info": Label(N_("info")),
        "warning": Label(N_("warning"), Tone.WARN),
        "error": Label(N_("error"), Tone.FAIL),
    },
}


def label(gettext: Callable[[str], str], kind: Vocabulary, token: str | None) -> str:
    """``token``'s label in gettext's language; a token the table does not know (a newer
    state) is shown as it is, so that nothing is hidden."""
    found = LABELS[kind].get(token or "")
    return gettext(found.text) if found is not None else str(token or "")


def tone(kind: Vocabulary, token: str | None) -> str:
    found = LABELS[kind].get(token or "")
    return found.tone.value if found is not None else ""



def duration(gettext: Callable[[str], str], seconds: float | None) -> str:
    """A wait as "3 d 4 h", "5 h 2 min", "42 s", with the units of gettext's language
    ("3 j 4 h" in French); "" for None."""
    if seconds is None:
        return ""
    s = int(seconds)
    if s >= 86400:
        return gettext("%(d)s d %(h)s h") % {"d": s // 86400, "h": s % 86400 // 3600}
    if s >= 3600:
        return gettext("%(h)s h %(m)s min") % {"h": s // 3600, "m": s % 3600 // 60}
    if s >= 60:
        return gettext("%(m)s min") % {"m": s // 60}
    return gettext("%(s)s s") % {"s": s}
