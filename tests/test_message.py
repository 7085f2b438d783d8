"""Message composition (postroom.message, headers, htmltext), IDN/SMTPUTF8 handling
(postroom.idn) and the message policy (postroom.policy), without a network: messages are
read back with the standard library's email parser, the policy is run through a real
Worker on the store with the in-memory transport."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from message_helpers import mailboxes, parse
from queue_helpers import FakeClock, run

from postroom import idn
from postroom import policy as mpolicy
from postroom.envelope import Envelope
from postroom.exceptions import ConfigError, MessageError
from postroom.htmltext import html_to_text
from postroom.message import Attachment, Draft, build, compose, render
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.settings import ConnectionPolicy, DeliverySettings, PolicySettings, load
from postroom.transports import base, memory

FROM = "Shop <shop@example.com>"
TO = "bob@example.org"


def head(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def field_names(raw: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode() for line in head(raw).split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")]


def draft(**kw: Any) -> Draft:
    kw.setdefault("from_", FROM)
    kw.setdefault("to", [TO])
    return Draft(**kw)


def assert_wire_clean(raw: bytes) -> None:
    """CRLF only, no line over 998 characters, header lines at most 78 where foldable."""
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# -- structure ---------------------------------------------------------------------------------
def test_plain_text_message() -> None:
    env = build(draft(subject="Hello", text="Hi Bob,\nsee you.\n"), source="python:test")
    assert env.sender == "shop@example.com"
    assert env.recipients == [TO]
    assert env.source == "python:test"
    assert not env.smtputf8
    raw = env.raw
    assert_wire_clean(raw)
    assert field_names(raw) == ["Date", "From", "To", "Subject", "Message-ID", "MIME-Version",
                                "Content-Type", "Content-Transfer-Encoding"]
    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_content().replace("\r\n", "\n") == "Hi Bob,\nsee you.\n"
    assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]{16}@example\.com>", msg["Message-ID"])
    assert msg["Date"].datetime is not None
    assert str(msg["From"]) == FROM


def test_message_ids_are_unique() -> None:
    ids = {parse(render(draft()))["Message-ID"] for _ in range(200)}
    assert len(ids) == 200


def test_html_only_gets_a_derived_text_part() -> None:
    html = ('<html><head><style>p {color: red}</style></head><body><h1>Your order</h1>'
            '<p>Thanks! Track it <a href="https://shop.example.com/t/42">here</a>.<br>'
            'Questions? <a href="mailto:help@example.com">help@example.com</a></p>'
            '<ul><li>1 &times; teapot</li><li>2 &times; cup</li></ul></body></html>')
    msg = parse(render(draft(subject="Order", html=html)))
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    rich = msg.get_body(("html",))
    assert plain is not None and rich is not None
    text = plain.get_content().replace("\r\n", "\n")
    assert text == ("Your order\n\nThanks! Track it here (https://shop.example.com/t/42).\n"
                    "Questions? help@example.com\n\n- 1 × teapot\n- 2 × cup\n")
    assert rich.get_content().replace("\r\n", "\n") == html + "\n"


def test_text_and_html_alternative_in_order() -> None:
    msg = parse(render(draft(text="plain version", html="<p>rich version</p>")))
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "plain version"  # the given text, not derived


def test_attachments_with_international_names() -> None:
    names = ["Résumé.pdf", "données été 2026 — très long nom de fichier pour forcer la "
             "continuation RFC 2231.csv", "报告.txt", 'quote"and\\backslash.bin', "plain.txt"]
    atts = [Attachment(n, f"content of {n}".encode() + bytes(range(256))) for n in names]
    raw = render(draft(text="see attached", attachments=atts))
    assert_wire_clean(raw)
    assert raw.isascii()  # RFC 2231 parameters, base64 content
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    found = list(msg.iter_attachments())
    assert [a.get_filename() for a in found] == names
    assert [a.get_payload(decode=True) for a in found] == [a.content for a in atts]
    assert [a.get_content_type() for a in found] == [
        "application/pdf", "text/csv", "text/plain", "application/octet-stream", "text/plain"]
    assert b"filename*0*=utf-8''" in raw  # the long one is continued
    assert b"filename=\"plain.txt\"" in raw


def test_inline_image_by_content_id_inside_related() -> None:
    logo = Attachment("logo.png", b"\x89PNG\r\n\x1a\nfake", "image/png", content_id="logo@shop")
    pdf = Attachment("invoice.pdf", b"%PDF-1.4")
    msg = parse(render(draft(html='<p><img src="cid:logo@shop" alt="Shop"> Hello</p>',
                             attachments=[logo, pdf])))
    assert msg.get_content_type() == "multipart/mixed"
    alt, attached = list(msg.iter_parts())
    assert alt.get_content_type() == "multipart/alternative"
    plain, related = list(alt.iter_parts())
    assert plain.get_content().strip() == "[Shop] Hello"
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "text/html"
    html, image = list(related.iter_parts())
    assert html.get_content_type() == "text/html"
    assert image["Content-ID"] == "<logo@shop>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == logo.content
    assert attached.get_filename() == "invoice.pdf"


def test_inline_image_without_html_is_still_attached() -> None:
    logo = Attachment("logo.png", b"png", content_id="logo")
    msg = parse(render(draft(text="no html", attachments=[logo])))
    (att,) = list(msg.iter_attachments())
    assert att["Content-ID"] == "<logo>" and att.get_content() == b"png"


def test_reply_to_and_custom_headers() -> None:
    raw = render(draft(
        reply_to=["Support <support@example.com>", "sales@example.com"],
        headers={"X-Campaign": "spring-2026", "List-Unsubscribe":
                 "<https://example.com/u?id=1&t=abcdef>, <mailto:unsub@example.com>",
                 "X-Greeting": "Grüß Gott", "Sender": "Bot <bot@example.com>"}))
    msg = parse(raw)
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["support@example.com",
                                                                 "sales@example.com"]
    assert msg["X-Campaign"] == "spring-2026"
    assert msg["List-Unsubscribe"] == ("<https://example.com/u?id=1&t=abcdef>, "
                                       "<mailto:unsub@example.com>")
    assert str(msg["X-Greeting"]) == "Grüß Gott"
    assert b"X-Greeting: =?utf-8?" in raw
    assert msg["Sender"].addresses[0].addr_spec == "bot@example.com"


def test_custom_header_replaces_a_generated_one() -> None:
    raw = render(draft(headers={"Message-ID": "<fixed@example.com>",
                                "Date": "Mon, 02 Mar 2026 10:00:00 +0100"}))
    assert field_names(raw).count("Message-ID") == 1
    assert field_names(raw).count("Date") == 1
    msg = parse(raw)
    assert msg["Message-ID"] == "<fixed@example.com>"
    assert msg["Date"] == "Mon, 02 Mar 2026 10:00:00 +0100"


@pytest.mark.parametrize("name", ["Content-Type", "content-transfer-encoding", "MIME-Version",
                                  "Bcc", "Content-ID"])
def test_structure_headers_cannot_be_set(name: str) -> None:
    with pytest.raises(MessageError, match=name) as info:
        render(draft(headers={name: "x"}))
    assert info.value.code == "message.header_reserved"


def test_header_given_twice_in_different_case() -> None:
    with pytest.raises(MessageError, match="given twice"):
        render(draft(headers={"X-A": "1", "x-a": "2"}))


def test_bcc_is_envelope_only() -> None:
    env = build(draft(cc=["carol@example.org"], bcc=["Secret <dave@example.org>", TO]))
    assert env.recipients == [TO, "carol@example.org", "dave@example.org"]  # no duplicate
    assert b"dave" not in env.raw
    assert "Bcc" not in field_names(env.raw)


def test_addresses_in_every_accepted_form() -> None:
    env = build(Draft(from_=("Jörg Müller", "j@example.com"),
                      to=['"Doe, John" <john@example.org>, ann@example.org',
                          ("", "plain@example.org"), "Émile <emile@example.org>"],
                      cc="single@example.org"))  # type: ignore[arg-type]
    assert env.recipients == ["john@example.org", "ann@example.org", "plain@example.org",
                              "emile@example.org", "single@example.org"]
    msg = parse(env.raw)
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Doe, John", "john@example.org"), ("", "ann@example.org"),
        ("", "plain@example.org"), ("Émile", "emile@example.org")]
    assert msg["From"].addresses[0].display_name == "Jörg Müller"


@pytest.mark.parametrize("name", [
    "Jörg Müller", "Doe, John", 'He said "hi"', "back\\slash", "  spaced  out  ",
    "=?utf-8?q?not_an_encoded_word?=", "Ünïcödé " * 20, "a.b (c) [d] <e>", "日本語の名前",
    "tab\there", "x",
])
def test_display_names_round_trip(name: str) -> None:
    raw = render(Draft(from_=(name, "a@example.com"), to=[(name, "b@example.org")]))
    assert mailboxes(raw, "From") == [(name.strip(), "a@example.com")]
    assert mailboxes(raw, "To") == [(name.strip(), "b@example.org")]
    msg = parse(raw)  # the stdlib parser reads the structure (its names: see message_helpers)
    assert msg["To"].addresses[0].addr_spec == "b@example.org"
    if len(name.encode()) < 40 and "\t" not in name:  # one encoded-word: it reads those
        assert msg["From"].addresses[0].display_name == name.strip()


@pytest.mark.parametrize("subject", [
    "", "Hello", "Grüße aus Köln", "Subject with a =?fake?= word", "  leading and trailing  ",
    "double  space", "日本語の件名" * 10, "x" * 200, "emoji 🎉 and ascii " * 8, "tab\tinside",
    "a" * 2000,
])
def test_subjects_round_trip(subject: str) -> None:
    raw = render(draft(subject=subject))
    assert_wire_clean(raw)
    assert head(raw).isascii()  # RFC 2047: even non-ASCII subjects are ASCII on the wire
    for line in head(raw).split(b"\r\n"):
        assert len(line) <= 78, line
    got = str(parse(raw)["Subject"])
    assert got == subject if subject == subject.strip() else got.strip() == subject.strip()


def test_non_ascii_subject_is_rfc2047() -> None:
    raw = render(draft(subject="Grüße"))
    assert b"Subject: =?utf-8?b?R3LDvMOfZQ==?=" in raw  # "B" is shorter than "Q" here
    raw = render(draft(subject="Grüße from Cologne"))
    assert b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_from_Cologne?=" in raw


# -- bodies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "cte"), [
    ("ascii\nlines\n", "7bit"),
    ("mostly ascii with one é\n", "quoted-printable"),
    ("Ελληνικό κείμενο παντού, όχι ASCII\n" * 5, "base64"),
    ("a" * 1200 + "\n", "quoted-printable"),  # a line over 998 cannot go as 7bit
    ("nul \0 byte\n", "quoted-printable"),
])
def test_body_encodings(text: str, cte: str) -> None:
    raw = render(draft(text=text))
    assert_wire_clean(raw)
    assert raw.isascii()  # passes servers without 8BITMIME
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == cte
    assert msg.get_content().replace("\r\n", "\n") == text


def test_line_ends_are_normalised_to_crlf() -> None:
    raw = render(draft(text="unix\nmac\rwindows\r\nend"))
    assert raw.endswith(b"\r\n\r\nunix\r\nmac\r\nwindows\r\nend\r\n")


def test_lone_surrogate_is_a_clear_error() -> None:
    with pytest.raises(MessageError, match="surrogate"):
        render(draft(subject="bad \udce9"))


# -- header injection -------------------------------------------------------------------------
INJECTIONS = ["x\r\nBcc: victim@example.net", "x\nBcc: victim@example.net",
              "x\rBcc: victim@example.net", "x\0y"]


@pytest.mark.parametrize("evil", INJECTIONS)
@pytest.mark.parametrize(("field", "make"), [
    ("from", lambda e: draft(from_=f"Evil {e} <a@example.com>")),
    ("from", lambda e: draft(from_=(e, "a@example.com"))),
    ("to", lambda e: draft(to=[f"Name{e} <b@example.org>"])),
    ("to", lambda e: draft(to=[("n", f"b@example.org{e}")])),
    ("cc", lambda e: draft(cc=[f"c@example.org{e}"])),
    ("bcc", lambda e: draft(bcc=[f"d@example.org{e}"])),
    ("reply_to", lambda e: draft(reply_to=[f"r@example.org{e}"])),
    ("subject", lambda e: draft(subject=f"Hi{e}")),
    ("header X-Tag", lambda e: draft(headers={"X-Tag": f"v{e}"})),
    ("invalid header name", lambda e: draft(headers={f"X-Tag{e}": "v"})),
    ("attachment filename", lambda e: draft(attachments=[Attachment(f"a{e}.txt", b"x")])),
    ("content type", lambda e: draft(attachments=[Attachment("a.txt", b"x", f"text/plain{e}")])),
    ("content_id", lambda e: draft(attachments=[Attachment("a.png", b"x", content_id=f"c{e}")],
                                   html="<p>x</p>")),
    ("envelope_sender", lambda e: draft(envelope_sender=f"bounce@example.com{e}")),
])
def test_header_injection_is_refused_naming_the_field(evil: str, field: str, make: Any) -> None:
    with pytest.raises(MessageError) as info:
        build(make(evil))
    assert field in info.value.message
    assert info.value.permanent


@pytest.mark.parametrize("name", ["", "Bad Name", "X:Y", "Ünï", "X-" + "a" * 80, "X\tTab"])
def test_header_names_are_validated(name: str) -> None:
    with pytest.raises(MessageError) as info:
        render(draft(headers={name: "v"}))
    assert info.value.code == "message.header_name"


def test_a_word_too_long_for_a_header_line() -> None:
    with pytest.raises(MessageError, match="998"):
        render(draft(headers={"X-Token": "t" * 1000}))


@pytest.mark.parametrize(("kw", "code"), [
    ({"to": [], "cc": [], "bcc": []}, "message.no_recipients"),
    ({"from_": ""}, "message.from"),
    ({"from_": "a@example.com, b@example.com"}, "message.from"),
    ({"to": ["not-an-address"]}, "address.malformed"),
    ({"to": ["Name <>"]}, "address.empty"),
    ({"to": ["a@bad_domain.example"]}, "address.malformed"),
    ({"to": ["a@☃.example"]}, "address.idna"),
    ({"attachments": [Attachment("a", b"x", "not a type")]}, "message.attachment"),
    ({"attachments": [Attachment("a", b"x", content_id="has space")], "html": "<p/>"},
     "message.attachment"),
])
def test_invalid_drafts_are_clear_errors(kw: dict[str, Any], code: str) -> None:
    with pytest.raises(MessageError) as info:
        build(draft(**kw))
    assert info.value.code == code, info.value.message


# -- international addresses ------------------------------------------------------------------
def test_utf8_local_part_needs_smtputf8_and_stays_utf8() -> None:
    env = build(draft(from_="Δοκιμή <δοκιμή@example.test>", to=["jörg@example.org"]))
    assert env.smtputf8
    assert env.sender == "δοκιμή@example.test"
    assert "From: =?utf-8?b?zpTOv866zrnOvM6u?= <δοκιμή@example.test>".encode() in env.raw
    assert "To: jörg@example.org".encode() in env.raw
    assert env.raw.split(b"\r\n\r\n", 1)[1].isascii()
    msg = parse(env.raw)
    assert msg["From"].addresses[0].addr_spec == "δοκιμή@example.test"


def test_idn_domain_keeps_u_labels_and_message_id_uses_the_a_label() -> None:
    env = build(draft(from_="Bücher <info@bücher.example>", to=["kunde@münchen.example"]))
    assert env.smtputf8
    assert env.recipients == ["kunde@münchen.example"]
    assert "<info@bücher.example>".encode() in env.raw
    assert re.search(rb"Message-ID: <[^>]+@xn--bcher-kva\.example>", env.raw)


def test_downgrade_rewrites_idn_domains_to_a_labels() -> None:
    env = build(draft(from_='"Ann @ Home" <ann@bücher.example>',
                      to=["kunde@münchen.example", "b@example.org"],
                      reply_to=["Rück <r@bücher.example>"], subject="Grüße"))
    wire = idn.downgrade(env)
    assert wire.sender == "ann@xn--bcher-kva.example"
    assert wire.recipients == ["kunde@xn--mnchen-3ya.example", "b@example.org"]
    assert head(wire.raw).isascii()
    msg = parse(wire.raw)
    assert msg["From"].addresses[0].display_name == "Ann @ Home"
    assert msg["From"].addresses[0].addr_spec == "ann@xn--bcher-kva.example"
    assert msg["Reply-To"].addresses[0].addr_spec == "r@xn--bcher-kva.example"
    assert str(msg["Subject"]) == "Grüße"
    assert wire.raw.split(b"\r\n\r\n", 1)[1] == env.raw.split(b"\r\n\r\n", 1)[1]
    assert wire.id == env.id
    assert idn.downgrade(wire) == wire  # nothing left to do


def test_downgrade_leaves_quoted_names_and_comments_alone() -> None:
    raw = ('From: "josé@casa.es" <jose@bücher.example> (via ü@ü.example)\r\n'
           "To: b@example.org\r\nSubject: x\r\n\r\nbody\r\n").encode()
    out = idn.ascii_headers(raw)
    assert out.startswith('From: "josé@casa.es" <jose@xn--bcher-kva.example> '
                          '(via ü@ü.example)\r\n'.encode())


def test_downgrade_refuses_a_utf8_local_part() -> None:
    env = build(draft(to=["δοκιμή@example.test"]))
    with pytest.raises(MessageError) as info:
        idn.downgrade(env)
    assert info.value.code == "message.smtputf8"
    assert info.value.permanent
    assert "δοκιμή@example.test" in info.value.message and "SMTPUTF8" in info.value.message
    raw = "From: δοκιμή@example.test\r\nTo: b@example.org\r\n\r\nx\r\n".encode()
    with pytest.raises(MessageError, match="From header"):
        idn.ascii_headers(raw)


def test_ascii_domain() -> None:
    assert idn.ascii_domain("example.com") == "example.com"
    assert idn.ascii_domain("BÜCHER.example") == "xn--bcher-kva.example"  # UTS #46 mapping
    assert idn.ascii_domain("faß.de") == "xn--fa-hia.de"  # IDNA 2008, not 2003's "fass.de"
    with pytest.raises(MessageError):
        idn.ascii_domain("☃.example")


# -- compose() keyword API -------------------------------------------------------------------
def test_compose_keyword_api_still_works(tmp_path: Path) -> None:
    f = tmp_path / "notes é.txt"
    f.write_bytes(b"notes")
    raw = compose(sender="App <app@example.com>", to=[TO], cc=["c@example.org"], subject="S",
                  text="t", html="<b>h</b>", attachments=[f], headers=[("X-A", "1")])
    msg = parse(raw)
    assert msg["X-A"] == "1" and msg["Cc"] == "c@example.org"
    assert [a.get_filename() for a in msg.iter_attachments()] == ["notes é.txt"]
    with pytest.raises(MessageError, match="cannot read attachment"):
        compose(sender="a@example.com", to=[TO], attachments=[tmp_path / "missing"])


# -- html to text ------------------------------------------------------------------------------
@pytest.mark.parametrize(("html", "text"), [
    ("", ""),
    ("just text", "just text\n"),
    ("<p>one</p><p>two</p>", "one\n\ntwo\n"),
    ("a<br>b<br><br>c", "a\nb\n\nc\n"),
    ("<a href='https://x.example/'>https://x.example/</a>", "https://x.example/\n"),
    ("<a href='https://x.example/'></a>", "https://x.example/\n"),
    ("<a href='#top'>top</a> <a href='javascript:x()'>js</a>", "top js\n"),
    ("<ol><li>a</li><li>b<ul><li>c</li></ul></li></ol>", "1. a\n2. b\n  - c\n"),
    ("<blockquote>quoted<br>twice</blockquote>after", "> quoted\n> twice\n\nafter\n"),
    ("<pre>  keep\n    layout</pre>", "  keep\n    layout\n"),
    ("<script>alert(1)</script><style>p{}</style><title>t</title>shown", "shown\n"),
    ("<table><tr><th>k</th><td>v</td></tr><tr><td>k2</td><td>v2</td></tr></table>",
     "k | v\nk2 | v2\n"),
    ("x&nbsp;&amp;&lt;y&gt; &#x1F389;", "x\xa0&<y> 🎉\n"),
    ("<p>unclosed <b>tags <i>everywhere", "unclosed tags everywhere\n"),
    ("<h1>Title</h1>text<hr>end", "Title\n\ntext\n\n" + "-" * 40 + "\n\nend\n"),
])
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


# -- the message policy: settings and merge -------------------------------------------------------
def test_policy_merge_rule() -> None:
    glob = PolicySettings.model_validate({
        "from": "Shop <shop@example.com>", "from_mode": "if_missing",
        "envelope_sender": "bounce@example.com", "bcc": ["archive@example.com"],
        "to": ["audit@example.com"], "headers": {"X-Env": "prod", "X-Team": "web"}})
    conn = ConnectionPolicy.model_validate({
        "envelope_sender": "", "bcc": ["Archive <ARCHIVE@example.com>", "legal@example.com"],
        "headers": {"x-env": "staging"}})
    p = mpolicy.merge(glob, conn)
    assert p.envelope_sender == ""  # set to "" by the connection: turned off
    assert p.from_ == "Shop <shop@example.com>" and p.from_mode == "if_missing"  # inherited
    assert p.to == ("audit@example.com",)
    assert p.bcc == ("archive@example.com", "legal@example.com")  # union, no duplicate
    assert dict(p.headers) == {"x-env": "staging", "X-Team": "web"}
    alone = mpolicy.merge(glob, ConnectionPolicy(inherit=False, cc=["c@example.com"]))
    assert alone.from_ == "" and alone.bcc == () and alone.cc == ("c@example.com",)
    assert mpolicy.merge(glob, None) == mpolicy.merge(glob, ConnectionPolicy())
    assert mpolicy.merge(PolicySettings(), None).empty


def test_policy_in_config_file_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(
        '[policy]\nfrom = "Shop <shop@example.com>"\nbcc = ["archive@example.com"]\n'
        '[[connections]]\nname = "a"\ntransport = "memory"\n'
        'policy = { cc = ["cc@example.com"], headers = { X-Via = "a" } }\n'
        '[[connections]]\nname = "b"\ntransport = "memory"\n'
        'policy = { inherit = false }\n'
        '[[connections]]\nname = "c"\ntransport = "memory"\n')
    s = load(cfg, environ={"POSTROOM_POLICY__FROM_MODE": "if_missing"})
    merged = mpolicy.for_settings(s)
    assert set(merged) == {"a", "c"}  # b has no policy at all
    assert merged["a"].cc == ("cc@example.com",) and merged["a"].bcc == ("archive@example.com",)
    assert merged["a"].from_mode == "if_missing" and dict(merged["a"].headers) == {"X-Via": "a"}
    assert merged["c"].cc == ()


@pytest.mark.parametrize(("toml", "needle"), [
    ('[policy]\nfrom = "x\\r\\nBcc: v@example.net <a@example.com>"', "policy.from"),
    ('[policy]\nbcc = ["not-an-address"]', "policy.bcc"),
    ('[policy]\nheaders = { "Bad Name" = "x" }', "invalid header name"),
    ('[policy]\nheaders = { "X-A" = "x\\ny" }', "line break"),
    ('[policy]\nheaders = { "Content-Type" = "text/plain" }', "MIME structure"),
    ('[policy]\nheaders = { "Bcc" = "a@example.com" }', "bcc"),
    ('[policy]\nfrom_mode = "sometimes"', "from_mode"),
    ('[policy]\nenvelope_sender = "Name <a@example.com>"', "bare address"),
    ('[policy]\nform = "a@example.com"', "did you mean"),
    ('[[connections]]\nname = "a"\ntransport = "memory"\npolicy = { to = ["x"] }',
     "connections[0].policy.to"),
])
def test_policy_config_errors_name_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load(cfg, environ={})
    assert needle in info.value.message, info.value.message


# -- the message policy: applying it -----------------------------------------------------------
def policy(**kw: Any) -> mpolicy.MessagePolicy:
    return mpolicy.merge(PolicySettings.model_validate(kw), None)


def original() -> Envelope:
    return build(draft(from_="App <app@example.org>", to=["bob@example.org"],
                       headers={"X-Env": "original", "Reply-To": "app@example.org"},
                       subject="Hi", text="body\n"))


def test_policy_from_override_always_and_if_missing() -> None:
    env = original()
    always = policy(**{"from": "Shop Bot <bot@example.com>"}).apply(env).envelope
    msg = parse(always.raw)
    assert field_names(always.raw).count("From") == 1
    assert msg["From"].addresses[0].addr_spec == "bot@example.com"
    kept = policy(**{"from": "Shop Bot <bot@example.com>", "from_mode": "if_missing"})
    assert kept.apply(env).envelope.raw == env.raw
    no_from = Envelope("a@example.org", ["b@example.org"], b"To: b@example.org\r\n\r\nx\r\n")
    added = kept.apply(no_from).envelope.raw
    assert added == b"To: b@example.org\r\nFrom: Shop Bot <bot@example.com>\r\n\r\nx\r\n"


def test_policy_forced_recipients_headers_and_envelope_sender() -> None:
    env = original()
    p = policy(envelope_sender="bounce@example.com", to=["Audit Team <audit@example.com>"],
               cc=["cc@example.com"], bcc=["archive@example.com", "BOB@example.org"],
               headers={"X-Env": "prod", "Reply-To": "Help <help@example.com>"})
    applied = p.apply(env)
    out = applied.envelope
    assert out.sender == "bounce@example.com"
    # bob is the message's own recipient already (case-insensitive): not added again
    assert out.recipients == ["bob@example.org", "audit@example.com", "cc@example.com",
                              "archive@example.com"]
    assert applied.forced == {"audit@example.com": "to", "cc@example.com": "cc",
                              "archive@example.com": "bcc"}
    msg = parse(out.raw)
    assert [a.addr_spec for a in msg["To"].addresses] == ["bob@example.org",
                                                           "audit@example.com"]
    assert msg["To"].addresses[1].display_name == "Audit Team"
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["cc@example.com"]
    assert b"archive" not in out.raw  # Bcc: envelope only
    names = field_names(out.raw)
    assert names.count("X-Env") == 1 and msg["X-Env"] == "prod"
    assert names.count("Reply-To") == 1
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert msg.get_content() == "body\r\n"
    assert b"X-Env: original" in env.raw  # the stored original is untouched


def test_policy_is_computed_from_the_original_so_attempts_never_stack() -> None:
    env = original()
    p = policy(to=["audit@example.com"], headers={"X-Added": "1"},
               **{"from": "bot@example.com"})
    first = p.apply(env).envelope.raw
    for _ in range(5):  # retries and fallbacks: always from the stored message
        assert p.apply(env).envelope.raw == first
    assert first.count(b"audit@example.com") == 1 and first.count(b"X-Added") == 1
    # A forced To already in the message's To field is not written twice.
    again = p.apply(Envelope(env.sender, env.recipients, first)).envelope.raw
    assert again.count(b"audit@example.com") == 1


def test_policy_skips_forced_recipients_already_done() -> None:
    env = original()
    p = policy(bcc=["archive@example.com", "legal@example.com", "ops@example.com"])
    status = {"bob@example.org": {"state": "pending"},
              "archive@example.com": {"state": "sent", "forced": "bcc"},
              "legal@example.com": {"state": "failed", "forced": "bcc"},
              "ops@example.com": {"state": "pending", "forced": "bcc"}}
    applied = p.apply(env, status)
    assert applied.forced == {"ops@example.com": "bcc"}
    assert applied.envelope.recipients == ["bob@example.org", "ops@example.com"]


def test_empty_policy_changes_nothing() -> None:
    env = original()
    p = policy()
    assert p.empty
    assert p.apply(env).envelope == env


# -- the message policy through a real worker ---------------------------------------------------
CONN = "mem"


@pytest.fixture(autouse=True)
def _clean_memory_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.Transport, "outboxes", {})
    monkeypatch.setattr(memory.Transport, "rejections", {})


def worker(queue: Queue, clock: FakeClock, p: mpolicy.MessagePolicy) -> tuple[Worker, Any]:
    t = memory.Transport(memory.Settings(name=CONN), base.TransportContext(ehlo_name="test"))
    w = Worker(queue, {CONN: t}, DeliverySettings(min_backoff=60, max_backoff=60),
               default_connection=CONN, owner="worker-test", clock=clock,
               policies={CONN: p})
    return w, t


async def attempt(queue: Queue, w: Worker) -> list[dict[str, Any]]:
    claimed = await queue.claim("worker-test", 10, 600)
    assert len(claimed) == 1, "one message due"
    return await w.deliver(claimed[0])


def test_worker_applies_policy_once_per_attempt_and_retries_never_duplicate(
        queue: Queue, clock: FakeClock) -> None:
    p = policy(bcc=["archive@example.com"], to=["audit@example.com"],
               headers={"X-Policy": "yes"}, **{"from": "Bot <bot@example.com>"})
    w, t = worker(queue, clock, p)
    env = build(draft(from_="app@example.org", to=["bob@example.org", "slow@example.org"]))

    async def go() -> None:
        msg_id = await queue.enqueue(env)
        memory.Transport.rejections["slow@example.org"] = (451, "4.7.1 try later")
        first = await attempt(queue, w)
        rcpts = first[0]["recipients"]
        assert rcpts["archive@example.com"] == {"code": 250, "reply": "2.1.5 Ok",
                                                "state": "sent", "forced": "bcc"}
        assert rcpts["slow@example.org"]["state"] == "pending"
        stored = queue.log.get(msg_id)
        assert stored is not None and stored["status"] == "deferred"
        assert stored["rcpt_status"]["audit@example.com"]["forced"] == "to"
        assert stored["raw"] == env.raw  # the stored message never changes
        del memory.Transport.rejections["slow@example.org"]
        clock.advance(61)
        second = await attempt(queue, w)
        assert set(second[0]["recipients"]) == {"slow@example.org"}  # forced: not again
        stored = queue.log.get(msg_id)
        assert stored is not None and stored["status"] == "sent"

    run(queue, go)
    sent = t.outbox
    assert [e.recipients for e in sent] == [
        ["bob@example.org", "audit@example.com", "archive@example.com"], ["slow@example.org"]]
    for e in sent:  # each copy carries the policy exactly once
        assert e.raw.count(b"X-Policy: yes") == 1
        assert e.raw.count(b"audit@example.com") == 1
        assert e.raw.count(b"\r\nFrom: ") + e.raw.startswith(b"From: ") == 1
        assert b"archive" not in e.raw
    assert sent[0].raw == sent[1].raw


def test_failing_forced_recipient_neither_fails_nor_loops(queue: Queue,
                                                          clock: FakeClock) -> None:
    p = policy(bcc=["archive@example.com", "gone@example.com"])
    w, t = worker(queue, clock, p)
    memory.Transport.rejections["archive@example.com"] = (451, "4.3.0 busy")
    memory.Transport.rejections["gone@example.com"] = (550, "5.1.1 no such user")

    async def go() -> str:
        msg_id = await queue.enqueue(build(draft()))
        await attempt(queue, w)
        assert await queue.claim("worker-test", 10, 600) == []  # nothing left to retry
        return msg_id

    msg_id = run(queue, go)
    stored = queue.log.get(msg_id)
    assert stored is not None
    assert stored["status"] == "sent"  # not partial: bob got it
    assert stored["attempt_count"] == 1
    st = stored["rcpt_status"]
    assert st[TO]["state"] == "sent"
    assert st["gone@example.com"]["state"] == "failed"
    # a temporary failure: retried on its own later (tests/test_forced_bcc_retry.py)
    assert st["archive@example.com"]["state"] == "pending"
    assert st["archive@example.com"]["reply"] == "4.3.0 busy"
    assert stored["recipients"] == [TO]
    assert [e.recipients for e in t.outbox] == [[TO]]


def test_forced_recipient_pending_rides_along_with_the_next_attempt(
        queue: Queue, clock: FakeClock) -> None:
    p = policy(bcc=["archive@example.com"])
    w, t = worker(queue, clock, p)
    memory.Transport.rejections["archive@example.com"] = (451, "4.3.0 busy")
    memory.Transport.rejections[TO] = (451, "4.3.0 busy")

    async def go() -> str:
        msg_id = await queue.enqueue(build(draft()))
        await attempt(queue, w)
        memory.Transport.rejections.clear()
        clock.advance(61)
        await attempt(queue, w)
        return msg_id

    msg_id = run(queue, go)
    stored = queue.log.get(msg_id)
    assert stored is not None and stored["status"] == "sent"
    assert stored["rcpt_status"]["archive@example.com"]["state"] == "sent"
    assert [e.recipients for e in t.outbox] == [[TO, "archive@example.com"]]


def test_a_forced_failure_does_not_mask_the_own_recipients_outcome(
        queue: Queue, clock: FakeClock) -> None:
    p = policy(bcc=["archive@example.com"])
    w, _ = worker(queue, clock, p)
    memory.Transport.rejections[TO] = (550, "5.1.1 unknown")

    async def go() -> str:
        msg_id = await queue.enqueue(build(draft()))
        await attempt(queue, w)
        return msg_id

    stored = queue.log.get(run(queue, go))
    assert stored is not None
    assert stored["status"] == "failed"  # archive accepted it, but bob did not: not "partial"
