"""Flask extension: ``postroom = Postroom(app)``, or ``Postroom()`` then ``init_app(app)`` in an
app factory; views call ``postroom.send(to=..., subject=..., text=...)``.

Each app gets one :class:`postroom.Mailer`, made from its ``app.config`` when the extension
is initialised (so a configuration mistake stops the app at start-up, not at its first mail)
and kept in ``app.extensions["postroom"]``. ``send`` returns once Postroom holds the message:
on disk (embedded mode, fsync) or accepted by a Postroom server's HTTP API (remote mode).
Install with ``pip install postroom[flask]``. Settings (all optional)::

    POSTROOM_CONFIG = "/etc/postroom/postroom.toml"  # embedded mode (default: found like the CLI)
    POSTROOM_APP = "shop"                            # the log shows source "python:shop"
    # or remote mode, through a Postroom server's HTTP API:
    # POSTROOM_URL = "http://127.0.0.1:8025"; POSTROOM_API_KEY = "shop.SECRET"
    POSTROOM_DEFAULT_FROM = "Shop <shop@example.com>"  # default: MAIL_DEFAULT_SENDER
    POSTROOM_TAGS = ["flask"]                        # added to every message's tags
    POSTROOM_TIMEOUT = 30                            # seconds (remote mode)

This module is named ``postroom.flask``; the imports below are absolute (``flask``), so they
always mean the real Flask package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any

from flask import Flask, current_app

from postroom.exceptions import ConfigError
from postroom.mailer import Mailer

EXTENSION = "postroom"
PREFIX = "POSTROOM_"
# app.config key -> Mailer's argument (POSTROOM_TAGS is the extension's own).
_MAILER_ARGS = {"CONFIG": "config", "APP": "app", "URL": "url", "API_KEY": "api_key",
                "DEFAULT_FROM": "default_from", "TIMEOUT": "timeout"}
_KNOWN = (*_MAILER_ARGS, "TAGS")


@dataclass(slots=True)
class State:
    """What ``app.extensions["postroom"]`` holds for one app."""

    mailer: Mailer
    tags: list[str] = field(default_factory=list)


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Iterable) or not all(isinstance(t, str) and t for t in items):
        raise ConfigError("POSTROOM_TAGS must be a list of non-empty strings, e.g. [\"flask\"]",
                          code="flask.tags")
    return list(items)


def mailer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Mailer's keyword arguments from a Flask config; unknown POSTROOM_* keys are refused
    (a typo would otherwise silently send through the wrong instance)."""
    unknown = sorted(k for k in config if isinstance(k, str) and k.startswith(PREFIX)
                     and k[len(PREFIX):] not in _KNOWN)
    if unknown:
        raise ConfigError(f"app.config: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(PREFIX + k for k in _KNOWN)}", code="flask.config")
    kwargs = {arg: config[PREFIX + key] for key, arg in _MAILER_ARGS.items()
              if config.get(PREFIX + key) is not None}
    if "default_from" not in kwargs and config.get("MAIL_DEFAULT_SENDER"):
        sender = config["MAIL_DEFAULT_SENDER"]
        # Flask-Mail's form: "addr" or ("Name", "addr").
        if isinstance(sender, tuple | list):
            if len(sender) != 2:
                raise ConfigError("MAIL_DEFAULT_SENDER must be \"addr\" or (\"Name\", \"addr\")",
                                  code="flask.default_from")
            # Unencoded ("Shöp <shop@example.org>"): the Mailer encodes headers itself.
            sender = str(Address(display_name=str(sender[0]), addr_spec=str(sender[1])))
        kwargs["default_from"] = str(sender)
    return kwargs


class Postroom:
    """The extension. One instance may serve several apps (the app factory pattern): each
    call works on the current app's Mailer."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Make this app's Mailer from its config (raises ConfigError on a mistake)."""
        tags = _tags(app.config.get("POSTROOM_TAGS"))
        app.extensions[EXTENSION] = State(Mailer(**mailer_kwargs(app.config)), tags)

    @staticmethod
    def state(app: Flask | None = None) -> State:
        """The state of ``app`` (default: the current app)."""
        target = app if app is not None else current_app
        state = target.extensions.get(EXTENSION)
        if not isinstance(state, State):
            raise ConfigError(f"Postroom is not set up on the Flask app {target.name!r}: call "
                              "Postroom(app) or postroom.init_app(app) when creating it",
                              code="flask.not_initialised")
        return state

    @property
    def mailer(self) -> Mailer:
        """The current app's :class:`postroom.Mailer` (for ``send_raw``, ``deliver_due``...)."""
        return self.state().mailer

    def _with_tags(self, state: State, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = kwargs.pop("tags", None)
        extra = [given] if isinstance(given, str) else list(given or [])
        return {**kwargs, "tags": [*state.tags, *extra]}

    def send(self, **kwargs: Any) -> str:
        """Compose and queue a message with the current app's Mailer; takes what
        :meth:`postroom.Mailer.send` takes and returns the message's id once it is stored.
        Raises MessageError, ConfigError, StoreError or CredentialsError."""
        state = self.state()
        return state.mailer.send(**self._with_tags(state, kwargs))

    async def asend(self, **kwargs: Any) -> str:
        """:meth:`send` for async views."""
        state = self.state()
        return await state.mailer.asend(**self._with_tags(state, kwargs))
