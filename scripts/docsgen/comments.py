"""The meaning of each settings field, read from the comments beside it in the source.

The settings models keep their explanations as comments (a block above a field, or a
trailing comment on its line): read here with ast and tokenize when the manual is generated,
so the running server never pays for them (pydantic's use_attribute_docstrings would read
the source at every import).

A comment block above a field also describes the fields right below it (no blank line
between) that have no comment of their own, when the block names them or they share the
first or last word of the first field's name: that is how the code documents a group of
keys, e.g. ``breaker_failures`` and ``breaker_cooldown`` under one "Circuit breaker" block,
or ``max_connections`` and ``max_connections_per_ip``. Any other field without a comment has
no text, which tests/test_docs.py reports.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize

from pydantic import BaseModel


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment, for the fields ``cls`` itself annotates."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"{cls.__qualname__}: expected a class definition")
    text = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and text[tok.start[0] - 1][:tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    group = ("", "")  # (the block, the name of the field it sits on)
    previous_end = -1
    for stmt in node.body:
        block = _block_above(text, stmt.lineno)
        if not block and stmt.lineno != previous_end + 1:
            group = ("", "")  # a blank line ends a group
        previous_end = stmt.end_lineno or stmt.lineno
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            group = ("", "")
            continue
        name = stmt.target.id
        if block:
            group = (block, name)
        own = " ".join(trailing[n] for n in range(stmt.lineno, previous_end + 1)
                       if n in trailing)
        if block or own:
            out[name] = " ".join(p for p in (block, own) if p)
        elif group[0] and _in_group(name, *group):
            out[name] = group[0]
    return out


def _in_group(name: str, block: str, first: str) -> bool:
    words, head = name.split("_"), first.split("_")
    return name in block or words[0] == head[0] or words[-1] == head[-1]


def _block_above(text: list[str], lineno: int) -> str:
    """The comment lines right above line ``lineno`` (1-based), joined."""
    found: list[str] = []
    n = lineno - 2
    while n >= 0 and text[n].strip().startswith("#"):
        found.append(text[n].strip().lstrip("#").strip())
        n -= 1
    return " ".join(reversed(found))


def field_comment(model: type[BaseModel], name: str) -> str:
    """The comment of field ``name`` of ``model``: where the field is declared, or, for a
    redeclaration without one (a transport narrowing ``transport``), where it was first."""
    for cls in model.__mro__:
        if name in vars(cls).get("__annotations__", {}):
            text = _class_comments(cls).get(name, "")
            if text:
                return text
    return ""


def declaring_class(model: type[BaseModel], name: str) -> type:
    """The class of ``model``'s MRO whose body declares field ``name`` last."""
    for cls in model.__mro__:
        if name in vars(cls).get("__annotations__", {}):
            return cls
    raise KeyError(f"{model.__qualname__} has no field {name!r}")
