"""Every error of the HTTP API as one JSON shape: ``{"error": {"code", "message", "fix",
"field"}}`` with the right status (401, 404, 409, 413, 415, 422, 503), and never a traceback:
an unexpected exception becomes a bare 500 whose details go to the server log only.

The bodies are built here for both servers of the API: ingress.api_dispatch (the app API
on the front, without FastAPI) and the FastAPI application (``install``: the web admin's
JSON API), which imports FastAPI only when it is installed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from postroom.exceptions import PostroomError

if TYPE_CHECKING:  # FastAPI only where it runs: the app API on the front goes without it
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

_SCHEMA_FIX = "see the request schema at /api/v1/docs"


class HttpError(PostroomError):
    """An API answer other than success: status, stable code, what is wrong and the fix."""

    def __init__(self, status: int, code: str, message: str, fix: str, *,
                 field: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, code=code, permanent=status < 500)
        self.status = status
        self.fix = fix
        self.field = field
        self.headers = dict(headers or {})


def body(code: str, message: str, fix: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fix": fix, "field": field}}


def _field(loc: Sequence[Any]) -> str | None:
    """("body", "to", 0) -> "to[0]"; ("query", "limit") -> "limit"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc)
    text = ""
    for part in parts:
        if part == "[key]":  # pydantic's marker for "the key of this dict entry"
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or None


def _explain(err: Mapping[str, Any]) -> tuple[str, str, str]:
    """(code, message, fix) for one pydantic error."""
    kind = str(err.get("type", ""))
    where = _field(err.get("loc", ())) or "the body"
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return ("request.json", f"the body is not valid JSON ({err.get('ctx', {}).get('error')})",
                "send a JSON object with 'Content-Type: application/json'")
    if kind in ("model_attributes_type", "model_type", "dict_type") and where == "the body":
        return ("request.json", "the body must be a JSON object",
                "send a JSON object with 'Content-Type: application/json'")
    if kind == "missing":
        return "request.missing", f"{where} is required", f"add {where}"
    if kind == "extra_forbidden":
        return ("request.unknown_field", f"unknown field {where}",
                f"remove it or fix its name; {_SCHEMA_FIX}")
    if "lone surrogate" in msg:
        return "message.encoding", f"{where} {msg.split(';')[0]}", msg.split("; ")[-1]
    if "header injection" in msg:
        return "message.header_injection", f"{where} {msg.split(';')[0]}", msg.split("; ")[-1]
    return "request.invalid", f"{where}: {msg}", _SCHEMA_FIX


def of_error(exc: HttpError) -> dict[str, Any]:
    """The JSON body of ``exc``'s answer."""
    return body(exc.code, exc.message, exc.fix, exc.field)


def invalid(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body for pydantic's validation errors (``loc`` starting with where the value
    was: body, query, header or path): the first explained, the next three named."""
    first = errors[0] if errors else {}
    code, message, fix = _explain(first)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more: " + "; ".join(
            _explain(e)[1] for e in errors[1:4]) + ")"
    return body(code, message, fix, _field(first.get("loc", ())))


def unreadable(detail: str) -> dict[str, Any]:
    """The 422 body for a request body that could not be read as JSON at all (not UTF-8)."""
    return body("request.json", f"the body cannot be read: {detail}",
                "send a UTF-8 JSON object with 'Content-Type: application/json'")


def internal() -> dict[str, Any]:
    """The 500 body: the details go to the server log, never to the client."""
    return body("internal", "internal error; it was logged on the server",
                "retry; if it persists, report it with the server log")


def route_unknown() -> dict[str, Any]:
    return body("route.unknown", "no such endpoint",
                "the API lives under /api/v1; see /api/v1/docs")


def _answer(status: int, content: dict[str, Any],
            headers: Mapping[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse(content, status_code=status, headers=dict(headers or {}))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(HttpError, exc)
    return _answer(exc.status, of_error(exc), exc.headers)


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    from fastapi.exceptions import RequestValidationError

    return _answer(422, invalid(list(cast(RequestValidationError, exc).errors())))


async def _starlette(_: Request, exc: Exception) -> JSONResponse:
    from starlette.exceptions import HTTPException

    exc = cast(HTTPException, exc)
    if exc.status_code == 404:
        content = route_unknown()
    elif exc.status_code == 400:  # FastAPI could not read the body at all (not UTF-8 ...)
        return _answer(422, unreadable(str(exc.detail)))
    elif exc.status_code == 405:
        content = body("method.not_allowed", "this endpoint does not take that method",
                       f"use {(exc.headers or {}).get('Allow', 'another method')}")
    else:
        content = body(f"http.{exc.status_code}", str(exc.detail), _SCHEMA_FIX)
    return _answer(exc.status_code, content, exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # The traceback is logged by the HTTP front, which sees the exception next.
    return _answer(500, internal())


def install(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app.add_exception_handler(HttpError, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _starlette)
    app.add_exception_handler(Exception, _unexpected)
