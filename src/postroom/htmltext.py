"""A readable plain-text version of an HTML body, for the text/plain part of a message that
was given only as HTML (multipart/alternative, RFC 2046 5.1.4: readers without HTML, spam
filters and screen readers use it).

Paragraphs and headings become blank-line separated blocks, ``<br>`` and list items line
breaks, links keep their target (``text (https://...)``), images their alt text, ``<pre>``
its layout; scripts, styles and the document head are dropped. Not a renderer: the goal is
text a person can read.

The HTML is untrusted (HTTP API, Python API), so the work and the output are linear in the
input and bounded by a budget: :mod:`postroom.htmltokens` reads each character a bounded
number of times; the line prefix for quotes and lists stops growing after
:data:`MAX_DEPTH` levels; runs of empty lines collapse into one; and the output is
measured as it is written, so that a text part too large for the message is refused before
it is built rather than after.
"""

from __future__ import annotations

import re

from postroom.exceptions import MessageError
from postroom.htmltokens import tokenize

# Quote and list levels shown in the line prefix. Each line repeats its whole prefix, so
# without a cap 10,000 nested <blockquote>s make every line 20 KB and the output grows as
# depth x lines. Mail threads rarely quote deeper than this, and past it a reader cannot
# count the ">" anyway: deeper levels are shown like the deepest one.
MAX_DEPTH = 10

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "svg",
                   "iframe", "noembed", "noframes"})
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table",
                        "ul", "ol", "dl", "figure", "address", "hr", "form", "fieldset"})
_LINE = frozenset({"div", "li", "tr", "dt", "dd", "section", "article", "header", "footer",
                   "nav", "main", "aside", "caption", "figcaption", "center", "body", "html"})
_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML whitespace; &nbsp; (U+00A0) is kept
_VOID = frozenset({"br", "img", "hr", "input", "meta", "link", "area", "base", "col", "embed",
                   "source", "track", "wbr"})
# Finished lines are joined into one string every this many, so that a long text costs
# its characters, not a str object (~50 bytes) per short line.
_CHUNK_LINES = 4096


class _Converter:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.chunks: list[str] = []  # finished text, joined _CHUNK_LINES lines at a time
        self.lines: list[str] = []  # finished lines not yet joined, each ending in "\n"
        self.size = 0  # characters in chunks and lines
        self.blank: str | None = None  # the empty line owed before the next line with text
        self.line: list[str] = []
        self.line_size = 0
        self.line_text = False  # the current line holds more than its prefix
        self.wrote = False  # any line finished, even an empty one
        self.breaks = 0  # line breaks owed before the next text (2 = a blank line)
        self.space = False  # whitespace seen since the last word
        self.skip = 0
        self.pre = 0
        self.quote = 0
        self.cells = 0  # cells so far in the current table row
        self.lists: list[list[int]] = []  # one [counter] per open list; -1 for <ul>
        self.prefix = ""
        # Open links as (href, where their words start in link_words). One shared list, not
        # one per link: with links nested N deep, every word would otherwise be stored N times.
        self.links: list[tuple[str, int]] = []
        self.link_words: list[str] = []

    # -- output ------------------------------------------------------------------------------
    def _depth_changed(self) -> None:
        # Built once per change of depth, never per line, and at most MAX_DEPTH levels long.
        lists = min(max(0, len(self.lists) - 1), MAX_DEPTH)
        self.prefix = "  " * lists + "> " * min(self.quote, MAX_DEPTH)

    def _put(self, text: str) -> None:
        self.line.append(text)
        self.line_size += len(text)
        if self.limit is not None and self.size + self.line_size > self.limit:
            self._too_large()

    def _too_large(self) -> None:
        raise MessageError(
            f"the HTML body's plain-text version would be over {self.limit:,} characters, "
            "more than the message size limit (server.max_message_size) leaves for it: send "
            "a shorter HTML body, or give the text version yourself (text)",
            code="message.too_large")

    def _newline(self) -> None:
        line = "".join(self.line).rstrip()
        has_text = self.line_text
        self.line, self.line_size, self.line_text = [], 0, False
        self.wrote = True
        if not has_text:
            self._blank(line)
            return
        if self.blank is not None:
            self._emit(self.blank)
            self.blank = None
        self._emit(line)

    def _blank(self, line: str) -> None:
        # An empty line is written only between two lines with text, and of a run of them
        # only the first: <br> after <br> adds nothing to read, only bytes.
        if self.blank is None and self.size:
            self.blank = line

    def _emit(self, line: str) -> None:
        self.lines.append(line + "\n")
        self.size += len(line) + 1
        if self.limit is not None and self.size > self.limit:
            self._too_large()
        if len(self.lines) >= _CHUNK_LINES:
            self.chunks.append("".join(self.lines))
            self.lines = []

    def _want(self, n: int) -> None:
        self.breaks = max(self.breaks, n)
        self.space = False

    def _write(self, text: str) -> None:
        if self.breaks and (self.line or self.wrote):
            if self.line:
                self._newline()
            if self.breaks > 1:
                self._blank("")
        self.breaks = 0
        if not self.line:
            self._put(self.prefix)
        elif self.space:
            self._put(" ")
        self.space = False
        self._put(text)
        # Whitespace alone (a "&nbsp;", blanks in <pre>) is stripped from the line end: such a
        # line is empty and collapses like one.
        self.line_text = self.line_text or (bool(text) and not text.isspace())
        if self.links:
            self.link_words.append(text)

    def _end_line(self) -> None:
        if not self.line:
            self._put(self.prefix)
        self._newline()

    # -- tokenizer callbacks -----------------------------------------------------------------
    def starttag(self, tag: str, attrs: dict[str, str], closed: bool) -> None:
        self._start(tag, attrs)
        if closed and tag not in _VOID:
            self.endtag(tag)

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        if tag in _SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if tag == "br":
            self._end_line()
            self.breaks = 0
            self.space = False
        elif tag == "img":
            alt = attrs.get("alt", "").strip()
            if alt:
                self._word_text(f"[{alt}]")
        elif tag == "a":
            self.links.append((attrs.get("href", "").strip(), len(self.link_words)))
        elif tag in ("ul", "ol"):
            self._want(2 if not self.lists else 1)
            self.lists.append([0 if tag == "ol" else -1])
            self._depth_changed()
        elif tag == "li":
            self._want(1)
            counter = self.lists[-1] if self.lists else [-1]
            if counter[0] >= 0:
                counter[0] += 1
            self._write(f"{counter[0]}." if counter[0] >= 0 else "-")
            self.space = True
        elif tag == "hr":
            self._want(2)
            self._write("-" * 40)
            self._want(2)
        elif tag == "tr":
            self._want(1)
            self.cells = 0
        elif tag in ("td", "th"):
            if self.cells:
                self.space = True
                self._write("|")
                self.space = True
            self.cells += 1
        elif tag == "pre":
            self._want(2)
            self.pre += 1
        elif tag == "blockquote":
            self._want(2)
            self.quote += 1
            self._depth_changed()
        elif tag in _PARAGRAPH:
            self._want(2)
        elif tag in _LINE:
            self._want(1)

    def endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "a" and self.links:
            href, start = self.links.pop()
            self._link(href, start)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
                self._depth_changed()
            self._want(2 if not self.lists else 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._want(2)
        elif tag == "blockquote":
            if self.quote:
                self.quote -= 1
                self._depth_changed()
            self._want(2)
        elif tag in _PARAGRAPH:
            self._want(2)
        elif tag in _LINE:
            self._want(1)

    def _link(self, href: str, start: int) -> None:
        # The link's own words are only compared with its target, so at most len(href) + 1
        # characters of them are joined: a link around a whole document costs no copy of it.
        shown_parts: list[str] = []
        shown_size = -1
        for word in self.link_words[start:start + len(href) + 2]:
            shown_parts.append(word)
            shown_size += len(word) + 1
            if shown_size > len(href):
                break
        if not self.links:
            self.link_words.clear()
        if not href or href.startswith(("#", "javascript:", "cid:")):
            return
        target = href.removeprefix("mailto:")
        shown = " ".join(shown_parts)
        if not shown:
            self._word_text(target)
        elif shown not in (href, target):
            self._word_text(f"({target})")

    def _word_text(self, text: str) -> None:
        self.space = self.space or bool(self.line)
        self._write(text)

    def text(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            # Line by line with find, not split: a megabyte of "\n" would be a million strs.
            data = data.replace("\r\n", "\n")
            start = 0
            while True:
                end = data.find("\n", start)
                part = data[start:] if end < 0 else data[start:end]
                if part:
                    self.space = False
                    self._write(part)
                if end < 0:
                    return
                self._end_line()
                start = end + 1
        # One substitution, not a split into words: a megabyte of "a a a" would otherwise be
        # half a million str objects at once.
        text = _SPACE.sub(" ", data)
        if text.startswith(" "):
            self.space = True
        trailing = text.endswith(" ")
        text = text.strip(" ")
        if text:
            self._write(text)
        if trailing:
            self.space = True

    def result(self) -> str:
        if self.line:
            self._newline()
        self.chunks.extend(self.lines)
        self.lines = []
        return "".join(self.chunks)


def html_to_text(html: str, *, limit: int | None = None) -> str:
    """A plain-text rendering of ``html`` that keeps its structure readable.

    With ``limit``, a :class:`~postroom.exceptions.MessageError` (``message.too_large``) is
    raised as soon as the text passes ``limit`` characters, before more of it is built."""
    conv = _Converter(limit)
    tokenize(html, conv)
    return conv.result()
