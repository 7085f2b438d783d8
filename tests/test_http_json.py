"""transports._http.json_bytes: the request bodies of the JSON APIs, byte for byte what
``json.dumps(value, ensure_ascii=False).encode()`` writes, long strings included."""

from __future__ import annotations

import json

import pytest

from postroom.transports._http import json_bytes

LONG = "The quick brown fox.\r\n" * 100  # over the length json_bytes escapes itself


@pytest.mark.parametrize("value", [
    {"content": {"email_rfc822": LONG}, "recipients": [{"address": {"email": "a@b"}}]},
    {"TextBody": LONG + '"quoted" and \\ backslash\t', "From": "Zoë <a@b>", "n": 1},
    {"x": LONG + "\x00\x0b\x1f\x7f control and DEL"},  # the codec writes \xNN: json's way
    {"x": LONG + "\\x41 a backslash before x"},
    {"x": LONG + "Grüße \u2028 non-ASCII"},
    {"x": LONG, 1: "a non-str key", None: "and None"},
    {"x": [LONG, {"y": LONG}], "f": 1.5, "t": True, "z": None, "e": {}},
    {}, LONG, [LONG], "short", [], [[]], [{}], ["a", 1, None, [LONG, "\udc80"[:0]]],
    {"personalizations": [{"to": [{"email": "a@b", "name": "Zoë"}]}],
     "content": [{"type": "text/plain", "value": LONG}], "s": {"enable": False}},
    ("a tuple", LONG), {"k": ("t", LONG)}, {"nan": float("nan"), "big": 10 ** 30, "neg": -0.0},
    {"\u2028 key \"q\"": LONG, "k\x00": "v\x00"}, [LONG + "\x7f"], {"x": "short\x01"},
])
def test_json_bytes_writes_what_json_dumps_writes(value: object) -> None:
    assert json_bytes(value) == json.dumps(value, ensure_ascii=False).encode()


def test_a_lone_surrogate_raises_as_json_dumps_encode_does() -> None:
    value = {"x": LONG + "\udce9"}  # an 8-bit byte read with surrogateescape
    with pytest.raises(UnicodeEncodeError):
        json.dumps(value, ensure_ascii=False).encode()
    with pytest.raises(UnicodeEncodeError):
        json_bytes(value)


def test_a_lone_surrogate_in_a_list_or_short_string_raises_too() -> None:
    for value in ([LONG, "\udce9"], {"k": ["x\udce9"]}, "\udce9"):
        with pytest.raises(UnicodeEncodeError):
            json_bytes(value)
