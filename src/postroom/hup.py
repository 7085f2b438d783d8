"""Reload postroom.toml in a running `serve` or `worker` without losing mail: SIGHUP, or
`postroom reload`, which signals the server named by its pid file and reads its answer.

On SIGHUP the file (and the process's environment) is read again into new settings:

- a file that does not validate is refused: the running configuration stays, the error
  (with the file and line, postroom.settings) is logged once and written as the answer;
- a key only read at start (listen addresses, data_dir, database, [delivery], [http]...:
  postroom.config_view.needs_restart) keeps its running value and is reported as "needs a
  restart"; the rest is applied through postroom.reload's one swap (LiveConfig.adopt):
  connections, routes, policy, retention, alerts, the listener's rules;
- the listener's certificate and key are read again (a renewed certificate at the same path
  is the common case) and loaded into its SSLContext: a new session gets them, a session in
  flight keeps the certificate it was made with (OpenSSL copies it into each connection).
  The HTTPS listener ([http] tls) reads its own pair again the same way (its paths, like
  the rest of [http], change only with a restart). A pair that does not load refuses the
  whole reload.

`serve` holds ``serve.pid`` in its data folder under an exclusive flock for its life, so a
pid file left by a crashed server is told apart from a running one, and writes each reload's
answer to ``reload-result.json`` with a sequence number the command waits for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from postroom import config_view
from postroom.exceptions import ConfigError, PostroomError
from postroom.runtime import tls_files
from postroom.settings import Settings, load

if TYPE_CHECKING:
    from postroom.ingress.accept import Intake
    from postroom.ingress.smtpd import Policy
    from postroom.reload import LiveConfig
    from postroom.runtime import Instance

log = logging.getLogger(__name__)
PIDFILE = "serve.pid"
RESULT = "reload-result.json"


# -- the pid file -----------------------------------------------------------------------------
def hold_pidfile(data_dir: Path) -> IO[str] | None:
    """Write this process's pid to data_dir/serve.pid and hold it locked until the process
    ends (the returned file stays open); None when another live server holds it."""
    path = data_dir / PIDFILE
    # not truncated before the lock is ours: it may hold the pid of a running server
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "r+",
                       encoding="ascii")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        log.warning("another postroom serve holds %s: `postroom reload` signals that one", path)
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def running_pid(data_dir: Path) -> int | None:
    """The pid of the `serve` running on ``data_dir``, or None (no pid file, or a stale one
    nobody holds: a server that crashed). OSError (PermissionError) when it cannot be read:
    the caller says to run as the server's user."""
    try:
        with (data_dir / PIDFILE).open(encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: the server is up
                text = handle.read().strip()
                return int(text) if text.isdigit() else None
            return None
    except FileNotFoundError:
        return None


class Renewable(Protocol):
    """A listener whose certificate files are read again on a reload
    (postroom.ingress.http_server.Listener)."""

    def check_tls_files(self) -> None: ...

    def reload_tls(self) -> None: ...


# -- the answer -------------------------------------------------------------------------------
@dataclass
class Result:
    seq: int
    ok: bool
    changed: list[str] = field(default_factory=list)  # keys applied
    restart: list[str] = field(default_factory=list)  # keys changed that need a restart
    error: str = ""
    pid: int = 0
    at: float = 0.0


def read_result(data_dir: Path) -> Result | None:
    try:
        doc = json.loads((data_dir / RESULT).read_text(encoding="utf-8"))
        return Result(**doc)
    except (OSError, ValueError, TypeError):
        return None


def _write_result(data_dir: Path, result: Result) -> None:
    from postroom.fsperm import open_private

    path = data_dir / RESULT
    tmp = path.with_name(path.name + ".tmp")
    with open_private(tmp, "w", encoding="utf-8") as out:
        json.dump(dataclasses.asdict(result), out)
    tmp.replace(path)


def _notify(what: str) -> None:
    """Tell systemd (Type=notify) a reload starts ("reloading") or ended ("ready")."""
    from postroom.system import notify

    if what == "reloading":
        notify.reloading()
    else:
        notify.ready("configuration reloaded")


# -- the reload -------------------------------------------------------------------------------
def _kept(old: Settings, new: Settings) -> Settings:
    """``new`` with what a running server only reads at start taken from ``old``."""
    server = old.server.model_copy(update={
        f: getattr(new.server, f) for f in config_view.LIVE_SERVER
        if getattr(new.server, f) != getattr(old.server, f)})
    old_features = dict(old.features)
    features = [(n, m) for n, m in new.features if n in config_view.LIVE_FEATURES]
    features += [(n, old_features[n]) for n in old_features
                 if n not in config_view.LIVE_FEATURES]
    replaced: dict[str, Any] = {name: getattr(old, name) for name in ("delivery", "http", "log")}
    return dataclasses.replace(new, server=server, features=tuple(features), **replaced)


class FileReload:
    """The SIGHUP side: re-reads the file and swaps it in (see the module doc)."""

    def __init__(self, inst: Instance, live: LiveConfig, *, tls: ssl.SSLContext | None = None,
                 https: Renewable | None = None, policy: Policy | None = None,
                 record: bool = False) -> None:
        self.inst = inst
        self.live = live
        self.tls = tls  # the listener's context, shared by its sessions
        self.https = https  # the HTTP listener (ingress.http_server), re-reads its own files
        self.policy = policy  # the listener's rules (smtpd.Policy)
        self.record = record  # `serve`: write the answer and the snapshot to the data folder
        self.text = self._read_text(inst.file_settings)
        self.seq = (read_result(inst.settings.data_dir) or Result(0, True)).seq if record else 0
        if record:
            live.listeners.append(lambda _old, _new: self.snapshot())

    @staticmethod
    def _read_text(settings: Settings) -> str:
        if settings.config_path is None:
            return ""
        try:
            return settings.config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""

    def snapshot(self) -> None:
        """Write the effective, masked settings for `postroom config check`."""
        if not self.record:
            return
        try:
            found = config_view.items(self.inst.settings, text=self.text, stored={
                "policy": self.inst.config.policy(), "retention": self.inst.config.retention()})
            config_view.write_snapshot(self.inst.settings.data_dir, found, pid=os.getpid())
        except (OSError, PostroomError, SQLAlchemyError) as err:
            log.warning("could not write %s: %s", config_view.SNAPSHOT, err)

    async def watch(self, signalled: asyncio.Event) -> None:
        """Reload each time ``signalled`` is set (signals arriving meanwhile: one more)."""
        while True:
            await signalled.wait()
            signalled.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reloading the configuration crashed; keeping the current one")

    async def reload(self) -> Result:
        _notify("reloading")
        self.seq += 1
        try:
            result = await self._reload()
        except (PostroomError, SQLAlchemyError, ssl.SSLError, OSError) as err:
            # SQLAlchemyError: the database's entries could not be read to lay over the file
            message = err.message if isinstance(err, PostroomError) else str(err)
            log.error("configuration reload refused, the running one is kept: %s", message)
            result = Result(self.seq, False, error=message)
        result.pid, result.at = os.getpid(), time.time()
        if self.record:
            try:
                _write_result(self.inst.settings.data_dir, result)
            except OSError as err:
                log.warning("could not write %s: %s", RESULT, err)
        _notify("ready")
        return result

    async def _reload(self) -> Result:
        old = self.inst.file_settings
        path = old.config_path
        if path is None:
            raise ConfigError("this server started without a configuration file: there is "
                              "nothing to read again", code="config.reload")
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        new = await asyncio.to_thread(load, path)
        before = config_view.values(config_view.items(old, text=self.text))
        after = config_view.values(config_view.items(new, text=text))
        changed = [key for key, _, _ in config_view.changes(before, after)]
        restart = [k for k in changed if config_view.needs_restart(k)]
        kept = _kept(old, new)
        await asyncio.to_thread(self._check_tls, kept)
        if self.https is not None:
            await asyncio.to_thread(self.https.check_tls_files)
        previous, self.text = self.text, text  # the snapshot adopt() writes reads it
        try:
            await self.live.adopt(kept)
        except BaseException:
            self.text = previous
            raise
        if self.tls is not None:
            self.tls.load_cert_chain(*(str(p) for p in tls_files(kept)))
        if self.https is not None:
            self.https.reload_tls()
        self._listener_rules(kept)
        applied = config_view.summary([k for k in changed if k not in restart], before, after)
        log.info("configuration reloaded from %s: %s%s", path,
                 f"changed {', '.join(applied)}" if applied else "nothing to apply",
                 f"; needs a restart: {', '.join(restart)}" if restart else "")
        return Result(self.seq, True, changed=applied, restart=restart)

    def _check_tls(self, settings: Settings) -> None:
        """Load the certificate and key ``settings`` name into a fresh context first, or
        refuse the reload: the live context is changed only with a pair that loads."""
        if self.tls is None:
            return
        from postroom.ingress.smtpd import tls_context

        cert, key = tls_files(settings)
        try:
            tls_context(str(cert), str(key))
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"server.tls_cert/tls_key: cannot load {cert} with {key} "
                              f"({err}); fix the pair (PEM, the key matching the "
                              "certificate)", code="config.tls") from err

    def _listener_rules(self, settings: Settings) -> None:
        """The SMTP rules a session reads at each command, changed in place (sessions hold
        the same Policy object); the per-address session counts stay as they are."""
        intake: Intake = self.inst.intake
        intake.server = settings.server
        if self.policy is None:
            return
        from postroom.ingress.guard import Networks

        s = settings.server
        self.policy.trusted = Networks(s.trusted_networks)
        self.policy.trusted_without_auth = s.trusted_without_auth
        self.policy.max_recipients = s.max_recipients
        self.policy.max_size = s.max_message_size
        self.policy.max_auth_failures = s.max_auth_failures
        self.policy.auth_deadline = s.smtp_auth_deadline
