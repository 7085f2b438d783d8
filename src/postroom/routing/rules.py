"""Routes: which chain of connections carries a message (or some of its recipients).

``[[routes]]`` are tried in order. A route's ``match`` keys must all match (AND); each key
takes a pattern or a list of patterns (any may match), compared case-insensitively with
shell-style wildcards (``*.example.com``). A route without ``match`` matches everything:
the default route. Without any default route, the first connection is the default.

A route that matches on ``recipient_domain`` takes only the recipients in those domains;
the remaining recipients go on to the following routes. That is how mail to Gmail users can
leave by one provider and the rest of the same message by another (as Postfix's transport
maps route per recipient). A message pinned to a connection (``--connection``, the API's
``connection``) skips routing: that connection alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

Patterns = list[str]


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class Match(BaseModel):
    """What a route matches on; every given key must match."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see settings
    sender: Patterns | None = None  # the envelope sender, e.g. "alerts@*"
    sender_domain: Patterns | None = None  # e.g. "shop.example.com", "*.example.com"
    app: Patterns | None = None  # the app that handed the message in (SMTP AUTH user, API key)
    recipient_domain: Patterns | None = None  # per recipient, see the module docstring
    tag: Patterns | None = None  # any of the message's tags
    header: dict[str, Patterns] | None = None  # header name -> value pattern(s)

    @field_validator("sender", "sender_domain", "app", "recipient_domain", "tag",
                     mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("header", mode="before")
    @classmethod
    def _header_lists(cls, v: Any) -> Any:
        return {k: _as_list(p) for k, p in v.items()} if isinstance(v, dict) else v


class Route(BaseModel):
    """One ``[[routes]]`` entry: a match and the ordered chain of connections."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see settings
    name: str = ""  # names the route where Postroom reports on it; default "routes[N]"
    match: Match | None = None  # which messages (recipients) it takes; none: every one
    chain: list[str] = Field(min_length=1)  # connection names, tried in this order


@dataclass(frozen=True, slots=True)
class Facts:
    """What routing looks at, for one message."""

    sender: str
    recipients: Sequence[str]
    app: str  # "" when the message came from a trusted client without AUTH or the CLI
    tags: Sequence[str]
    headers: Mapping[str, str]  # lower-case name -> value (only the names routes use)


@dataclass(frozen=True, slots=True)
class Leg:
    """Recipients that leave by the same chain (primary first, then fallbacks)."""

    route: str
    chain: tuple[str, ...]
    recipients: tuple[str, ...]


def _any(patterns: Sequence[str], value: str) -> bool:
    value = value.lower()
    return any(fnmatchcase(value, p.lower()) for p in patterns)


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class Router:
    def __init__(self, routes: Sequence[Route], default_connection: str | None) -> None:
        self.routes = list(routes)
        if not any(r.match is None for r in self.routes) and default_connection:
            self.routes.append(Route(name="default", chain=[default_connection]))
        # Header names any route looks at: the worker reads only these from the message.
        self.header_names = sorted({
            name.lower() for r in self.routes if r.match and r.match.header
            for name in r.match.header
        })

    def _message_matches(self, m: Match, f: Facts) -> bool:
        if m.sender is not None and not _any(m.sender, f.sender):
            return False
        if m.sender_domain is not None and not _any(m.sender_domain, _domain(f.sender)):
            return False
        if m.app is not None and not _any(m.app, f.app):
            return False
        if m.tag is not None and not any(_any(m.tag, t) for t in f.tags):
            return False
        if m.header is not None:
            for name, patterns in m.header.items():
                value = f.headers.get(name.lower())
                if value is None or not _any(patterns, value):  # "*" means "present"
                    return False
        return True

    def legs(self, facts: Facts, pinned: str | None = None) -> list[Leg]:
        """Split the recipients into legs, in route order. Recipients no route takes get a
        leg with an empty chain (the worker defers them and says why)."""
        if pinned:
            return [Leg("pinned", (pinned,), tuple(facts.recipients))]
        left = list(facts.recipients)
        legs: list[Leg] = []
        for i, route in enumerate(self.routes):
            if not left:
                break
            m = route.match
            if m is not None and not self._message_matches(m, facts):
                continue
            if m is not None and m.recipient_domain is not None:
                taken = [r for r in left if _any(m.recipient_domain, _domain(r))]
            else:
                taken = left
            if taken:
                legs.append(Leg(route.name or f"routes[{i}]", tuple(route.chain), tuple(taken)))
                left = [r for r in left if r not in taken]
        if left:
            legs.append(Leg("none", (), tuple(left)))
        return legs
