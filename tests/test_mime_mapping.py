"""The MIME -> JSON fields mapper every JSON provider uses (postroom.transports._mime):
what it reads from real composed messages, and what it refuses, naming it."""

from __future__ import annotations

import itertools

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


# Values on both sides of the fast paths' lines (header values read as they stand, a
# single-part body taken whole): the mapping must not tell them apart from the full parse.
_FROMS = ["Bench <a@example.com>", "<a@example.com>", "a@example.com", "J. Doe <a@b.c>",
          "A  B <a@b.c>", "O'Brien <x.y@b.c>", "=?utf-8?q?Z=C3=B6e?= <a@b.c>",
          '"Doe, J" <a@b.c>', "a@b.c (comment)", "Zoë <a@b.c>", "a@@b", "<a@>"]
_TOS = ["<r1@example.org>", "r1@example.org, R Two <r2@example.org>", "r1@x,r2@y",
        "undisclosed-recipients:;", "a@b c@d", "a..b@c", "<ä@x>"]
_SUBJECTS = ["worker bench 1", "a  b", " lead", "trail ", "tab\there", "x=?y",
             "=?utf-8?b?R3LDvMOfZQ==?=", "Grüße", "(c) \"q\" \\"]
_IDS = ["<run-1@bench.test>", "<a b@c>", "< a@b >", "<>", "<x@[1.2.3.4]>", "a@b"]
_HEADS = [b"Content-Type: text/plain; charset=utf-8\r\n", b"", b"Content-Type: text/html\r\n",
          b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
          b"Content-Type: text/plain; charset=latin-1\r\nX-Fold: a\r\n b\r\n",
          b"not a header\r\n", b"Sender: A  B <a@b.c>\r\nResent-Date: 1 Jan 2026 00:00 +0000\r\n",
          # Around the single-text-body path (_mime._simple): what it reads, what it leaves.
          b"Content-Type: TEXT/HTML; Charset=\"UTF-8\"; format=flowed\r\n"
          b"Content-Transfer-Encoding: 8BIT\r\nContent-Disposition: inline\r\n",
          b"Content-Type: text/plain; charset=us-ascii\r\n"
          b"Content-Transfer-Encoding: 7bit\r\n",
          b"Content-Type: text/plain; name=a.txt\r\n",
          b"Content-Type: text/plain;charset=ascii\r\n",
          b"Content-Disposition: attachment\r\n", b"Content-Disposition: inline; filename=a\r\n",
          b"Content-ID: <c@d>\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
          b"Content-Type: text/plain; charset=utf-8; charset=ascii\r\n",
          b"Content-Type: text/plain\r\nContent-Type: text/html\r\n",
          b"Content-Type: text/plain; charset=\"utf-8\" \r\n",
          b"Content-Type: text/plain; charset=bogus\r\n",
          b"Content-Type: text/calendar; charset=utf-8\r\n", b"Content-Type: text\r\n",
          b"Content-Type: text/plain; charset*=utf-8''x\r\n",
          b"Content-Transfer-Encoding: x-custom\r\n",
          b"content-type: text/html; charset=us-ascii\r\nX-A: =?utf-8?q?x?=\r\n"]
_BODIES = [b"\r\nhello\r\n", b"\r\nx\ny\rz", b"\nlf\n", b"", b"\r\n" + b"line\r\n" * 400,
           b"\r\n\xc3\xa9t\xc3\xa9\r\n", b"\r\nFrom: x@y\r\nSubject: old\r\n\r\nold\r\n",
           b"\r\n\xe9t\xe9 \xff\r\n", b"\r\n\r\n", b"\r\naGVsbG8=\r\n"]


def _cases() -> list[bytes]:
    out = []
    # Every MIME head with every body; the address, subject and id fields a fixed spread
    # over their lists, each value met several times.
    for i, (head, body) in enumerate(itertools.product(_HEADS, _BODIES)):
        out.append(b"From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: %s\r\n%s%s" % (
            _FROMS[i % len(_FROMS)].encode(), _TOS[i % len(_TOS)].encode(),
            _SUBJECTS[i % len(_SUBJECTS)].encode(), _IDS[i % len(_IDS)].encode(), head, body))
    return out


def _outcome(raw: bytes) -> object:
    try:
        return vars(mapped_of(raw))
    except UnsupportedFeature as err:
        return err.message
    except Exception as err:  # the full parse's own failures are compared too
        return type(err).__name__


def test_plain_address_lists_split_as_getaddresses_reads_them() -> None:
    from email.utils import getaddresses

    from postroom.transports._mime import address_pairs

    values = [*_FROMS, *_TOS, "A B <a@b.c>, c@d.e,<f@g.h>", "x@y, Z <z@y>", "a@b.c,",
              "O'Brien Jr <o@b.ie>", "a.b+tag@sub.example.org", "Zoë <a@b.c>, d@e.f"]
    for v in values:
        assert address_pairs([v]) == getaddresses([v]), v
    assert address_pairs(values[:3]) == getaddresses(values[:3])


def test_the_fast_paths_map_as_the_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    from email.parser import BytesParser

    from postroom.transports import _mime

    fast = [_outcome(raw) for raw in _cases()]
    never = re.compile(r"(?!)")
    for name in ("_PLAIN", "_PLAIN_ADDRESSES", "_PLAIN_ID"):
        monkeypatch.setattr(_mime, name, never)
    monkeypatch.setattr(_mime, "_simple", lambda raw: None)
    monkeypatch.setattr(_mime, "_parse",
                        lambda raw, policy: BytesParser(policy=policy).parsebytes(raw))
    assert fast == [_outcome(raw) for raw in _cases()]


def test_mailbox_objects_read_as_parseaddr_reads_them() -> None:
    from email.utils import parseaddr

    from postroom.transports._mime import mailbox_object

    values = [*_FROMS, *_TOS, "Name<a@b.c>", " Name <a@b.c>", "Name <a@b.c> ", "<a@b.c> x",
              '"Q, R" <q@r.s>', "A B C <a.b@c.d>", "a@b.c (c)", "", "<>", "Zoë Shop <s@e.com>"]
    for v in values:
        display, addr = parseaddr(v)
        assert mailbox_object(v, "e", "n") == ({"e": addr, "n": display} if display
                                               else {"e": addr}), v


def _matched_outcomes(raw: bytes, fn: object) -> list[object]:
    out: list[object] = []
    for recipients in (["r1@example.org"], ["R1@Example.org", "r2@example.org"],
                       ["r1@x", "r2@y", "extra@z"], ["someone@else"],
                       ["a@b", "c@d", "r1@example.org", "r2@example.org"]):
        env = Envelope("a@example.com", recipients, raw)
        try:
            out.append(vars(fn(env)))  # type: ignore[operator]
        except UnsupportedFeature as err:
            out.append((err.code, err.message))
        except Exception as err:
            out.append(type(err).__name__)
    return out


def test_map_envelope_is_match_headers_then_map_message() -> None:
    """The providers' one-pass mapping reads To/Cc/Bcc as the two steps did: envelope
    recipients missing there first in Bcc, a field recipient outside the delivery refused."""
    from postroom.transports._http import match_headers
    from postroom.transports._mime import map_envelope

    raws = [*_cases()[::7], b"From: a@example.com\r\nTo: r1@example.org\r\n"
            b"Cc: =?utf-8?q?R_Zw=C3=B6i?= <r2@example.org>\r\nBcc: old@example.net\r\n\r\nx"]
    for raw in raws:
        assert _matched_outcomes(raw, lambda env: map_envelope(env, TITLE)) == \
            _matched_outcomes(raw, lambda env: map_message(env, match_headers(env, TITLE),
                                                           TITLE)), raw


def test_every_to_field_counts_for_the_match() -> None:
    # A second To field's recipient outside this delivery would still be sent to by the API.
    from postroom.transports._mime import map_envelope

    raw = b"From: a@example.com\r\nTo: r1@example.org\r\nTo: r2@example.org\r\n\r\nx"
    with pytest.raises(UnsupportedFeature) as info:
        map_envelope(Envelope("a@example.com", ["r1@example.org"], raw), TITLE)
    assert "r2@example.org" in info.value.message
    m = map_envelope(Envelope("a@example.com", ["r2@example.org", "r1@example.org", "n@x"],
                              raw), TITLE)
    assert (m.to, m.bcc) == (["r1@example.org", "r2@example.org"], ["n@x"])
