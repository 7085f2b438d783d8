"""Postroom's tags and metadata as header fields, for APIs that have no field for them
(Postal's raw API, Scaleway TEM): ``X-Postroom-Tags: a, b`` and ``X-Postroom-Metadata:
{"key": "value"}`` (JSON, ASCII). The provider keeps them with the message, so its message
views and webhooks (which list a message's headers) show them. They travel to the
recipient too, as any header does (django-anymail does the same for such providers)."""

from __future__ import annotations

import json

from postroom.envelope import Envelope
from postroom.exceptions import UnsupportedFeature

TAGS, METADATA = "X-Postroom-Tags", "X-Postroom-Metadata"
MAX_VALUE = 900  # one line under RFC 5322's 998 characters, with the field name


def tag_fields(env: Envelope, title: str) -> list[tuple[str, str]]:
    """The (name, value) fields carrying ``env``'s tags and metadata; what one line of ASCII
    cannot carry is refused naming it, never dropped."""
    bad = [t for t in env.tags if "," in t or not t.isascii() or not t.isprintable()]
    if bad:
        raise UnsupportedFeature(
            f"{title} takes Postroom's tags in a header field, a comma-separated ASCII list; "
            f"the tag {bad[0]!r} cannot be in it: rename it", code="unsupported.tags")
    fields = []
    if env.tags:
        fields.append((TAGS, ", ".join(env.tags)))
    if env.metadata:
        fields.append((METADATA, json.dumps(env.metadata, ensure_ascii=True)))
    for name, value in fields:
        if len(value) > MAX_VALUE:
            raise UnsupportedFeature(
                f"{title} takes Postroom's tags and metadata in header fields, and {name} "
                f"would be {len(value)} characters (at most {MAX_VALUE}): send less",
                code="unsupported.tags")
    return fields


def prepended(fields: list[tuple[str, str]], raw: bytes) -> bytes:
    """``raw`` with ``fields`` (ASCII, as tag_fields gives them) on top of its header."""
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("ascii") + raw
