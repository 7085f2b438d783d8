"""Wires one instance together from its settings: database, queue, key, apps, transports."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from postroom.exceptions import ConfigError
from postroom.fsperm import open_to_others, private_dir
from postroom.queue.sql import Queue
from postroom.secrets import SecretStore, load_or_create_key
from postroom.settings import Settings
from postroom.store.db import make_engine, migrate
from postroom.store.direct import sqlite_path

if TYPE_CHECKING:
    # Imported where used: `postroom log`, `show` and `queue list` start faster without
    # the apps, the intake checks and the transports.
    from postroom.apps import Apps
    from postroom.ingress.accept import Intake
    from postroom.oauth.tokens import TokenManager
    from postroom.queue.worker import Worker
    from postroom.store.dbconfig import ConfigStore
    from postroom.transports.base import Transport, TransportContext

log = logging.getLogger(__name__)


def key_file(settings: Settings) -> Path:
    """Where the instance's encryption key is kept (unless POSTROOM_SECRET_KEY gives it)."""
    s = settings
    return s.resolve(s.server.secret_key_file) if s.server.secret_key_file else (
        s.data_dir / "secret.key"
    )


def tls_files(settings: Settings) -> tuple[Path, Path]:
    """The listener's certificate and key: server.tls_cert/tls_key, or the self-signed pair
    made in data_dir/tls (a reload re-reads them: postroom.hup)."""
    s = settings
    if s.server.tls_cert and s.server.tls_key:
        return s.resolve(s.server.tls_cert), s.resolve(s.server.tls_key)
    return s.data_dir / "tls" / "cert.pem", s.data_dir / "tls" / "key.pem"


@dataclass
class Instance:
    # The effective settings: the file's with the connections, routes, policy and retention
    # stored in the database laid over them (postroom.store.dbconfig); postroom.reload
    # replaces them in a running process when the configuration's generation changes.
    settings: Settings
    engine: Engine = field(init=False)
    file_settings: Settings = field(init=False)  # postroom.toml and POSTROOM_* alone
    config_generation: int = field(init=False, default=0)
    # `postroom serve` and `worker`: a database that needs migrating is migrated by a child
    # process, so that alembic is never imported into the one that runs for months.
    migrate_apart: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        # 0700: the folder holds message bodies, the database and the encryption key.
        data_dir = self.settings.data_dir
        try:
            private_dir(data_dir)
        except OSError as err:
            raise ConfigError(
                f"cannot create the data folder {data_dir}: {err.strerror or err}; create it "
                "(mode 700, owned by the user Postroom runs as) or set server.data_dir to a "
                "folder this user may write", code="config.data_dir") from err
        self.engine = make_engine(
            self.settings.database_url, synchronous=self.settings.server.sqlite_synchronous
        )
        migrate(self.engine, apart=self.migrate_apart)
        from postroom.store.dbconfig import load

        self.file_settings = self.settings
        self.settings, self.config_generation = load(self.settings, self.engine)

    @cached_property
    def queue(self) -> Queue:
        return Queue(self.engine, lifetime=self.settings.delivery.max_lifetime)

    @cached_property
    def apps(self) -> Apps:
        from postroom.apps import Apps

        return Apps(self.engine, lambda: load_or_create_key(self.key_file))

    @cached_property
    def intake(self) -> Intake:
        """The checks every door makes before a message is stored (ingress.accept)."""
        from postroom.ingress.accept import Intake

        return Intake.of(self.settings, self.apps)

    @cached_property
    def config(self) -> ConfigStore:
        """Connections, routes and settings made in the web admin (store.dbconfig)."""
        from postroom.store.dbconfig import ConfigStore

        return ConfigStore(self.engine, self.secrets)

    @property
    def key_file(self) -> Path:
        return key_file(self.settings)

    @cached_property
    def secrets(self) -> SecretStore:
        return SecretStore(self.engine, load_or_create_key(self.key_file))

    @property
    def tls_files(self) -> tuple[Path, Path]:
        return tls_files(self.settings)

    def permission_warnings(self) -> list[str]:
        """What of this instance's own files other users can read or change, each with the
        fix. Only warned about, never changed (see postroom.fsperm): a group may share the
        folder on purpose. The key file is not listed: it is refused outright when open to
        others (postroom.secrets), as a leaked key undoes encryption at rest."""
        s = self.settings
        checks = [(s.data_dir, "data folder", "it holds the database, the key and the TLS "
                   "key", "700")]
        db = sqlite_path(s.database_url)
        if db is not None:
            checks += [(Path(f"{db}{suffix}"), "database file", "it holds every message and "
                        "stored credential", "600") for suffix in ("", "-wal", "-shm")]
        checks.append((self.tls_files[1], "TLS private key", "it lets anyone impersonate "
                       "this server", "600"))
        out = []
        for path, what, why, fix in checks:
            mode = open_to_others(path)
            if mode is not None:
                out.append(f"{what} {path} is open to other users (mode {mode:03o}): {why}; "
                           f"run: chmod {fix} {path} (unless a group shares it on purpose)")
        return out

    @cached_property
    def oauth(self) -> TokenManager:
        """OAuth 2.0 tokens of the connections with an ``oauth`` table (postroom.oauth)."""
        from postroom.oauth.tokens import TokenManager

        return TokenManager(self.settings, self.engine, load_or_create_key(self.key_file))

    def transport_context(self) -> TransportContext:
        from postroom.transports.base import TransportContext

        uses_oauth = any(c.oauth is not None for c in self.settings.connections)
        return TransportContext(
            ehlo_name=self.settings.server.hostname, stored_secret=self.secrets.get,
            tokens=self.oauth if uses_oauth else None,
        )

    def transports(self) -> dict[str, Transport]:
        from postroom import transports as registry

        ctx = self.transport_context()
        return {c.name: registry.create(c, ctx) for c in self.settings.connections}

    def worker(self, transports: dict[str, Transport] | None = None, **kw: Any) -> Worker:
        """A delivery worker with this instance's connections, routes and settings."""
        from postroom.policy import for_settings
        from postroom.queue.worker import Worker
        from postroom.suppression import Suppressions

        kw.setdefault("suppressions", Suppressions.of(self.settings, self.engine))
        return Worker(self.queue, self.transports() if transports is None else transports,
                      self.settings.delivery, self.default_connection,
                      routes=self.settings.routes, policies=for_settings(self.settings), **kw)

    @property
    def default_connection(self) -> str | None:
        conns = self.settings.connections
        return conns[0].name if conns else None

    def close(self) -> None:
        self.engine.dispose()
