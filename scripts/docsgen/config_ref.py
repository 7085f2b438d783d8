"""docs/reference/configuration.md: every key of postroom.toml, from the settings models.

Where the models come from (nothing listed here by hand):

- the core sections: ``postroom.settings.SECTIONS``;
- the features' sections: the ``postroom.sections`` entry point group (pyproject.toml), the
  group ``settings.load`` reads too; one declaring ``array_field`` is an array of tables;
- ``[[connections]]``: ``postroom.settings.ConnectionBase``, then each transport kind of the
  registry (``postroom.transports.kinds()`` / ``settings_model``); keys that several kinds
  inherit from one class (every HTTPS API, every API-key provider) get one section;
- ``[[routes]]``: ``postroom.routing.rules.Route``;
- a key whose value is a table of its own (a connection's ``policy``) gets its own section.

The meaning of a key is the comment beside its field (docsgen.comments).
"""

from __future__ import annotations

import re
import types
import typing
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from docsgen import comments
from docsgen.markdown import GENERATED, cell, code, heading, paragraphs, prose, toml
from postroom import settings, transports
from postroom.routing.rules import Route

_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", PurePath: "path"}
_LIMITS = (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}"),
           ("min_length", "at least {} long"), ("max_length", "at most {} long"),
           ("pattern", "matching {}"))


@dataclass(frozen=True)
class Key:
    path: str  # as an error message names it: "server.smtp_listen"
    anchor: str
    name: str  # as written in the file (a field's alias: "from")
    type: str
    default: str  # Markdown
    limits: str
    text: str  # the comment, plain text
    declared_in: str  # module.Class, to say where a missing comment belongs
    env: str | None  # POSTROOM_SECTION__KEY, for a key of a plain section
    table: str | None  # the anchor of its own section, for a key whose value is a table


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str  # Markdown
    intro: str  # Markdown
    keys: tuple[Key, ...]


def sections() -> list[Section]:
    """Every section of the page, in its order."""
    out: list[Section] = []
    for name, model in settings.SECTIONS.items():
        out += _model(model, name, f"[{name}]", name, env=name)
    for ep in sorted(entry_points(group=settings.ENTRY_POINT_GROUP), key=lambda e: e.name):
        out += _feature(ep.name, ep.load())
    out += _connections()
    out += _model(Route, "routes", "[[routes]]", "routes")
    # A key whose value is a table is found at its table's section: one anchor for both.
    anchors = Counter(a for s in out
                      for a in (s.anchor, *(k.anchor for k in s.keys if not k.table)))
    twice = sorted(a for a, n in anchors.items() if n > 1)
    if twice:
        raise ValueError(f"configuration.md: anchors used twice: {', '.join(twice)}")
    return out


def missing_text() -> list[str]:
    """Each key without a comment to explain it, with the class that declares it."""
    return [f"{k.path} ({k.declared_in})" for s in sections() for k in s.keys if not k.text]


def render() -> str:
    every = sections()
    lines = [
        "# Configuration reference", "",
        GENERATED.format(source="the settings models (the comments beside their fields)"), "",
        "Every key of `postroom.toml`, with its type, its default and what it does. "
        "A key left out takes its default. A key of a `[section]` can also be set from the "
        "environment as `POSTROOM_<SECTION>__<KEY>` (e.g. "
        "`POSTROOM_SERVER__SMTP_LISTEN=0.0.0.0:2525`), which wins over the file; the value is "
        "read as TOML when it parses as TOML (numbers, booleans, arrays), else as a string. "
        "Secrets are never written here: name an environment variable (`*_env`) or a file "
        "(`*_file`), or store them with `postroom connection set-password NAME`.", "",
        "Postroom checks the file when it starts (and `postroom config import` an imported "
        "one): an unknown key, a wrong type or a value out of range stops it with the key's "
        "name and what to write instead.", "",
        "## Sections", "",
        *(f"- [{code(s.title) if s.title.startswith('[') else s.title}](#{s.anchor})"
          for s in every), "",
    ]
    for s in every:
        lines += _section_md(s)
    return "\n".join(lines).rstrip() + "\n"


def _section_md(s: Section) -> list[str]:
    lines = [heading(2, s.title, s.anchor), ""]
    if s.intro:
        lines += [s.intro, ""]
    if not s.keys:
        return lines
    lines += ["| key | type | default |", "|---|---|---|"]
    for k in s.keys:
        target = k.table or k.anchor
        lines.append(f"| [{cell(code(k.name))}](#{target}) | {cell(k.type)} | "
                     f"{cell(k.default)} |")
    lines.append("")
    for k in s.keys:
        if k.table:
            continue  # its keys have a section of their own, linked from the table above
        facts = [f"**Type:** {k.type}" + (f" ({k.limits})" if k.limits else ""),
                 f"**Default:** {k.default}"]
        if k.env:
            facts.append(f"**Environment:** `{k.env}`")
        lines += [heading(3, k.name, k.anchor), "", prose(_sentence(k.text)), "",
                  " · ".join(facts), ""]
    return lines


def _sentence(text: str) -> str:
    """A comment as a sentence: a capital letter (unless it starts with a name such as
    ``o:testmode``) and a full stop."""
    first = text.split(" ", 1)[0]
    if first.isalpha() and first.islower():
        text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def _feature(name: str, model: type[BaseModel]) -> list[Section]:
    # A section written as an array of tables ([[alerts]]) holds its items in one field.
    array_field = getattr(model, "array_field", None)
    if isinstance(array_field, str):
        item = _nested(model.model_fields[array_field].annotation)
        if item is not None:
            intro = paragraphs(_doc(model))
            return _model(item, name, f"[[{name}]]", name, intro=intro)
    return _model(model, name, f"[{name}]", name, env=name)


def _connections() -> list[Section]:
    base = settings.ConnectionBase
    models = {kind: transports.settings_model(kind, "docs") for kind in transports.kinds()}
    users: dict[type, list[str]] = {}
    for kind, model in models.items():
        for cls in _declaring(model):
            users.setdefault(cls, []).append(kind)
    shared = [cls for cls, kinds in users.items() if len(kinds) > 1 and cls is not base]
    shared.sort(key=lambda c: (-len(users[c]), c.__name__))
    out = _model(base, "connections", "[[connections]]: every connection", "connections",
                 intro=paragraphs(_doc(base)) + "\n\n" + _kinds_line(models))
    for cls in shared:
        anchor = "connections-" + _kebab(cls.__name__)
        used = ", ".join(f"[`{k}`](#connections-{k})" for k in users[cls])
        fields = _declared_fields(cls)
        out += _model(cls, anchor, _title(cls), "connections", fields=fields,
                      intro=paragraphs(_doc(cls)) + f"\n\nUsed by the transports {used}.")
    for kind, model in models.items():
        cls = transports.transport_class(kind)
        mine = {name for name in model.model_fields if name != "transport"
                and comments.declaring_class(model, name) not in (base, *shared)}
        also = [f"[{'every connection' if c is base else _title(c)}]"
                f"(#{'connections' if c is base else 'connections-' + _kebab(c.__name__)})"
                for c in (base, *shared) if issubclass(model, c)]
        site = f" ([API documentation]({cls.docs_url}))" if cls.docs_url else ""
        intro = (f"{prose(cls.title)}{site}. `transport = \"{kind}\"` takes the keys of "
                 f"{', '.join(also)}" + (", and these:" if mine else " only."))
        out += _model(model, f"connections-{kind}", f"transport = \"{kind}\"",
                      "connections", fields=mine, intro=intro)
    return out


def _kinds_line(models: Mapping[str, type[BaseModel]]) -> str:
    kinds = ", ".join(f"[`{k}`](#connections-{k})" for k in models)
    return f"`transport` is one of {kinds}; each adds keys of its own."


def _model(model: type[BaseModel], anchor: str, title: str, where: str, *,
           env: str | None = None,
           fields: set[str] | None = None, intro: str | None = None) -> list[Section]:
    """The section of ``model`` (its ``fields``, default all) and those of its tables."""
    keys: list[Key] = []
    nested: list[Section] = []
    for name, field in model.model_fields.items():
        if fields is not None and name not in fields:
            continue
        key = field.alias or name
        declared = comments.declaring_class(model, name)
        text = comments.field_comment(model, name)
        sub = _nested(field.annotation)
        table = None
        if sub is not None:
            table = f"{anchor}-{key}"
            nested += _model(sub, table, f"[{where}.{key}]", f"{where}.{key}",
                             intro="\n\n".join(p for p in (prose(text), paragraphs(_doc(sub)))
                                               if p))
        keys.append(Key(f"{where}.{key}", f"{anchor}-{key}", key, _type(field.annotation),
                        _default(field), _limits(field), text,
                        f"{declared.__module__}.{declared.__qualname__}",
                        f"POSTROOM_{env.upper()}__{key.upper()}" if env else None, table))
    if intro is None:
        intro = paragraphs(_doc(model))
    return [Section(anchor, title, intro, tuple(keys)), *nested]


def _declaring(model: type[BaseModel]) -> list[type]:
    """The classes of ``model``'s MRO that declare settings fields."""
    return [c for c in model.__mro__ if c is not BaseModel and isinstance(c, type)
            and issubclass(c, BaseModel) and _declared_fields(c)]


def _declared_fields(cls: type) -> set[str]:
    return set(vars(cls).get("__annotations__", {})) & set(getattr(cls, "model_fields", {}))


def _doc(cls: type) -> str | None:
    """The class's own docstring (not one inherited from pydantic's BaseModel)."""
    doc = vars(cls).get("__doc__")
    return doc if isinstance(doc, str) else None


def _title(cls: type) -> str:
    """A section title from the first words of the class's docstring."""
    first = re.split(r"[:.(]", (_doc(cls) or cls.__name__).strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _kebab(name: str) -> str:
    name = name.removesuffix("Settings")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The model of a key whose value is a table (or an array of tables)."""
    for a in (annotation, *typing.get_args(annotation)):
        for b in (a, *typing.get_args(a)):
            if isinstance(b, type) and issubclass(b, BaseModel):
                return b
    return None


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(code(toml(a)) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"array of {_plural(_type(args[0]))}" if args else "array"
    if origin is dict:
        return f"table of {_plural(_type(args[1]))}" if len(args) > 1 else "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        if issubclass(annotation, PurePath):
            return "path"
        import enum

        if issubclass(annotation, enum.Enum):
            return " or ".join(code(toml(m.value)) for m in annotation)
        return _TYPES.get(annotation, annotation.__name__)
    return str(annotation)


def _plural(words: str) -> str:
    if " or " in words or words.startswith("`"):
        return words
    return {"table": "tables", "path": "paths"}.get(words, words + "s")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    if factory is not None:
        # A factory that computes from the machine (the host name) has no fixed value to
        # print: the key's comment says what it is.
        if not (isinstance(factory, type) or getattr(factory, "__name__", "") == "<lambda>"):
            return "computed when read"
        value = factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return "not set"
    return code(toml(value))


def _limits(field: FieldInfo) -> str:
    found = []
    for meta in field.metadata:
        for attr, words in _LIMITS:
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(words.format(code(str(value)) if attr == "pattern" else value))
    return ", ".join(found)
