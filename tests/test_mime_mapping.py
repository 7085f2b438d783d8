"""The MIME -> JSON fields mapper every JSON provider uses (postroom.transports._mime):
what it reads from real composed messages, and what it refuses, naming it."""

from __future__ import annotations

import pytest

from postroom.envelope import Envelope
from postroom.exceptions import UnsupportedFeature
from postroom.message import Attachment, Draft, build
from postroom.transports._mime import map_message

TITLE = "Example API"


def mapped_of(raw: bytes, **kw: object) -> object:
    env = Envelope("a@example.com", ["b@example.org"], raw)
    return map_message(env, raw, TITLE, **kw)  # type: ignore[arg-type]


def refusal(raw: bytes, **kw: object) -> str:
    with pytest.raises(UnsupportedFeature) as info:
        mapped_of(raw, **kw)
    assert info.value.code == "unsupported.mime" and info.value.permanent
    assert TITLE in info.value.message
    return info.value.message


def test_a_composed_message_maps_field_by_field() -> None:
    env = build(Draft(from_="Zoë Shop <shop@example.com>", to=[("Bob, Jr.", "bob@example.org")],
                      subject="Grüße", html="<p>Hi</p>",
                      attachments=[Attachment("a.txt", b"plain file", "text/plain")],
                      headers={"X-Campaign": "7"}),
                tags=["t1"], metadata={"k": "v"})
    m = map_message(env, env.raw, TITLE)
    assert m.from_ == "Zoë Shop <shop@example.com>"
    assert m.to == ['"Bob, Jr." <bob@example.org>']  # a comma in a name stays quoted
    assert m.subject == "Grüße"
    assert m.html == "<p>Hi</p>\n" or m.html.strip() == "<p>Hi</p>"
    assert m.text is not None  # the text part composed from the HTML
    assert [(a.filename, a.content_type, a.data, a.inline) for a in m.attachments] == [
        ("a.txt", "text/plain", b"plain file", False)]
    assert dict(m.headers)["X-Campaign"] == "7"
    assert m.message_id and m.message_id == dict(m.headers)["Message-ID"]
    assert "Date" in m.rebuilt and "MIME-Version" in m.rebuilt
    assert m.summary(99) == ("JSON, 1 attachment(s), 99 bytes; written by the provider: "
                             + ", ".join(m.rebuilt))
    assert (m.tags, m.metadata) == (["t1"], {"k": "v"})


def test_a_forwarded_message_is_an_attachment() -> None:
    inner = b"From: x@example.net\r\nSubject: old\r\n\r\nold body\r\n"
    raw = (b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n"
           b"Content-Type: text/plain\r\n\r\nsee below\r\n--m\r\n"
           b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--m--\r\n")
    m = mapped_of(raw)
    [att] = m.attachments  # type: ignore[attr-defined]
    assert att.content_type == "message/rfc822" and att.filename == "part-1.eml"
    assert b"Subject: old" in att.data


@pytest.mark.parametrize(("raw", "named"), [
    (b"From: a@example.com, c@example.com\r\nTo: b@example.org\r\n\r\nx\r\n",
     "a From field with 2 addresses"),
    (b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
     b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n"
     b"Content-Type: text/plain\r\n\r\none\r\n--m\r\nContent-Type: text/plain\r\n\r\ntwo\r\n"
     b"--m--\r\n", "a second text/plain body"),
    (b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
     b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n"
     b"Content-Type: text/plain\r\n\r\nbody\r\n--m\r\n"
     b"Content-Type: multipart/alternative; boundary=\"n\"\r\n"
     b"Content-Disposition: attachment\r\n\r\n--n\r\nContent-Type: text/plain\r\n\r\nx\r\n"
     b"--n--\r\n--m--\r\n", "an attachment that is itself multipart/alternative"),
    (b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
     b"Content-Type: multipart/encrypted; boundary=\"e\"\r\n\r\n--e\r\n"
     b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--e--\r\n",
     "a multipart/encrypted part"),
])
def test_what_has_no_field_is_refused_naming_it(raw: bytes, named: str) -> None:
    assert named in refusal(raw)


def test_a_header_the_provider_forbids_is_refused() -> None:
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nX-Mailer: app\r\n\r\nx\r\n"
    assert "the header field X-Mailer" in refusal(raw, forbidden_headers={"x-mailer"})
    m = mapped_of(raw)
    assert m.headers == [("X-Mailer", "app")]  # type: ignore[attr-defined]
