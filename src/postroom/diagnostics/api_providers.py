"""The HTTPS API providers as the transports registry describes them: one table, read from
the Transport classes themselves (``title``, ``docs_url``, ``default_api_base`` per region,
``settings_model``, ``webhook``, ``example``), never a list of names kept here. A provider
added to ``postroom.transports.REGISTRY`` appears in everything below by itself:

- :func:`endpoints`: its API host per region, for ``postroom probe --https`` (and the
  wizard's "SMTP is blocked: which APIs can this machine reach?");
- :func:`for_provider`: the API transports that send for a mailbox provider of
  diagnostics/providers.toml (its ``transports``), else every API-key provider;
- :func:`readme_section`: the provider table and config examples of the manual's
  docs/reference/providers.md, which ``python scripts/docs_gen.py`` writes with the other
  generated pages (tests/test_api_providers.py fails when it is stale).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from postroom.diagnostics.https import Endpoint
from postroom.diagnostics.providers import Provider
from postroom.exceptions import ConfigError

START = ("<!-- provider table: generated from the transports registry by `python "
         "scripts/docs_gen.py`; edit the Transport classes, not this section -->")
END = "<!-- end of the generated provider table -->"


@dataclass(frozen=True)
class Setting:
    name: str
    required: bool
    default: Any
    choices: tuple[str, ...] = ()

    @property
    def words(self) -> str:
        if self.choices:
            return f"`{self.name}` ({' / '.join(f'`{_toml(c)}`' for c in self.choices)})"
        if self.required:
            return f"`{self.name}` (required)"
        return f"`{self.name}` (`{_toml(self.default)}`)" if self.default is not None \
            else f"`{self.name}`"


@dataclass(frozen=True)
class ApiProvider:
    kind: str
    title: str
    docs_url: str
    bases: tuple[tuple[str, str], ...]  # (label: region or mode, "" alone; API base URL)
    settings: tuple[Setting, ...]  # the provider's own keys (not api_key*, api_base...)
    example: dict[str, Any]
    notes: dict[str, str]  # example key -> the comment beside it
    events: bool  # it posts delivery events to /webhooks/NAME
    api_key: bool  # it logs in with an API key (else an OAuth grant)

    @property
    def hosts(self) -> list[tuple[str, str]]:
        """(label, host name) per distinct API host."""
        out: dict[str, str] = {}
        for label, url in self.bases:
            out.setdefault(urlsplit(url).hostname or "", label)
        return [(label, host) for host, label in out.items() if host]

    def entry(self) -> dict[str, Any]:
        """A sample ``[[connections]]`` entry."""
        return {"name": self.kind, "transport": self.kind, **self.example}


def providers() -> list[ApiProvider]:
    """Every HTTPS API transport of the registry, in kind order (imports their modules)."""
    from postroom import transports
    from postroom.transports._http import HttpTransport

    out = []
    for kind in transports.kinds():
        cls = transports.transport_class(kind)
        if issubclass(cls, HttpTransport):
            out.append(_describe(kind, cls))
    return out


def _describe(kind: str, cls: Any) -> ApiProvider:
    from postroom.transports._settings import ApiKeySettings

    model = cls.settings_model
    shared = set(ApiKeySettings.model_fields) | {"transport"}
    own = tuple(_setting(n, f) for n, f in model.model_fields.items() if n not in shared)
    api_key = issubclass(model, ApiKeySettings)
    example = dict(cls.example) if cls.example else _example(kind, own, api_key)
    return ApiProvider(kind, cls.title, cls.docs_url, _bases(cls, model, own), own, example,
                       dict(cls.example_notes), cls.webhook is not None, api_key)


def _setting(name: str, field: Any) -> Setting:
    choices = tuple(a for a in get_args(field.annotation) if isinstance(a, str)) \
        if get_origin(field.annotation) is Literal else ()
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    # An empty list or table says nothing worth showing as a default.
    return Setting(name, field.is_required(), default if default not in ([], {}) else None,
                   choices)


def _example(kind: str, own: tuple[Setting, ...], api_key: bool) -> dict[str, Any]:
    """For a class without ``example``: its required keys as placeholders, the key's env."""
    out: dict[str, Any] = {s.name: f"<{s.name}>" for s in own if s.required}
    if api_key:
        out["api_key_env"] = f"{kind.upper()}_API_KEY"
    return out


def _bases(cls: Any, model: Any, own: tuple[Setting, ...]) -> tuple[tuple[str, str], ...]:
    """The API base URL for the defaults and for each value of each choice (region, stream
    ...), from the class's own ``default_api_base`` (a stand-in instance without a client:
    only its settings are read)."""
    region = next((s for s in own if s.name == "region"), None)
    variants: list[tuple[str, dict[str, Any]]] = [
        (str(region.default) if region and region.default else "", {})]
    variants += [(c, {s.name: c}) for s in own for c in s.choices]
    out: dict[str, str] = {}
    for label, values in variants:
        stand_in = object.__new__(cls)
        stand_in.settings = model.model_construct(**values)
        try:
            base = str(stand_in.default_api_base())
        except (AttributeError, KeyError, TypeError, ValueError):
            base = str(cls.default_base)
        if base.startswith("https://") and base not in out.values():
            out[label] = base
    return tuple(out.items())


def endpoints() -> list[Endpoint]:
    """Every API provider's host, per region, for the HTTPS reachability check."""
    out: list[Endpoint] = []
    seen: set[str] = set()
    for p in providers():
        hosts = p.hosts
        for label, host in hosts:
            if host not in seen:
                seen.add(host)
                out.append(Endpoint(f"{p.title} ({label})" if label and len(hosts) > 1
                                    else p.title, host))
    return out


def for_provider(provider: Provider | None) -> list[ApiProvider]:
    """The API transports that send for ``provider`` (providers.toml ``transports``), or,
    when none is known, every provider that takes an API key."""
    every = providers()
    if provider is not None and provider.transports:
        mine = [p for p in every if p.kind in provider.transports]
        if mine:
            return mine
    return [p for p in every if p.api_key]


# -- the manual's provider page -----------------------------------------------------------------

def readme_section() -> str:
    """The provider table and one sample entry per API-key provider (Markdown)."""
    rows = ["| transport | provider | API host (per region) | keys besides the API key | "
            "delivery events |", "|---|---|---|---|---|"]
    blocks = []
    for p in providers():
        if not p.api_key:
            continue  # Gmail and Microsoft Graph sign in with OAuth: their own sections
        hosts = ", ".join(f"`{h}`" + (f" ({label})" if label and len(p.hosts) > 1 else "")
                          for label, h in p.hosts) or "your installation (`api_base`)"
        keys = ", ".join(s.words for s in p.settings) or "none"
        events = "`POST /webhooks/NAME`" if p.events else "none"
        rows.append(f"| `{p.kind}` | [{p.title}]({p.docs_url}) | {hosts} | {keys} | {events} |")
        blocks.append("\n".join(["[[connections]]", *(_line(k, v, p.notes.get(k))
                                                      for k, v in p.entry().items())]))
    return "\n".join([START, "", *rows, "", "```toml", "\n\n".join(blocks), "```", "", END])


def updated_readme(text: str) -> str:
    """``text`` with its generated section replaced by the current one."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ConfigError("the generated provider table's markers are missing; put "
                          f"{START!r} and {END!r} where it belongs", code="readme.markers")
    return text[:start] + readme_section() + text[end + len(END):]


def _line(key: str, value: Any, note: str | None) -> str:
    line = f"{key} = {_toml(value)}"
    return f"{line:<43} # {note}" if note else line


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m postroom.diagnostics.api_providers",
        description="Print the HTTPS API provider section, or --write it into a file "
        "(python scripts/docs_gen.py writes it into docs/reference/providers.md)")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="replace the generated section of this file")
    args = parser.parse_args(argv)
    if args.write is None:
        print(readme_section())
        return 0
    text = args.write.read_text("utf-8")
    new = updated_readme(text)
    if new != text:
        args.write.write_text(new, "utf-8")
        print(f"{args.write}: provider table updated")
    else:
        print(f"{args.write}: provider table already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
