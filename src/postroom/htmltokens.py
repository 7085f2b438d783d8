"""Split HTML into start tags, end tags and text, in one pass whose cost is linear in the input.

Why not the standard library's ``html.parser``: on malformed input it rescans the rest of the
document from every ``<`` it cannot close, so ``"<a " * 20_000`` (60 KB) takes minutes and
``"<!--" * 20_000`` seconds, and ``"<!["`` raises AssertionError. HTML given to the HTTP
API or the Python API is untrusted, so the tokenizer follows the HTML Standard's rule
instead (WHATWG HTML 13.2.5, "Tokenization"): once a ``<`` opens a tag, comment or
declaration, it never goes back; a construct still open at the end of the input swallows
the rest of it, as it does in a browser. Every search starts where the previous one ended,
so each character is looked at a bounded number of times.

Simplified where the result is the same for a text rendering: no foreign content (SVG/MathML
CDATA sections are bogus comments), no ``<plaintext>``, character references decoded with
:func:`html.unescape` (which follows the Standard's table) in text and attribute values.
"""

from __future__ import annotations

import re
from html import unescape
from typing import Protocol


class Handler(Protocol):
    """What :func:`tokenize` reports, in document order."""

    def starttag(self, tag: str, attrs: dict[str, str], closed: bool) -> None:
        """``<tag ...>``; ``closed`` for ``<tag .../>``. Names are lower case."""

    def endtag(self, tag: str) -> None:
        """``</tag>``."""

    def text(self, data: str) -> None:
        """Text between tags, character references decoded."""


_WS = "\t\n\f\r "
_NAME = re.compile(rf"[a-zA-Z][^{_WS}/>]*")
_SPACES = re.compile(rf"[{_WS}/]*")  # between attributes a "/" is dropped like a space
_ATTR_NAME = re.compile(rf"[^{_WS}/>][^{_WS}/=>]*")
_EQUALS = re.compile(rf"[{_WS}]*=[{_WS}]*")
_UNQUOTED = re.compile(rf"[^{_WS}>]*")
# Elements whose content is text up to their own end tag, never markup (13.1.2.1):
# RCDATA decodes character references, raw text does not.
_RCDATA = frozenset({"title", "textarea"})
_RAWTEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "noscript"})
_END_OF_RAW = {name: re.compile(rf"</{name}(?=[{_WS}/>]|\Z)", re.IGNORECASE)
               for name in _RCDATA | _RAWTEXT}


def tokenize(html: str, handler: Handler) -> None:
    """Report every tag and text run of ``html`` to ``handler``. Never raises on bad markup."""
    n = len(html)
    pos = 0  # everything before pos has been reported
    text_from = 0  # start of the text run not yet reported
    while pos < n:
        lt = html.find("<", pos)
        if lt < 0:
            break
        nxt = html[lt + 1 : lt + 2]
        if _letter(nxt):
            _flush(html, text_from, lt, handler)
            pos = text_from = _start_tag(html, lt, handler)
        elif nxt == "/" and _letter(html[lt + 2 : lt + 3]):
            _flush(html, text_from, lt, handler)
            pos = text_from = _end_tag(html, lt, handler)
        elif nxt in ("/", "!", "?"):
            _flush(html, text_from, lt, handler)
            pos = text_from = _markup(html, lt)
        else:  # "a < b", "<3": the "<" is text (13.2.5.6)
            pos = lt + 1
    _flush(html, text_from, n, handler)


def _letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _flush(html: str, start: int, end: int, handler: Handler) -> None:
    if start < end:
        handler.text(unescape(html[start:end]))


def _markup(html: str, lt: int) -> int:
    """A comment, declaration or processing instruction at ``lt``: where it ends."""
    n = len(html)
    if html.startswith("<!--", lt):
        if html.startswith(">", lt + 4):  # "<!-->" is a whole (empty) comment
            return lt + 5
        if html.startswith("->", lt + 4):
            return lt + 6
        end = html.find("-->", lt + 4)
        return n if end < 0 else end + 3
    # <!DOCTYPE>, <![CDATA[...]]>, <?xml ...?>, "</ 3>": a bogus comment up to the next ">"
    # ("</>" is dropped the same way).
    end = html.find(">", lt + 2)
    return n if end < 0 else end + 1


def _end_tag(html: str, lt: int, handler: Handler) -> int:
    """The end tag at ``lt`` (``</`` then a letter): where it ends. Its attributes are read
    like a start tag's, so that a quoted ">" does not end it, then dropped (13.2.5.8)."""
    name_end = _end(_NAME, html, lt + 2)
    tag = _attributes(html, name_end)
    if tag is None:
        return len(html)
    handler.endtag(html[lt + 2 : name_end].lower())
    return tag[0]


def _start_tag(html: str, lt: int, handler: Handler) -> int:
    """The start tag at ``lt`` (``<`` then a letter) and, for raw-text elements, their text:
    where it all ends. A tag still open at the end of the input is dropped."""
    n = len(html)
    name_end = _end(_NAME, html, lt + 1)
    tag = html[lt + 1 : name_end].lower()
    rest = _attributes(html, name_end)
    if rest is None:
        return n
    pos, attrs, closed = rest
    raw = _END_OF_RAW.get(tag)
    # A raw-text element's "/>" is ignored like any non-void element's (13.2.6.1): its
    # content still runs to its end tag.
    handler.starttag(tag, attrs, closed and raw is None)
    if raw is None:
        return pos
    found = raw.search(html, pos)
    end = n if found is None else found.start()
    if pos < end:
        data = html[pos:end]
        handler.text(unescape(data) if tag in _RCDATA else data)
    return end


def _attributes(html: str, pos: int) -> tuple[int, dict[str, str], bool] | None:
    """The attributes of a tag whose name ends at ``pos``: (where the tag ends, attributes,
    whether it ends with "/>"), or None when the input ends first."""
    n = len(html)
    attrs: dict[str, str] = {}
    while True:
        gap = _end(_SPACES, html, pos)
        if gap >= n:
            return None
        if html[gap] == ">":
            return gap + 1, attrs, html[gap - 1] == "/" and gap > pos
        pos = _end(_ATTR_NAME, html, gap)
        name = html[gap:pos].lower()
        value = ""
        equals = _EQUALS.match(html, pos)
        if equals is not None:
            pos = equals.end()
            quote = html[pos : pos + 1]
            if quote in ('"', "'"):
                close = html.find(quote, pos + 1)
                if close < 0:
                    return None  # a quoted value open at the end of the input
                value, pos = html[pos + 1 : close], close + 1
            else:
                start, pos = pos, _end(_UNQUOTED, html, pos)
                value = html[start:pos]
        # The first of two attributes with the same name wins (13.2.5.33).
        attrs.setdefault(name, unescape(value) if "&" in value else value)


def _end(pattern: re.Pattern[str], html: str, pos: int) -> int:
    """Where a match of ``pattern`` at ``pos`` ends (``pos`` when there is none)."""
    found = pattern.match(html, pos)
    return pos if found is None else found.end()
