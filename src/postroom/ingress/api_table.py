"""The app-facing HTTP API as data: for each operation its method, path, handler,
parameters, JSON body model, response model, status, summary and documented errors.

One table, two readers: ingress.api_dispatch serves it on the HTTP front of `postroom serve`
(pydantic validation, no FastAPI: the server stays within its memory budget), and
ingress.api_openapi describes it in the OpenAPI document, which the web admin's process
serves with FastAPI. A parameter's type and constraints are written once, here, so the
document and the validation cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from postroom.ingress.http_front import Context

Where = Literal["path", "query", "header"]


@dataclass(frozen=True)
class Param:
    """One path, query or header parameter. ``constraints`` are pydantic Field keywords
    (min_length, max_length, pattern, ge, le) applied to the value (to the list, for a
    repeated query parameter)."""

    name: str  # the handler's key in Call.args, and the OpenAPI name without an alias
    where: Where
    annotation: Any
    default: Any = None  # a path parameter is always required
    alias: str | None = None  # the name on the wire, when it differs
    description: str | None = None
    many: bool = False  # a query parameter given several times (?to=a&to=b)
    constraints: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.alias or self.name


@dataclass
class Call:
    """One request, validated: what a handler works with."""

    ctx: Context
    app: str  # the app the API key belongs to (checked by the front)
    args: dict[str, Any]  # the parameters, by Param.name, validated
    body: Any  # the JSON body as the route's model (None when optional and absent)
    raw: bytes  # the body as received
    headers: Sequence[tuple[bytes, bytes]]
    query: list[tuple[str, str]]  # every query parameter, in order, repeats kept

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


@dataclass(frozen=True)
class Answer:
    """A successful answer: status, JSON content, extra headers."""

    status: int
    content: BaseModel | Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Answer]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under the API's prefix, with {name} for each path parameter
    handler: Handler
    summary: str
    params: tuple[Param, ...] = ()
    body: Any = None  # the JSON body's model; None: the handler reads Call.raw itself
    body_required: bool = True
    status: int = 200  # documented success status (the handler's Answer says the real one)
    response_model: Any = None
    responses: Mapping[int | str, Mapping[str, Any]] = field(default_factory=dict)
    description: str | None = None
    openapi_extra: Mapping[str, Any] | None = None  # e.g. a body that is not JSON

    @property
    def name(self) -> str:
        return self.handler.__name__


class Table:
    """The routes under ``prefix``, matched by method and path."""

    def __init__(self, prefix: str, routes: Sequence[Route]) -> None:
        self.prefix = prefix
        self.routes = tuple(routes)
        self._patterns = [(re.compile(
            "^" + re.escape(prefix) + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)",
                                             re.escape(r.path)) + "$"), r)
            for r in self.routes]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | list[str]:
        """The route and its path arguments; else the methods the path takes (none: an
        unknown path). HEAD is answered as GET."""
        allowed: list[str] = []
        want = "GET" if method == "HEAD" else method
        for pattern, route in self._patterns:
            found = pattern.match(path)
            if found is None:
                continue
            if route.method == want:
                return route, found.groupdict()
            allowed.append(route.method)
        return allowed
