"""The one place an ops function's refusal becomes an answer, for the JSON API and the pages.

Every admin action is a function of postroom.ops that raises a PostroomError when it refuses
(role too low, no such thing, exists already, defined in postroom.toml...). Both sides give
it the same status, chosen here by :func:`status`:

- the admin API (:func:`call`, :func:`answer`) turns it into ``{"error": {code, message,
  fix}}``;
- a page (:func:`attempt`, :func:`outcome`, :func:`submit`) gets a :class:`Refused` (the
  status and the message) to show on the page it answers with, instead of a traceback.

The ops functions read and write the database (some hash passwords, some open network
connections): they run on a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from postroom.exceptions import ConfigError, PermissionDenied, PostroomError
from postroom.ingress.http_errors import HttpError

if TYPE_CHECKING:
    from fastapi import Request

    from postroom.web.forms import Form

T = TypeVar("T")


def status(err: PostroomError) -> int:
    """403 role too low, 404 no such thing, 409 exists, locked or in use, 503 try again
    later, else 400 (the request is wrong as the message says)."""
    code = err.code or ""
    if isinstance(err, PermissionDenied):
        return 403
    if code.endswith("unknown"):
        return 404
    if code.endswith((".exists", ".dupe", ".locked", ".in_use")):
        return 409
    if not err.permanent:
        return 503
    return 400


def http_error(err: PostroomError) -> HttpError:
    code = status(err)
    fix = {403: "ask an administrator, or use an account with the admin role",
           404: "check the name: list them first",
           409: ("change it in postroom.toml" if isinstance(err, ConfigError)
                 else "pick another name, or remove the existing one first"),
           503: "wait a moment and try again"}.get(code, "correct the request as the message "
                                                        "says")
    return HttpError(code, err.code or "error", err.message, fix)


# -- the JSON side ---------------------------------------------------------------------------
async def answer(work: Awaitable[T]) -> T:
    """``work`` awaited; a PostroomError becomes the API's error answer."""
    try:
        return await work
    except HttpError:
        raise
    except PostroomError as err:
        raise http_error(err) from err


async def call(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` on a thread; a PostroomError becomes the API's error answer."""
    return await answer(asyncio.to_thread(fn, *args, **kw))


# -- the page side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    """A refusal as a page shows it: the status of the page's answer, and why."""

    status: int
    message: str

    @classmethod
    def of(cls, err: PostroomError) -> Refused:
        return cls(status(err), err.message)


async def outcome(work: Awaitable[T]) -> T | Refused:
    """``work``'s result, or its refusal for the page to show."""
    try:
        return await work
    except PostroomError as err:
        return Refused.of(err)


async def attempt(fn: Callable[..., T], *args: Any, **kw: Any) -> T | Refused:
    """``fn(*args, **kw)`` on a thread: its result, or its refusal for the page to show."""
    return await outcome(asyncio.to_thread(fn, *args, **kw))


async def submit(request: Request, work: Callable[[Form], T]) -> T | Refused:
    """``work(form)`` on a thread with the request's form: its result, or the refusal (a
    form that cannot be read, a field too long, or the ops function's) for the page."""
    from postroom.web import forms

    async def run() -> T:
        form = await forms.form(request)
        return await asyncio.to_thread(work, form)

    return await outcome(run())
