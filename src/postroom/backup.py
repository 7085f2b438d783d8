"""`postroom backup` and `postroom restore`: the whole instance in one encrypted file.

The archive is a tar stream — ``manifest.json``, ``postroom.db`` (a consistent online copy,
postroom.store.snapshot), ``secret.key`` (the instance key: without it the stored
passwords, OAuth grants and DKIM keys in the database are lost) and ``postroom.toml`` when
the instance has one — sealed under a passphrase as it is written (postroom.passcrypt), so
no unencrypted archive ever touches the disk. The file appears complete or not at all
(written beside its final name, 0600, fsync'ed, renamed).

A restore decrypts and checks everything in a staging folder inside the data folder first
(a wrong passphrase stops it before a byte is written); only then, holding the database
for itself (postroom.store.inuse: refused while any Postroom process has it open), does it
set the current database and a different key aside and move the restored ones in. A backup
from an older Postroom is migrated at the next start, like any database.

PostgreSQL has its own tools: for it both commands say exactly what to run and do nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from postroom import __version__
from postroom.exceptions import ConfigError, StoreError
from postroom.fsperm import open_private, private_dir
from postroom.passcrypt import CHUNK, SealedReader, SealedWriter, check_passphrase
from postroom.settings import Settings
from postroom.store import inuse, snapshot, upgrade

FORMAT = "postroom-backup"
VERSION = 1
MANIFEST, DATABASE, KEY, CONFIG = "manifest.json", "postroom.db", "secret.key", "postroom.toml"
FROM_BACKUP = "postroom.toml.from-backup"  # where restore puts the backup's configuration
_MEMBERS = (MANIFEST, DATABASE, KEY, CONFIG)


@dataclass
class BackupReport:
    path: Path
    size: int
    revision: str | None
    messages: int
    key: str  # where the key came from: "file", "environment" or "none"
    config: Path | None


@dataclass
class RestoreReport:
    database: Path
    revision: str | None
    messages: int
    created_at: float
    key_file: Path | None
    config: Path | None  # the backup's postroom.toml, written beside the data
    set_aside: list[Path] = field(default_factory=list)  # what was there before
    warnings: list[str] = field(default_factory=list)


# -- where things are ------------------------------------------------------------------------
def _key_file(settings: Settings) -> Path:
    from postroom.runtime import key_file

    return key_file(settings)


def sqlite_file(settings: Settings, command: str) -> Path:
    """The database file, or a :class:`ConfigError` saying what to run instead (PostgreSQL,
    an in-memory database)."""
    from sqlalchemy.engine import make_url

    url = settings.database_url
    try:
        parsed = make_url(url)
    except Exception as err:  # SQLAlchemy's ArgumentError, ValueError...
        raise ConfigError(f"server.database = {url!r} is not a database URL: {err}",
                          code="config.database") from err
    if parsed.get_backend_name() in ("postgresql", "postgres"):
        raise ConfigError(_postgres_steps(settings, parsed, command), code=f"{command}.postgresql")
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"server.database = {url!r}: `postroom {command}` works on an "
                          "SQLite database file or tells what to run for PostgreSQL",
                          code="config.database")
    return Path(str(parsed.database)).resolve()


def _postgres_steps(settings: Settings, parsed: Any, command: str) -> str:
    from sqlalchemy.engine import URL

    # Without the password: pg_dump reads it from PGPASSWORD or ~/.pgpass, not from `ps`.
    target = shlex.quote(URL.create("postgresql", username=parsed.username, host=parsed.host,
                                    port=parsed.port, database=parsed.database,
                                    query=parsed.query).render_as_string())
    key = _key_file(settings)
    key_line = ("the instance key is in the environment (POSTROOM_SECRET_KEY): keep a copy "
                "of its value with the dump" if os.environ.get("POSTROOM_SECRET_KEY")
                else f"copy the instance key {key} with it (mode 0600), kept apart or "
                "encrypted: without it the stored secrets are lost")
    if command == "backup":
        return ("the database is PostgreSQL: back it up with its own tool, nothing was "
                f"written. Run: pg_dump --format=custom --file=postroom.pgdump {target} "
                "(the password from PGPASSWORD or ~/.pgpass), and " + key_line)
    return ("the database is PostgreSQL: restore it with its own tool, nothing was "
            "changed. Stop Postroom everywhere, then run: pg_restore --clean --if-exists "
            f"--no-owner --dbname={target} postroom.pgdump (the password from PGPASSWORD or "
            f"~/.pgpass), and put the instance key back at {key} (mode 0600) or in "
            "POSTROOM_SECRET_KEY")


def _instance_key(settings: Settings) -> tuple[bytes | None, str]:
    """The key and where it came from; none when there is none yet (no secret stored)."""
    from postroom.secrets import KEY_ENV, load_or_create_key

    path = _key_file(settings)
    if os.environ.get(KEY_ENV):
        return load_or_create_key(path), "environment"
    if path.exists():
        return load_or_create_key(path), "file"
    return None, "none"


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count(database: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.Error:  # no such table: an empty or foreign database
            return 0


# -- backup ----------------------------------------------------------------------------------
def backup(settings: Settings, out: Path, passphrase: str) -> BackupReport:
    """Write the encrypted archive of this instance to ``out`` (replacing it whole)."""
    check_passphrase(passphrase)
    database = sqlite_file(settings, "backup")
    key, key_from = _instance_key(settings)
    out = out.absolute()
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: the folder {out.parent} does not exist",
                          code="backup.write")
    # The plain copy of the database waits in a 0700 folder beside the archive (the same
    # file system, so the rename is atomic; /tmp may be small), removed whatever happens.
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise ConfigError(f"cannot write in {out.parent}: {err.strerror or err}",
                          code="backup.write") from err
    try:
        copy = stage / DATABASE
        revision = snapshot.copy_sqlite(database, copy)
        messages = _count(copy, "messages")
        manifest = {"format": FORMAT, "version": VERSION, "created_at": time.time(),
                    "postroom": __version__, "revision": revision, "database": str(database),
                    "messages": messages, "key": key_from}
        partial = stage / "archive"
        with open_private(partial, "xb") as raw:
            _write_archive(raw, passphrase, manifest, copy, key, settings.config_path)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, out)
        _sync_dir(out.parent)
    except OSError as err:
        raise StoreError(f"cannot write the backup {out}: {err.strerror or err}",
                         code="backup.write") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return BackupReport(out, out.stat().st_size, revision, messages, key_from,
                        settings.config_path)


def _write_archive(raw: IO[bytes], passphrase: str, manifest: dict[str, Any], copy: Path,
                   key: bytes | None, config: Path | None) -> None:
    sealed = SealedWriter(raw, passphrase, FORMAT)
    with tarfile.open(fileobj=sealed, mode="w|") as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=2).encode())
        with copy.open("rb") as db:
            _add(tar, DATABASE, db, size=copy.stat().st_size)
        if key is not None:
            _add(tar, KEY, key + b"\n")
        if config is not None:
            _add(tar, CONFIG, config.read_bytes())
    sealed.close()


def _add(tar: tarfile.TarFile, name: str, data: bytes | IO[bytes],
         size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o600, int(time.time())
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.size = size or 0
        tar.addfile(info, data)


# -- restore ---------------------------------------------------------------------------------
def restore(settings: Settings, archive: Path, passphrase: str, *,
            force: bool = False) -> RestoreReport:
    """Restore ``archive`` into the instance ``settings`` describes (see the module)."""
    database = sqlite_file(settings, "restore")
    try:
        src = archive.open("rb")
    except OSError as err:
        raise ConfigError(f"cannot read {archive}: {err.strerror or err}",
                          code="restore.read") from err
    with src:
        # A wrong passphrase fails here, on the first chunk, before anything is written.
        reader = SealedReader(src, passphrase, FORMAT, what=str(archive))
        try:
            private_dir(database.parent)
        except OSError as err:
            raise ConfigError(f"cannot create the data folder {database.parent}: "
                              f"{err.strerror or err}", code="config.data_dir") from err
        with inuse.exclusive(database), _staging(database.parent) as stage:
            manifest = _extract(reader, stage, archive)
            return _put_in_place(settings, database, stage, manifest, force)


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=".restore-", dir=folder))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _damaged(archive: Path, why: str) -> ConfigError:
    return ConfigError(f"{archive} is damaged or not a Postroom backup ({why}): nothing was "
                       "restored", code="restore.damaged")


def _extract(reader: SealedReader, stage: Path, archive: Path) -> dict[str, Any]:
    """Every member into ``stage`` (known names and plain files only); the manifest."""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if member.name not in _MEMBERS or not member.isreg() or member.name in seen:
                    raise _damaged(archive, f"unexpected member {member.name!r}")
                seen.add(member.name)
                data = tar.extractfile(member)
                if data is None:
                    raise _damaged(archive, f"unreadable member {member.name!r}")
                with open_private(stage / member.name, "xb") as out:
                    shutil.copyfileobj(data, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
    except (tarfile.TarError, EOFError) as err:
        raise _damaged(archive, str(err)) from err
    if MANIFEST not in seen or DATABASE not in seen:
        raise _damaged(archive, "no manifest or no database in it")
    try:
        manifest: dict[str, Any] = json.loads((stage / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(archive, "its manifest is not JSON") from err
    if manifest.get("format") != FORMAT:
        raise _damaged(archive, "its manifest names another format")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{archive} is a backup of format version {manifest.get('version')!r}"
                          f"; this Postroom reads version {VERSION}: restore it with the "
                          "Postroom that made it, or a newer one", code="restore.version")
    return manifest


def _has_data(database: Path) -> int:
    """How many rows the database holds outside the schema bookkeeping (0: none, or none
    there): the messages, apps, accounts, stored settings... of someone's instance."""
    if not database.is_file() or database.stat().st_size == 0:
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                "'sqlite_%' AND name != 'alembic_version'")]
            return sum(conn.execute(f'SELECT count(*) FROM (SELECT 1 FROM "{t}" LIMIT 1)')
                       .fetchone()[0] for t in tables)
    except sqlite3.Error:
        return 1  # unreadable as a database: not ours to throw away without --force


def _put_in_place(settings: Settings, database: Path, stage: Path, manifest: dict[str, Any],
                  force: bool) -> RestoreReport:
    restored = stage / DATABASE
    revision = snapshot.check(restored)
    if revision is not None and revision not in upgrade.known_revisions():
        raise ConfigError(f"this backup's database has schema revision {revision}, newer than "
                          "this Postroom knows: install the Postroom that made it "
                          f"({manifest.get('postroom')}) or a newer one, then restore",
                          code="restore.newer")
    if _has_data(database) and not force:
        raise ConfigError(f"{database} holds data: nothing was restored. Give --force to "
                          "replace it (it is kept beside it, renamed "
                          f"{database.name}.replaced-<time>)", code="restore.not_empty")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report = RestoreReport(database, revision, int(manifest.get("messages") or 0),
                           float(manifest.get("created_at") or 0), None, None)
    # The -wal and -shm go with their database: a -wal left behind would be replayed
    # into the restored file.
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{database}{suffix}")
        if old.exists():
            aside = Path(f"{database}.replaced-{stamp}{suffix}")
            os.replace(old, aside)
            if not suffix:
                report.set_aside.append(aside)
    os.replace(restored, database)
    _sync_dir(database.parent)
    if (stage / KEY).exists():
        report.key_file = _put_key(settings, (stage / KEY).read_bytes(), stamp, report)
    if (stage / CONFIG).exists():
        report.config = database.parent / FROM_BACKUP
        os.replace(stage / CONFIG, report.config)
    return report


def _put_key(settings: Settings, key: bytes, stamp: str, report: RestoreReport) -> Path:
    from postroom.secrets import KEY_ENV

    path = _key_file(settings)
    private_dir(path.parent)
    if path.exists() and path.read_bytes().strip() != key.strip():
        aside = path.with_name(f"{path.name}.replaced-{stamp}")
        os.replace(path, aside)
        report.set_aside.append(aside)
    partial = path.with_name(f".{path.name}.restoring")
    with open_private(partial, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    _sync_dir(path.parent)
    env = os.environ.get(KEY_ENV, "").strip()
    if env and env.encode() != key.strip():
        report.warnings.append(f"{KEY_ENV} is set and differs from the backup's key, which "
                               f"is now in {path}: the variable wins, and the restored "
                               f"secrets cannot be read with it. Set {KEY_ENV} to the key in "
                               f"{path}, or unset it")
    return path
