"""Reading the configuration: ``postroom.toml`` plus ``POSTROOM_*`` overrides, validated into
:class:`postroom.settings.Settings`, and every mistake worded with where it is.

settings.py holds the models (what may be configured); this module holds how a file and the
environment become them: the file's search path, the overrides, the checks across sections
(a route names known connections, the default route comes last), and the errors, which
start with the key's place (``postroom.toml:12:`` or the environment variable,
postroom.config_source) and never quote a secret. The database's stored configuration
(postroom.store.dbconfig) goes through the same checks and words.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from postroom import config_values, settings
from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from postroom.connection_settings import ConnectionBase
    from postroom.routing.rules import Route

# Pure pieces, shared with postroom-sendmail's pydantic-free loader; their old names here.
_ENV_NOT_KEYS = config_values.ENV_NOT_KEYS
value_from_text = config_values.value_from_text
search_path = config_values.search_path
config_path_from = config_values.config_path_from


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        # Only POSTROOM_<SECTION>__<KEY> is an override: other POSTROOM_* names may hold the
        # user's own secrets (password_env = "POSTROOM_SMTP_PASSWORD").
        if not key.startswith(settings.ENV_PREFIX) or key in _ENV_NOT_KEYS or "__" not in key:
            continue
        parts = key[len(settings.ENV_PREFIX) :].lower().split("__")
        known = parts[0] in settings.SECTIONS or settings.feature_model(parts[0]) is not None
        if len(parts) != 2 or not known:
            names = [*settings.SECTIONS, *settings.feature_names()]
            raise ConfigError(
                f"environment variable {key} is not understood: use "
                "POSTROOM_<SECTION>__<KEY> with a section among "
                f"{', '.join(s.upper() for s in names)} (e.g. "
                "POSTROOM_SERVER__SMTP_LISTEN=127.0.0.1:2525)",
                code="config.env",
            )
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{parts[0]}] must be a table", code="config.type")
        section[parts[1]] = value_from_text(raw)


# A key's path in the file -> where it is set ("postroom.toml:12", "environment POSTROOM_X__Y")
# or "" (postroom.config_source); errors that name a key start with it.
Locator = Callable[[tuple[int | str, ...]], str]


def _under(at: Locator | None, *base: int | str) -> Locator | None:
    """``at`` for the keys of one table (``connections[1]``): paths relative to ``base``."""
    return None if at is None else (lambda loc: at((*base, *loc)))


def _at(at: Locator | None, loc: tuple[int | str, ...]) -> str:
    found = at(loc) if at is not None else ""
    return f"{found}: " if found else ""


def _locator(cfg: Path | None, text: str, environ: Mapping[str, str]) -> Locator:
    def at(loc: tuple[int | str, ...]) -> str:
        from postroom.config_source import where  # only once an error is worded

        return where(cfg, text, environ, loc)
    return at


def _where(section: str, loc: tuple[int | str, ...]) -> str:
    text = section
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed where ``loc`` points, following nested tables (e.g. a route's
    ``match``, a connection's ``policy``)."""
    import typing

    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            continue
        ann = model.model_fields[part].annotation
        nested = [a for a in (ann, *typing.get_args(ann))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def _explain(section: str, err: ValidationError, model: type[BaseModel],
             at: Locator | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _at(at, loc) + _where(section, loc)
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            key = str(loc[-1])
            import difflib  # only to word an error

            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            lines.append(f"{where}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key is missing; add it")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            from postroom.config_source import masked  # a secret is never quoted

            value = masked(str(loc[-1]) if loc else section, e.get("input"))
            lines.append(f"{where} = {value!r}: {msg}")
    return "; ".join(lines)


def _section(model: type[BaseModel], name: str, data: Any, at: Locator | None = None) -> Any:
    if data is None:
        data = {}
    # A feature section written as an array of tables ([[alerts]]): the model names the
    # field that holds the list (``array_field``).
    array_field = getattr(model, "array_field", None)
    if isinstance(data, list) and isinstance(array_field, str):
        data = {array_field: data}
        # the file has [[name]] where the model has name.array_field: locate without it
        at = (lambda loc, outer=at: outer(loc[1:])) if at is not None else None
    if not isinstance(data, dict):
        raise ConfigError(f"{_at(at, ())}[{name}] must be a table", code="config.type")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid configuration: {_explain(name, err, model, at)}",
            code="config.invalid",
        ) from err


def _connections(items: Any, at: Locator | None = None) -> tuple[ConnectionBase, ...]:
    from postroom.transports import settings_model

    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError(
            "connections must be an array of tables: [[connections]]", code="config.type"
        )
    out: list[ConnectionBase] = []
    for i, item in enumerate(items):
        where = f"connections[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table", code="config.type")
        model = settings_model(str(item.get("transport", "")),
                               _at(at, ("connections", i, "transport")) + where)
        out.append(_section(model, where, item, _under(at, "connections", i)))
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        again = names.index(dupes[0], names.index(dupes[0]) + 1)  # the second one's line
        raise ConfigError(
            f"{_at(at, ('connections', again, 'name'))}connection names must be unique; "
            f"{', '.join(dupes)} is used twice", code="config.dupe"
        )
    return tuple(out)


def _routes(items: Any, names: set[str], at: Locator | None = None) -> tuple[Route, ...]:
    if items is None:
        return ()
    from postroom.routing.rules import Route

    if not isinstance(items, list):
        raise ConfigError("routes must be an array of tables: [[routes]]", code="config.type")
    out: list[Route] = []
    for i, item in enumerate(items):
        where = f"routes[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table", code="config.type")
        route: Route = _section(Route, where, item, _under(at, "routes", i))
        for name in route.chain:
            if name not in names:
                import difflib  # only to word an error

                close = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f"did you mean {close[0]!r}?" if close else (
                    f"known: {', '.join(sorted(names)) or 'none configured'}")
                raise ConfigError(
                    f"{_at(at, ('routes', i, 'chain'))}{where}.chain names {name!r}, which is "
                    "not a [[connections]] name; "
                    + hint, code="config.route.unknown_connection")
        if len(set(route.chain)) != len(route.chain):
            raise ConfigError(f"{_at(at, ('routes', i, 'chain'))}{where}.chain lists a "
                              "connection twice", code="config.invalid")
        out.append(route)
    defaults = [i for i, r in enumerate(out) if r.match is None]
    if defaults and defaults[0] != len(out) - 1:
        raise ConfigError(
            f"{_at(at, ('routes', defaults[0]))}routes[{defaults[0]}] has no match, so it "
            "takes every message and the routes "
            "after it would never be used; move it last", code="config.invalid")
    return tuple(out)


# The same checks, and the same words, for configuration stored in the database
# (postroom.store.dbconfig): an entry made in the web admin is held to the file's rules.
def validate_section(model: type[BaseModel], where: str, data: Any) -> Any:
    """``data`` validated by ``model``; ConfigError worded as for the file (``where``.key)."""
    return _section(model, where, data)


def validate_routes(items: Any, names: set[str]) -> tuple[Route, ...]:
    """A [[routes]] list checked as the file's: each chain names known connections, the
    default route (no match) comes last."""
    return _routes(items, names)


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    create: bool = False,
    connections: bool = True,
) -> settings.Settings:
    """Read and validate the configuration.

    With ``create=True`` a missing file is written from the commented template first
    (what `postroom serve` does on a fresh machine). With ``connections=False``,
    [[connections]] and [[routes]] are neither read nor checked and come back empty: for
    postroom-sendmail, which stores mail or hands it over and never delivers it. Checking a
    connection imports its transport (asyncio, ssl...: a fifth of that command's start-up,
    paid once per message), and a typo there must not turn away mail that a running
    `postroom serve` would deliver.
    """
    env = os.environ if environ is None else environ
    cfg = config_path_from(path, env)
    data: dict[str, Any] = {}
    text = ""
    if not cfg.exists() and create:
        from postroom.bootstrap import write_config_template

        write_config_template(cfg)
    if cfg.exists():
        try:
            text = cfg.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{cfg}: not valid TOML ({err}); fix the syntax at that line",
                code="config.syntax",
            ) from err
        except OSError as err:
            raise ConfigError(f"cannot read {cfg}: {err.strerror}", code="config.read") from err
    elif path is not None or "POSTROOM_CONFIG" in env:
        raise ConfigError(
            f"configuration file {cfg} does not exist; run `postroom serve --config {cfg}` "
            "once to create a commented one",
            code="config.missing",
        )
    _apply_env(data, env)
    others = sorted(set(data) - {*settings.SECTIONS, "connections", "routes"})
    features = {name: settings.feature_model(name) for name in others}
    unknown = [name for name, model in features.items() if model is None]
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: "
            f"{', '.join([*settings.SECTIONS, *settings.feature_names()])}, connections, routes",
            code="config.invalid",
        )
    # A section the file and the environment leave out is its defaults, which are valid by
    # construction (tests/test_cli_config.py checks each equals a validated empty table):
    # building its validator only to check nothing would slow every command's start.
    at = _locator(cfg if cfg.exists() else None, text, env)
    sections: dict[str, Any] = {
        name: _section(model, name, data[name], _under(at, name)) if name in data
        else model.model_construct() for name, model in settings.SECTIONS.items()}
    conns = _connections(data.get("connections"), at) if connections else ()
    return settings.Settings(
        **sections,
        connections=conns,
        routes=(_routes(data.get("routes"), {c.name for c in conns}, at) if connections
                else ()),
        config_path=cfg if cfg.exists() else None,
        base_dir=(cfg.parent if cfg.exists() else Path.cwd()).resolve(),
        features=tuple((name, _section(model, name, data[name], _under(at, name)))
                       for name, model in features.items() if model is not None),
    )
