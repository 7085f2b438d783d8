"""A readable plain-text version of an HTML body, for the text/plain part of a message that
was given only as HTML (multipart/alternative, RFC 2046 5.1.4: readers without HTML, spam
filters and screen readers use it).

Built on the standard library's tolerant ``html.parser``: paragraphs and headings become
blank-line separated blocks, ``<br>`` and list items line breaks, links keep their target
(``text (https://...)``), images their alt text, ``<pre>`` its layout; scripts, styles and
the document head are dropped. Not a renderer: the goal is text a person can read.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "svg"})
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table",
                        "ul", "ol", "dl", "figure", "address", "hr", "form", "fieldset"})
_LINE = frozenset({"div", "li", "tr", "dt", "dd", "section", "article", "header", "footer",
                   "nav", "main", "aside", "caption", "figcaption", "center", "body", "html"})
_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML whitespace; &nbsp; (U+00A0) is kept
_VOID = frozenset({"br", "img", "hr", "input", "meta", "link", "area", "base", "col", "embed",
                   "source", "track", "wbr"})


class _Converter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.line: list[str] = []
        self.breaks = 0  # line breaks owed before the next text (2 = a blank line)
        self.space = False  # whitespace seen since the last word
        self.skip = 0
        self.pre = 0
        self.quote = 0
        self.cells = 0  # cells so far in the current table row
        self.lists: list[list[int]] = []  # one [counter] per open list; -1 for <ul>
        self.links: list[tuple[str, list[str]]] = []  # (href, the link's words so far)

    # -- output ------------------------------------------------------------------------------
    def _prefix(self) -> str:
        return "  " * max(0, len(self.lists) - 1) + "> " * self.quote

    def _newline(self) -> None:
        self.lines.append("".join(self.line).rstrip())
        self.line = []

    def _want(self, n: int) -> None:
        self.breaks = max(self.breaks, n)
        self.space = False

    def _write(self, text: str) -> None:
        if self.breaks and (self.line or self.lines):
            if self.line:
                self._newline()
            for _ in range(self.breaks - 1):
                if self.lines and self.lines[-1] != "":
                    self.lines.append("")
        self.breaks = 0
        if not self.line:
            self.line.append(self._prefix())
        elif self.space:
            self.line.append(" ")
        self.space = False
        self.line.append(text)
        for _, words in self.links:
            words.append(text)

    # -- parser callbacks --------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            if tag not in _VOID:
                self.skip += 1
            return
        if self.skip:
            return
        a = dict(attrs)
        if tag == "br":
            if not self.line:
                self.line.append(self._prefix())
            self._newline()
            self.breaks = 0
            self.space = False
        elif tag == "img":
            alt = (a.get("alt") or "").strip()
            if alt:
                self._word_text(f"[{alt}]")
        elif tag == "a":
            self.links.append(((a.get("href") or "").strip(), []))
        elif tag in ("ul", "ol"):
            self._want(2 if not self.lists else 1)
            self.lists.append([0 if tag == "ol" else -1])
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
        elif tag in _PARAGRAPH:
            self._want(2)
        elif tag in _LINE:
            self._want(1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            if tag not in _VOID:
                self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "a" and self.links:
            href, words = self.links.pop()
            self._link(href, " ".join(words))
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._want(2 if not self.lists else 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._want(2)
        elif tag == "blockquote":
            self.quote = max(0, self.quote - 1)
            self._want(2)
        elif tag in _PARAGRAPH:
            self._want(2)
        elif tag in _LINE:
            self._want(1)

    def _link(self, href: str, shown: str) -> None:
        if not href or href.startswith(("#", "javascript:", "cid:")):
            return
        target = href.removeprefix("mailto:")
        if not shown:
            self._word_text(target)
        elif shown not in (href, target):
            self._word_text(f"({target})")

    def _word_text(self, text: str) -> None:
        self.space = self.space or bool(self.line)
        self._write(text)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            parts = data.replace("\r\n", "\n").split("\n")
            for i, part in enumerate(parts):
                if i:
                    if not self.line:
                        self.line.append(self._prefix())
                    self._newline()
                if part:
                    self.space = False
                    self._write(part)
            return
        words = _SPACE.split(data)
        if words and words[0] == "":
            self.space = True
            words = words[1:]
        trailing = bool(words) and words[-1] == ""
        text = " ".join(w for w in words if w)
        if text:
            self._write(text)
        if trailing:
            self.space = True

    def text(self) -> str:
        if self.line:
            self._newline()
        out: list[str] = []
        for line in self.lines:
            if line == "" and (not out or out[-1] == ""):
                continue
            out.append(line)
        while out and out[-1] == "":
            out.pop()
        return "\n".join(out) + "\n" if out else ""


def html_to_text(html: str) -> str:
    """A plain-text rendering of ``html`` that keeps its structure readable."""
    conv = _Converter()
    conv.feed(html)
    conv.close()
    return conv.text()
