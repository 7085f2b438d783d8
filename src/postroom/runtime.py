"""Wires one instance together from its settings: database, queue, key, apps, transports."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from postroom import transports as registry
from postroom.apps import Apps
from postroom.queue.sql import Queue
from postroom.secrets import SecretStore, load_or_create_key
from postroom.settings import Settings
from postroom.store.db import make_engine, migrate
from postroom.transports.base import Transport, TransportContext

if TYPE_CHECKING:
    from postroom.oauth.tokens import TokenManager
    from postroom.queue.worker import Worker

log = logging.getLogger(__name__)


def key_file(settings: Settings) -> Path:
    """Where the instance's encryption key is kept (unless POSTROOM_SECRET_KEY gives it)."""
    s = settings
    return s.resolve(s.server.secret_key_file) if s.server.secret_key_file else (
        s.data_dir / "secret.key"
    )


@dataclass
class Instance:
    settings: Settings
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        # 0700: the folder holds message bodies, the database and the encryption key.
        self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.engine = make_engine(
            self.settings.database_url, synchronous=self.settings.server.sqlite_synchronous
        )
        migrate(self.engine)

    @cached_property
    def queue(self) -> Queue:
        return Queue(self.engine, lifetime=self.settings.delivery.max_lifetime)

    @cached_property
    def apps(self) -> Apps:
        return Apps(self.engine)

    @property
    def key_file(self) -> Path:
        return key_file(self.settings)

    @cached_property
    def secrets(self) -> SecretStore:
        return SecretStore(self.engine, load_or_create_key(self.key_file))

    @property
    def tls_files(self) -> tuple[Path, Path]:
        s = self.settings
        if s.server.tls_cert and s.server.tls_key:
            return s.resolve(s.server.tls_cert), s.resolve(s.server.tls_key)
        return s.data_dir / "tls" / "cert.pem", s.data_dir / "tls" / "key.pem"

    @cached_property
    def oauth(self) -> TokenManager:
        """OAuth 2.0 tokens of the connections with an ``oauth`` table (postroom.oauth)."""
        from postroom.oauth.tokens import TokenManager

        return TokenManager(self.settings, self.engine, load_or_create_key(self.key_file))

    def transport_context(self) -> TransportContext:
        uses_oauth = any(c.oauth is not None for c in self.settings.connections)
        return TransportContext(
            ehlo_name=self.settings.server.hostname, stored_secret=self.secrets.get,
            tokens=self.oauth if uses_oauth else None,
        )

    def transports(self) -> dict[str, Transport]:
        ctx = self.transport_context()
        return {c.name: registry.create(c, ctx) for c in self.settings.connections}

    def worker(self, transports: dict[str, Transport] | None = None, **kw: Any) -> Worker:
        """A delivery worker with this instance's connections, routes and settings."""
        from postroom.policy import for_settings
        from postroom.queue.worker import Worker

        return Worker(self.queue, self.transports() if transports is None else transports,
                      self.settings.delivery, self.default_connection,
                      routes=self.settings.routes, policies=for_settings(self.settings), **kw)

    @property
    def default_connection(self) -> str | None:
        conns = self.settings.connections
        return conns[0].name if conns else None

    def close(self) -> None:
        self.engine.dispose()
