"""The app API's operations (ingress.api_table) in the FastAPI application's OpenAPI document.

FastAPI describes an operation from its endpoint's signature; each route of the table gets
one here, made from its parameters (their types and constraints as pydantic Field keywords
become Path, Query and Header declarations) and its body, with the same names, summaries
and responses, so the document stays what it was when FastAPI served these operations.
The routes only document: they match no request (the HTTP front serves the table itself,
ingress.api_dispatch), so this application never answers them a second way.

Imported by http_api.create_app only, in the process that serves the document.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import Match
from starlette.types import Scope

from postroom.ingress.api_table import Param, Route, Table

bearer = HTTPBearer(
    auto_error=False, scheme_name="apiKey", bearerFormat="NAME.SECRET",
    description="The API key `postroom app add NAME` prints: `Authorization: Bearer NAME.SECRET`.",
)
_KINDS = {"path": Path, "query": Query, "header": Header}


class DocumentedRoute(APIRoute):
    """In the OpenAPI document, never matched: served by the HTTP front."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return Match.NONE, {}


def _parameter(param: Param) -> inspect.Parameter:
    extra: dict[str, Any] = dict(param.constraints)
    if param.alias is not None:
        extra["alias"] = param.alias
    if param.description is not None:
        extra["description"] = param.description
    declared = _KINDS[param.where](**extra)
    return inspect.Parameter(
        param.name, inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[param.annotation, declared],
        default=inspect.Parameter.empty if param.where == "path" else param.default)


def _endpoint(route: Route) -> Any:
    """A function FastAPI reads the operation from (never called)."""
    params = [inspect.Parameter(
        # The Authorization header: declares the security scheme on the operation.
        "creds", inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[HTTPAuthorizationCredentials | None, Security(bearer)])]
    if route.body is not None:
        params.append(inspect.Parameter(
            "body", inspect.Parameter.KEYWORD_ONLY, annotation=route.body)
            if route.body_required else inspect.Parameter(
            "body", inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[route.body | None, Body()], default=None))
    params += [_parameter(p) for p in route.params]

    async def endpoint(**_: Any) -> None:
        raise AssertionError("documentation only")  # DocumentedRoute matches no request

    endpoint.__name__ = endpoint.__qualname__ = route.name  # FastAPI's operationId
    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return endpoint


def _responses(given: Mapping[int | str, Mapping[str, Any]]) -> dict[int | str, dict[str, Any]]:
    return {status: dict(doc) for status, doc in given.items()}


def router(table: Table, errors: Mapping[int | str, Mapping[str, Any]]) -> APIRouter:
    """The table's operations, with ``errors`` documented on each."""
    out = APIRouter(prefix=table.prefix, responses=_responses(errors),
                    route_class=DocumentedRoute)
    for route in table.routes:
        out.add_api_route(
            route.path, _endpoint(route), methods=[route.method], status_code=route.status,
            response_model=route.response_model, summary=route.summary,
            description=route.description, responses=_responses(route.responses),
            openapi_extra=dict(route.openapi_extra) if route.openapi_extra else None)
    return out
