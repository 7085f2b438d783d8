"""Secrets: encryption at rest (Fernet), secret references (``KEY_env``, ``KEY_file``, stored
encrypted) and redaction of what must never be logged."""

from __future__ import annotations

import base64
import enum
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.exceptions import AuthError, ConfigError
from postroom.fsperm import open_private, private_dir

if TYPE_CHECKING:
    from sqlalchemy import Engine

KEY_ENV = "POSTROOM_SECRET_KEY"


class Secret(enum.StrEnum):
    """A connection's secrets in the SecretStore, by what reads them (:func:`secret_name`)."""

    PASSWORD = "password"  # transports/smtp.py
    TOKEN = "token"  # a hand-stored OAuth access token (transports/smtp.py)
    OAUTH_CLIENT_SECRET = "oauth_client_secret"  # oauth/tokens.py, client_secret_stored
    API_KEY = "api_key"  # HTTPS API providers (transports/_http.py), set-password stores it
    WEBHOOK_KEY = "webhook_key"  # a provider's webhook signing key (postroom.webhooks)


def secret_name(connection: str, what: Secret) -> str:
    return f"connection:{connection}:{what.value}"


def resolve(owner: str, key: str, *, env: str | None, file: Path | None,
            stored: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The one way to read a secret reference: ``{key}_env`` (an environment variable's
    name), else ``{key}_file`` (a file's path), else ``stored`` (given inline or kept
    encrypted, decrypted by the caller). None when none of them is set.

    ``owner`` names who needs it ("connection primary") for the error. A variable that is
    unset or empty, or a file that cannot be read or is empty, is an AuthError
    ``auth.secret_missing`` (transient: the mail waits until it is fixed). Only trailing CR
    and LF are taken off (the newline editors and ``echo`` add): other whitespace may be part
    of a password, and an API key never has any. ``environ``: instead of os.environ."""
    problem = fix = ""
    if env:
        value = (os.environ if environ is None else environ).get(env, "").rstrip("\r\n")
        if value:
            return value
        problem = f"environment variable {env} is not set (it gives {key})"
        fix = "set it for the Postroom process (systemd: Environment= or EnvironmentFile=)"
    elif file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise AuthError(f"{owner}: cannot read {key}_file {file}: {why}; fix the path or "
                            "let the Postroom user read it", code="auth.secret_missing",
                            permanent=False, reply_text=f"cannot read {key}_file {file}: "
                            f"{why}") from err
        if value:
            return value
        problem, fix = f"{key}_file {file} is empty", f"write the {key} into it"
    else:
        return stored
    # reply_text: the problem alone, for callers that word the fix their own way.
    raise AuthError(f"{owner}: {problem}; {fix}", code="auth.secret_missing", permanent=False,
                    reply_text=problem)


def load_or_create_key(path: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The Fernet key: from POSTROOM_SECRET_KEY, else the key file (made 0600 on first run)."""
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        key = env[KEY_ENV].encode()
        _check_key(key, KEY_ENV)
        return key
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"secret key file {path} is readable by others (mode {mode:o}); "
                f"run: chmod 600 {path}",
                code="config.secret_key.mode",
            )
        key = path.read_bytes().strip()
        _check_key(key, str(path))
        return key
    key = base64.urlsafe_b64encode(os.urandom(32))  # the Fernet key format
    # O_EXCL: two processes starting at once must not both write a different key.
    try:
        f = open_private(private_dir(path.parent) / path.name, "xb")
    except FileExistsError:
        return load_or_create_key(path, env)
    except OSError as err:
        raise ConfigError(
            f"cannot create the secret key file {path}: {err.strerror or err}; set "
            f"server.secret_key_file to a path this user may write, or give the key in "
            f"{KEY_ENV}", code="config.secret_key.write") from err
    with f:
        f.write(key + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def _check_key(key: bytes, where: str) -> None:
    # Checked without importing cryptography (~6 MB resident): a server that never
    # decrypts a stored secret should not pay for it.
    try:
        valid = len(base64.urlsafe_b64decode(key)) == 32
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(
            f"{where} does not hold a valid key (32 url-safe base64 bytes); generate one with "
            "`python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'`",
            code="config.secret_key.invalid",
        )


def subkey(key: bytes, purpose: bytes) -> bytes:
    """A key of its own for one purpose (b"postroom app secret v1"), derived from the
    instance key: one use per key, and the encryption key itself never keys a MAC."""
    import hashlib
    import hmac

    return hmac.new(key, purpose, hashlib.sha256).digest()


class LazyKey:
    """The instance key (or a function loading it on first use, so a command that never
    needs it never creates or reads the key file), or with ``purpose`` its subkey."""

    def __init__(self, source: bytes | Callable[[], bytes], purpose: bytes | None = None) -> None:
        self._source = source
        self._purpose = purpose
        self._key: bytes | None = None

    def __call__(self) -> bytes:
        if self._key is None:
            base = self._source() if callable(self._source) else self._source
            self._key = base if self._purpose is None else subkey(base, self._purpose)
        return self._key


class Vault:
    """Encrypts and decrypts small secrets (passwords, tokens) with the instance key."""

    def __init__(self, key: bytes) -> None:
        from cryptography.fernet import Fernet

        self._fernet = Fernet(key)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except InvalidToken as err:
            raise ConfigError(
                "a stored secret cannot be decrypted with this instance's key (was the key "
                "replaced?); set the secret again with `postroom connection set-password`",
                code="config.secret.undecryptable",
            ) from err


_AUTH_LINE = re.compile(rb"^(AUTH\s+\S+)(\s+\S+)?", re.IGNORECASE)


def redact_auth_command(line: bytes) -> bytes:
    """Keep the mechanism of an AUTH command, hide its initial response."""
    return _AUTH_LINE.sub(lambda m: m.group(1) + (b" ********" if m.group(2) else b""), line)


class SecretStore:
    """Named secrets kept encrypted in the database (connection passwords, tokens)."""

    def __init__(self, engine: Engine, key: bytes) -> None:
        self.engine = engine
        self._key = key
        self._vault: Vault | None = None

    @property
    def vault(self) -> Vault:
        if self._vault is None:
            self._vault = Vault(self._key)
        return self._vault

    # SQLAlchemy is imported when a secret is read or written, not with this module: the
    # transports import redact_auth_command, and validating a configuration imports them
    # (postroom-sendmail, which starts once per message, never touches the database's engine).
    def set(self, name: str, value: str) -> None:
        from sqlalchemy import delete, insert

        from postroom.store.db import write_transaction
        from postroom.store.schema import secrets as table

        with write_transaction(self.engine) as conn:
            conn.execute(delete(table).where(table.c.name == name))
            conn.execute(
                insert(table).values(
                    name=name, ciphertext=self.vault.encrypt(value), updated_at=time.time()
                )
            )

    def get(self, name: str) -> str | None:
        from sqlalchemy import select

        from postroom.store.schema import secrets as table

        with self.engine.connect() as conn:
            token = conn.execute(select(table.c.ciphertext).where(table.c.name == name)).scalar()
        return None if token is None else self.vault.decrypt(token)
