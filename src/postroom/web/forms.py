"""Form bodies of the admin pages: ``application/x-www-form-urlencoded`` only (every form is
a plain HTML form; no file upload goes through a page form), parsed from the body the HTTP
front has already read under its limit (64 KB before sign-in).

Bounded: at most ``MAX_FIELDS`` fields, each value at most ``MAX_VALUE`` characters unless
a page asks for more; a field sent twice keeps its first value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import parse_qsl

from fastapi import Request

from postroom.exceptions import PostroomError

MAX_FIELDS = 200
MAX_VALUE = 4096
_STATE = "postroom_form"


class FormError(PostroomError):
    """A form body that cannot be read; ``message`` says why, for the page to show."""

    code = "admin.form"


class Form(Mapping[str, str]):
    """The fields of one submitted form."""

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def __getitem__(self, name: str) -> str:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def text(self, name: str, *, limit: int = MAX_VALUE, strip: bool = True) -> str:
        """The field ``name`` ("" when absent), stripped unless asked not to (passwords)."""
        value = self._fields.get(name, "")
        if len(value) > limit:
            raise FormError(f"the field {name!r} is longer than {limit} characters")
        return value.strip() if strip else value


def parse(body: bytes) -> Form:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormError("the form was not sent as UTF-8; reload the page and send it again",
                        code="admin.form") from err
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError as err:
        raise FormError(f"the form has more than {MAX_FIELDS} fields") from err
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return Form(fields)


async def form(request: Request) -> Form:
    """The request's form (parsed once per request); an empty one for a body of another
    type, so that a JSON or multipart post cannot slip past a page's checks."""
    cached = getattr(request.state, _STATE, None)
    if isinstance(cached, Form):
        return cached
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    found = parse(await request.body()) if kind == "application/x-www-form-urlencoded" \
        else Form({})
    setattr(request.state, _STATE, found)
    return found
