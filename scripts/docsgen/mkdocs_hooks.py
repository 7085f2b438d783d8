"""MkDocs hook (mkdocs.yml ``hooks:``): the links of the root files the site shows.

SECURITY.md, CONTRIBUTING.md and ADDING_PROVIDERS.md live at the repository's root, where
their links are written for a reader of the repository (``ADDING_PROVIDERS.md``,
``docs/reference/cli.md``, ``src/postroom/transports/postmark.py``). A page of the manual
shows one through pymdownx.snippets (``--8<-- "SECURITY.md"``); in that page, after the
file is included, this points each link at the site's page for it (the page that includes
a root file, or the page under docs/), read from docs/ (validation.links.absolute_links:
relative_to_docs, so strict mode still checks it). A link to source code has no page: its
text stays, the link goes. Other pages are left as written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

_SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.M)
_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
_STATE: dict[str, Any] = {"root": Path("."), "pages": {}, "current": None}


class _RootLinks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        if _STATE["current"] not in _STATE["pages"].values():
            return lines
        out, fenced = [], False
        for line in lines:
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            out.append(line if fenced else _LINK.sub(_relink, line))
        return out


def _relink(m: re.Match[str]) -> str:
    bang, text, target = m.groups()
    path, _, anchor = target.partition("#")
    if not path or "://" in path or path.startswith(("/", "mailto:")):
        return m.group(0)
    suffix = f"#{anchor}" if anchor else ""
    pages: dict[str, str] = _STATE["pages"]
    if path in pages:
        return f"{bang}[{text}](/{pages[path]}{suffix})"
    if path.startswith("docs/"):
        return f"{bang}[{text}](/{path.removeprefix('docs/')}{suffix})"
    if (_STATE["root"] / path).exists():
        return text  # source code: no page in the site
    return m.group(0)


class _Extension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        # After pymdownx.snippets (priority 32) has included the file.
        md.preprocessors.register(_RootLinks(md), "postroom_root_links", 31)


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    _STATE["root"] = Path(config["config_file_path"]).resolve().parent
    _STATE["pages"] = {name: page.relative_to(docs).as_posix()
                       for page in sorted(docs.rglob("*.md"))
                       for name in _SNIPPET.findall(page.read_text("utf-8"))}
    config["markdown_extensions"].append(_Extension())
    return config


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    _STATE["current"] = page.file.src_uri
    return markdown
