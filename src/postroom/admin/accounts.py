"""Admin accounts: argon2id passwords, roles, an optional TOTP second factor, lockout.

Passwords are chosen by people, so they get a slow, memory-hard hash (argon2id, RFC 9106;
re-hashed at the next login when the parameters change). That cost is paid for every
attempt, good or bad, so at most ``HASH_SLOTS`` hashes run at once in a process: an
unauthenticated flood waits in line instead of spending the machine's memory. A name that
does not exist costs the same as one that does (a hash is verified either way), so timing
does not tell which names exist.

Failed logins are counted per account in the database, so every node sees them: after
``[admin] login_failures`` in a row the account is locked for ``lockout`` seconds; a success
resets the count. Throttling per client address is the web layer's (ingress.guard).

A TOTP code (RFC 6238: 30 s steps, 6 digits, one step of drift either way) is accepted once:
the step it matched is stored, and a code of that step or an earlier one is refused.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from postroom.admin.config import AdminSettings
from postroom.audit import Action, Actor, ActorKind, Role, record
from postroom.exceptions import CredentialsError, MessageError
from postroom.secrets import LazyKey, Vault
from postroom.store.db import write_transaction
from postroom.store.schema import admin_accounts as table
from postroom.store.schema import admin_sessions, admin_tokens

if TYPE_CHECKING:
    from argon2 import PasswordHasher

NAME_RULE = "1-64 characters: lower-case letters, digits, '.', '_', '-', '@'"
MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 takes any length; a bound keeps a login request's cost known
HASH_SLOTS = 2  # argon2 hashes at once per process (64 MiB each with the default parameters)
TOTP_STEP = 30
TOTP_ISSUER = "Postroom"
# Passwords seen first in every breach list: refused even when long enough, and so is any
# password that is one of these words plus digits and punctuation ("Password2024!").
COMMON_WORDS = frozenset({
    "password", "passw0rd", "qwerty", "qwertyuiop", "azerty", "letmein", "welcome", "admin",
    "administrator", "iloveyou", "monkey", "dragon", "football", "baseball", "sunshine",
    "princess", "master", "shadow", "superman", "trustno", "changeme", "secret", "postroom",
    "abc", "abcdef", "abcdefgh", "qwe", "asdf", "asdfgh", "zxcvbnm", "login", "root", "test",
    "default", "motdepasse", "passwort", "contrasena", "",
})


class LoginRefused(CredentialsError):
    """A login was refused. ``reason``: "bad" (name or password), "locked" (too many
    failures: try again later), "totp_needed" (the password was right: ask for a code),
    "totp_bad" (the code was wrong or already used)."""

    code = "admin.login"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=f"admin.login.{reason}")
        self.reason = reason


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    created_at: float
    last_login_at: float | None
    totp: bool
    locked_until: float | None = None


def check_name(name: str) -> str:
    """The account name as stored (lower case); MessageError if it is not a valid one."""
    norm = name.strip().lower()
    if not (1 <= len(norm) <= 64 and norm.isascii()
            and all(c.isalnum() or c in "._-@" for c in norm)):
        raise MessageError(f"invalid account name {name!r}: {NAME_RULE}", code="admin.name")
    return norm


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise MessageError(f"unknown role {role!r}: use {' or '.join(r.value for r in Role)}",
                           code="admin.role") from None


def check_password_rules(password: str, *, name: str | None = None) -> None:
    """MessageError saying what is wrong unless ``password`` is acceptable for an account."""
    def refuse(why: str) -> None:
        raise MessageError(f"password refused: {why}; choose a longer, less guessable one, "
                           "or let Postroom generate one (--generate)", code="admin.password")

    if len(password) < MIN_PASSWORD:
        refuse(f"it has {len(password)} characters, at least {MIN_PASSWORD} are needed")
    if len(password) > MAX_PASSWORD:
        refuse(f"it is longer than {MAX_PASSWORD} characters")
    lower = password.lower()
    if name and len(name) >= 3 and name.lower() in lower:
        refuse("it contains the account name")
    if lower.strip(string.digits + string.punctuation + " ") in COMMON_WORDS:
        refuse("it is a common password")
    if len(set(lower)) < 5:
        refuse("it repeats too few different characters")


def generate_password() -> str:
    """20 letters and digits (119 bits): nothing a shell or a form would mangle."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def _hasher() -> PasswordHasher:
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id, RFC 9106's second recommended parameter set


class Accounts:
    def __init__(self, engine: Engine, vault_key: bytes | Callable[[], bytes], *,
                 settings: AdminSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``vault_key``: the instance key (or a function loading it), which encrypts TOTP
        secrets; ``settings``: the [admin] section (its lockout rules)."""
        self.engine = engine
        self.settings = settings or AdminSettings.model_construct()
        self.clock = clock
        self._key = LazyKey(vault_key)
        self._vault: Vault | None = None
        self._ph = _hasher()
        self._slots = threading.BoundedSemaphore(HASH_SLOTS)
        self._dummy: str | None = None

    @property
    def vault(self) -> Vault:
        if self._vault is None:
            self._vault = Vault(self._key())
        return self._vault

    # -- hashing ---------------------------------------------------------------------------
    def _hash(self, password: str) -> str:
        with self._slots:
            return self._ph.hash(password)

    def _verify_dummy(self, password: str) -> None:
        """Verify against a throw-away hash: an unknown or locked name costs as much as a
        real check (made on first use: most commands never need it)."""
        if self._dummy is None:
            self._dummy = self._hash(secrets.token_urlsafe(16))
        self._verify(self._dummy, password)

    def _verify(self, stored: str, password: str) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError

        with self._slots:
            try:
                return bool(self._ph.verify(stored, password))
            except (VerificationError, InvalidHashError):
                return False

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def _account(row: Any) -> Account:
        return Account(name=row.name, role=Role(row.role), created_at=row.created_at,
                       last_login_at=row.last_login_at, totp=row.totp_secret is not None,
                       locked_until=row.locked_until)

    def list(self) -> list[Account]:
        with self.engine.connect() as conn:
            return [self._account(r) for r in conn.execute(select(table).order_by(table.c.name))]

    def get(self, name: str) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.name == name.strip().lower())).first()
        return None if row is None else self._account(row)

    def any(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(table.c.name).limit(1)).first() is not None

    def _require(self, conn: Connection, name: str) -> Any:
        row = conn.execute(select(table).where(table.c.name == name)
                           .with_for_update()).first()
        if row is None:
            raise MessageError(f"no admin account named {name!r}; see `postroom admin list`",
                               code="admin.unknown")
        return row

    # -- administration --------------------------------------------------------------------
    def add(self, name: str, password: str, role: Role, *, actor: Actor) -> Account:
        name, role = check_name(name), check_role(role)
        check_password_rules(password, name=name)
        digest, now = self._hash(password), self.clock()
        try:
            with write_transaction(self.engine) as conn:
                self.insert(conn, name, digest, role, now)
                record(conn, actor, Action.ACCOUNT_ADD, f"account:{name}", {"role": role.value})
        except IntegrityError as err:
            raise MessageError(f"an admin account named {name!r} exists; pick another name or "
                               f"change its password with `postroom admin passwd {name}`",
                               code="admin.exists") from err
        return Account(name=name, role=role, created_at=now, last_login_at=None, totp=False)

    @staticmethod
    def insert(conn: Connection, name: str, digest: str, role: Role, now: float) -> None:
        """Insert an account row in the caller's transaction (the setup link's path)."""
        conn.execute(insert(table).values(
            name=name, password_hash=digest, role=role.value, created_at=now,
            password_changed_at=now, failed_logins=0))

    def hash_password(self, password: str, *, name: str) -> str:
        """Check ``password`` against the rules and hash it (for :meth:`insert`)."""
        check_password_rules(password, name=name)
        return self._hash(password)

    def _admins_left(self, conn: Connection, without: str) -> int:
        # FOR UPDATE: two removals (or demotions) of the last two admins at once must not
        # both see the other one still there (PostgreSQL; SQLite writers are serialised).
        rows = conn.execute(select(table.c.name).where(table.c.role == Role.ADMIN.value)
                            .with_for_update()).all()
        return sum(1 for r in rows if r.name != without)

    def remove(self, name: str, *, actor: Actor) -> bool:
        """Remove an account, its sessions and its API tokens; never the last admin."""
        name = name.strip().lower()
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(table).where(table.c.name == name)).first()
            if row is None:
                return False
            if row.role == Role.ADMIN.value and not self._admins_left(conn, name):
                raise MessageError(
                    f"{name!r} is the last admin account: add another admin first "
                    "(`postroom admin add NAME`), then remove this one", code="admin.last")
            conn.execute(delete(admin_sessions).where(admin_sessions.c.account == name))
            conn.execute(delete(admin_tokens).where(admin_tokens.c.account == name))
            conn.execute(delete(table).where(table.c.name == name))
            record(conn, actor, Action.ACCOUNT_REMOVE, f"account:{name}", {"role": row.role})
        return True

    def set_password(self, name: str, password: str, *, actor: Actor) -> None:
        """A new password; every session of the account ends, and a lockout is lifted."""
        name = name.strip().lower()
        check_password_rules(password, name=name)
        digest = self._hash(password)
        with write_transaction(self.engine) as conn:
            self._require(conn, name)
            conn.execute(update(table).where(table.c.name == name).values(
                password_hash=digest, password_changed_at=self.clock(), failed_logins=0,
                locked_until=None))
            conn.execute(delete(admin_sessions).where(admin_sessions.c.account == name))
            record(conn, actor, Action.ACCOUNT_PASSWORD, f"account:{name}")

    def set_role(self, name: str, role: Role, *, actor: Actor) -> None:
        """Sessions and tokens take the account's role at each request: this applies now."""
        name, role = name.strip().lower(), check_role(role)
        with write_transaction(self.engine) as conn:
            row = self._require(conn, name)
            if row.role == role.value:
                return
            if row.role == Role.ADMIN.value and not self._admins_left(conn, name):
                raise MessageError(f"{name!r} is the last admin account: make another account "
                                   "admin first", code="admin.last")
            conn.execute(update(table).where(table.c.name == name).values(role=role.value))
            record(conn, actor, Action.ACCOUNT_ROLE, f"account:{name}",
                   {"before": {"role": row.role}, "after": {"role": role.value}})

    # -- logging in ------------------------------------------------------------------------
    def check(self, name: str, password: str, totp: str | None, ip: str) -> Account:
        """The account these credentials log into, or LoginRefused."""
        now = self.clock()
        norm = name.strip().lower()
        if len(norm) > 64 or len(password) > MAX_PASSWORD:
            raise LoginRefused("bad", "wrong account name or password")
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.name == norm)).first()
        if row is None:
            self._verify_dummy(password)
            raise LoginRefused("bad", "wrong account name or password")
        if row.locked_until is not None and row.locked_until > now:
            self._verify_dummy(password)
            raise LoginRefused("locked", "too many failed logins: this account is locked for "
                               f"{int(row.locked_until - now) + 1} more seconds")
        actor = Actor(kind=ActorKind.ADMIN.value, name=norm, role=Role(row.role), ip=ip)
        if not self._verify(row.password_hash, password):
            self._failed(norm, actor, "password")
            raise LoginRefused("bad", "wrong account name or password")
        step = None
        if row.totp_secret is not None:
            if not totp:
                raise LoginRefused("totp_needed", "enter the code from your authenticator app")
            step = self._totp_step(self.vault.decrypt(row.totp_secret), totp, row.totp_last)
            if step is None:
                self._failed(norm, actor, "totp")
                raise LoginRefused("totp_bad", "wrong or already used authenticator code")
        rehash = self._ph.check_needs_rehash(row.password_hash)
        values: dict[str, Any] = {"failed_logins": 0, "locked_until": None, "last_login_at": now}
        if rehash:
            values["password_hash"] = self._hash(password)
        with write_transaction(self.engine) as conn:
            q = update(table).where(table.c.name == norm)
            if step is not None:
                # Only one login may use a step: a second one racing on another node finds
                # totp_last already moved and is refused.
                q = q.where((table.c.totp_last.is_(None)) | (table.c.totp_last < step))
                values["totp_last"] = step
            if not conn.execute(q.values(**values)).rowcount:
                raise LoginRefused("totp_bad", "wrong or already used authenticator code")
            record(conn, actor, Action.LOGIN, f"account:{norm}")
        return Account(name=norm, role=Role(row.role), created_at=row.created_at,
                       last_login_at=now, totp=row.totp_secret is not None)

    def _failed(self, name: str, actor: Actor, what: str) -> None:
        s = self.settings
        with write_transaction(self.engine) as conn:
            # The increment is one statement, so failures counted on two nodes at once both
            # count; the row stays locked (PostgreSQL) until the lock decision commits.
            conn.execute(update(table).where(table.c.name == name)
                         .values(failed_logins=table.c.failed_logins + 1))
            count = conn.execute(select(table.c.failed_logins)
                                 .where(table.c.name == name)).scalar() or 0
            locked = count >= s.login_failures
            if locked:
                conn.execute(update(table).where(table.c.name == name).values(
                    failed_logins=0, locked_until=self.clock() + s.lockout))
            record(conn, actor, Action.LOGIN_FAILED, f"account:{name}",
                   {"factor": what, "failures": count, "locked": locked})

    # -- TOTP ------------------------------------------------------------------------------
    def totp_begin(self, name: str) -> str:
        """A new TOTP secret (base32) for ``name`` to load into an authenticator app (see
        :meth:`totp_uri`); nothing changes until :meth:`totp_confirm` gets a valid code."""
        if self.get(name) is None:
            raise MessageError(f"no admin account named {name!r}", code="admin.unknown")
        import pyotp

        return str(pyotp.random_base32())

    def totp_uri(self, name: str, secret: str) -> str:
        """The otpauth:// URI an authenticator app reads (as a QR code) for ``secret``."""
        import pyotp

        return str(pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=TOTP_ISSUER))

    def totp_confirm(self, name: str, secret: str, code: str, *, actor: Actor) -> None:
        """Turn TOTP on for ``name`` with ``secret``, once ``code`` shows the app has it."""
        name = name.strip().lower()
        step = self._totp_step(secret, code, None)
        if step is None:
            raise MessageError("that code does not match: check the authenticator app's clock "
                               "and enter the code it shows now", code="admin.totp_code")
        with write_transaction(self.engine) as conn:
            self._require(conn, name)
            conn.execute(update(table).where(table.c.name == name).values(
                totp_secret=self.vault.encrypt(secret), totp_last=step))
            record(conn, actor, Action.ACCOUNT_TOTP, f"account:{name}", {"enabled": True})

    def totp_disable(self, name: str, *, actor: Actor) -> None:
        name = name.strip().lower()
        with write_transaction(self.engine) as conn:
            self._require(conn, name)
            conn.execute(update(table).where(table.c.name == name).values(
                totp_secret=None, totp_last=None))
            record(conn, actor, Action.ACCOUNT_TOTP, f"account:{name}", {"enabled": False})

    def _totp_step(self, secret: str, code: str, last: int | None) -> int | None:
        """The time step ``code`` is valid for (now, or one step either side), if it is
        later than ``last``; else None."""
        import hmac

        import pyotp

        code = code.replace(" ", "")
        if len(code) != 6 or not code.isdigit():
            return None
        try:
            otp = pyotp.TOTP(secret)
            now = int(self.clock()) // TOTP_STEP
            for step in (now - 1, now, now + 1):
                if (last is None or step > last) and hmac.compare_digest(
                        otp.generate_otp(step), code):
                    return step
        except (ValueError, TypeError):  # not base32
            return None
        return None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
