"""The app API (ingress.http_api's route table) served on the HTTP front's ASGI scope,
without FastAPI: `postroom serve` answers its apps in ~10 MB less (issue 19.4).

The front has already checked the API key and read the body under its limits; here the
route is found, the parameters and the JSON body validated with pydantic and the handler
called. Requests are read as FastAPI read them, so the answers stay what the tests and the
OpenAPI document say: a JSON body only when the Content-Type is JSON (or absent), the last
value of a repeated single-valued query parameter, errors in the API's one JSON shape
(http_errors) with the same codes and ``field``, 404 for an unknown path, 405 with ``Allow``
for a method the path does not take, a bare 500 (logged here) for an unexpected exception.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping
from email.message import Message as MimeHeader
from typing import Annotated, Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from postroom.ingress import http_errors
from postroom.ingress.api_table import Answer, Call, Param, Route
from postroom.ingress.http_api import TABLE
from postroom.ingress.http_auth import AUTH_STATE
from postroom.ingress.http_errors import HttpError
from postroom.ingress.http_front import Context, Scope, Send

log = logging.getLogger(__name__)
_ABSENT = object()  # a body that is not JSON (FastAPI validates its bytes, and refuses them)


@functools.cache
def _adapter(annotation: Any, constraints: tuple[tuple[str, Any], ...]) -> TypeAdapter[Any]:
    if constraints:
        annotation = Annotated[annotation, Field(**dict(constraints))]
    return TypeAdapter(annotation)


def _validator(param: Param) -> TypeAdapter[Any]:
    return _adapter(param.annotation, tuple(sorted(param.constraints.items())))


def _errors(err: ValidationError, *where: Any) -> list[dict[str, Any]]:
    return [{**e, "loc": (*where, *e["loc"])} for e in err.errors(include_url=False)]


def _value(param: Param, scope: Scope, query: list[tuple[str, str]],
           path: Mapping[str, str]) -> Any:
    """The parameter's raw value from the request, or _ABSENT."""
    if param.where == "path":
        return path.get(param.key, _ABSENT)
    if param.where == "header":
        name = param.key.lower().encode("latin-1")
        for key, value in scope["headers"]:
            if key == name:
                return value.decode("latin-1")
        return _ABSENT
    values = [v for k, v in query if k == param.key]
    if param.many:
        return values or _ABSENT
    return values[-1] if values else _ABSENT


def _arguments(route: Route, scope: Scope, query: list[tuple[str, str]],
               path: Mapping[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    args: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    # FastAPI's order: path, then query, then header parameters; the first error is the one
    # the answer explains.
    for where in ("path", "query", "header"):
        for param in route.params:
            if param.where != where:
                continue
            raw = _value(param, scope, query, path)
            if raw is _ABSENT:
                if param.where == "path":
                    errors.append({"type": "missing", "loc": (where, param.key),
                                   "msg": "Field required", "input": None})
                args[param.name] = param.default
                continue
            try:
                args[param.name] = _validator(param).validate_python(raw)
            except ValidationError as err:
                errors += _errors(err, where, param.key)
    return args, errors


def _json_body(scope: Scope, raw: bytes) -> Any:
    """The body as FastAPI reads it: None when empty; parsed when the Content-Type is JSON
    or missing; else the bytes (which no JSON body model accepts). Raises ValueError (not
    JSON) or UnicodeDecodeError (not UTF-8)."""
    if not raw:
        return None
    ctype = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"),
                 None)
    if ctype is not None and ctype != "application/json":  # (what nearly every client sends)
        header = MimeHeader()
        header["content-type"] = ctype
        subtype = header.get_content_subtype()
        if header.get_content_maintype() != "application" or not (
                subtype == "json" or subtype.endswith("+json")):
            return raw
    return json.loads(raw)


def _body(route: Route, value: Any) -> tuple[Any, list[dict[str, Any]]]:
    if value is None:
        if route.body_required:
            return None, [{"type": "missing", "loc": ("body",), "msg": "Field required",
                           "input": None}]
        return None, []
    try:
        # from_attributes: what FastAPI validates a body with (a list is then
        # "model_attributes_type", answered as "the body must be a JSON object").
        return _adapter(route.body, ()).validate_python(value, from_attributes=True), []
    except ValidationError as err:
        return None, _errors(err, "body")


async def _send(send: Send, status: int, data: bytes,
                headers: Iterable[tuple[str, str]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)]})
    await send({"type": "http.response.body", "body": data})


def _encode(content: BaseModel | Mapping[str, Any]) -> bytes:
    if isinstance(content, BaseModel):
        return content.model_dump_json(by_alias=True).encode()
    return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


async def _error(send: Send, status: int, content: dict[str, Any],
                 headers: Iterable[tuple[str, str]] = ()) -> None:
    await _send(send, status, _encode(content), headers)


def _valid_json(scope: Scope, raw: bytes, route: Route) -> Any:
    """The body as the route's model, parsed and validated in one pass by pydantic when it
    is JSON and valid; else _ABSENT, and the body is read as FastAPI reads it (json.loads,
    then validation) for the refusal to say what it says. Where both accept a body they give
    the same model; the one pass takes a fraction of the time on a big body (base64
    attachments)."""
    if not raw:
        return _ABSENT
    for name, value in scope["headers"]:
        if name == b"content-type" and value != b"application/json":
            return _ABSENT
    try:
        return _adapter(route.body, ()).validate_json(raw)
    except ValidationError:
        return _ABSENT


async def _call(ctx: Context, scope: Scope, body: bytes, route: Route,
                path: Mapping[str, str]) -> Answer | tuple[int, dict[str, Any]]:
    """The handler's answer, or the status and body of the request's refusal."""
    value = None
    validated = False
    if route.body is not None:
        value = _valid_json(scope, body, route)
        validated = value is not _ABSENT
    if route.body is not None and not validated:
        try:
            value = _json_body(scope, body)
        except json.JSONDecodeError as err:
            return 422, http_errors.invalid([{
                "type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error",
                "input": {}, "ctx": {"error": err.msg}}])
        except ValueError:  # not UTF-8: FastAPI's "error parsing the body"
            return 422, http_errors.unreadable("There was an error parsing the body")
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                      keep_blank_values=True)
    args, errors = _arguments(route, scope, query, path)
    if route.body is not None and not validated:
        value, more = _body(route, value)
        errors += more
    if errors:
        return 422, http_errors.invalid(errors)
    app = scope["state"][AUTH_STATE]  # put there by the front's key check
    return await route.handler(Call(ctx, app, args, value, body, scope["headers"], query))


async def serve(ctx: Context, scope: Scope, body: bytes, send: Send) -> None:
    """Answer one authenticated request under the API's prefix; ``body`` is the whole
    request body, read by the front."""
    found = TABLE.match(scope["method"], scope["path"])
    if isinstance(found, list):
        if not found:
            await _error(send, 404, http_errors.route_unknown())
            return
        allow = ", ".join(dict.fromkeys(
            m for method in found for m in ((method, "HEAD") if method == "GET" else (method,))))
        await _error(send, 405, http_errors.body(
            "method.not_allowed", "this endpoint does not take that method", f"use {allow}"),
            [("Allow", allow)])
        return
    route, path = found
    try:
        answer = await _call(ctx, scope, body, route, path)
    except HttpError as err:
        await _error(send, err.status, http_errors.of_error(err), err.headers.items())
        return
    except Exception:
        log.exception("HTTP %s %s failed", scope["method"], scope["path"])
        await _error(send, 500, http_errors.internal())
        return
    if isinstance(answer, tuple):
        await _error(send, *answer)
    else:
        await _send(send, answer.status, _encode(answer.content), answer.headers.items())
