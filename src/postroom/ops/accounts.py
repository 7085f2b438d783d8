"""Admin accounts and their API tokens, as an administrator manages them from the web admin,
``/api/v1/admin/accounts`` and `postroom admin ...` (postroom.admin.accounts and .tokens do
the work and write the audit rows; here the role check).

A password made here is generated and returned once; an API token likewise. Viewers may
see the list of accounts and tokens (names, roles, dates: never a secret), not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError
from postroom.ops import require

if TYPE_CHECKING:
    from postroom.admin.accounts import Account, Accounts
    from postroom.admin.tokens import AdminTokens
    from postroom.runtime import Instance


@dataclass(frozen=True)
class NewAccount:
    account: Account
    password: str  # generated, shown once


def accounts_of(inst: Instance) -> Accounts:
    """The instance's admin accounts, with its [admin] lockout rules."""
    from postroom.admin.accounts import Accounts
    from postroom.admin.config import AdminSettings
    from postroom.secrets import load_or_create_key

    return Accounts(inst.engine, lambda: load_or_create_key(inst.key_file),
                    settings=inst.settings.section(AdminSettings))


def tokens_of(inst: Instance) -> AdminTokens:
    from postroom.admin.tokens import AdminTokens
    from postroom.secrets import load_or_create_key

    return AdminTokens(inst.engine, lambda: load_or_create_key(inst.key_file))


def list_accounts(inst: Instance, actor: Actor) -> list[Account]:
    require(actor, Role.VIEWER, "list the admin accounts")
    return accounts_of(inst).list()


def add_account(inst: Instance, actor: Actor, name: str, role: Role | str, *,
                password: str | None = None) -> NewAccount:
    """Create an account; without ``password`` one is generated (returned once)."""
    from postroom.admin.accounts import check_name, check_role, generate_password

    require(actor, Role.ADMIN, "add an admin account")
    which = check_role(role.value if isinstance(role, Role) else role)
    secret = password if password is not None else generate_password()
    made = accounts_of(inst).add(check_name(name), secret, which, actor=actor)
    return NewAccount(made, secret)


def remove_account(inst: Instance, actor: Actor, name: str) -> None:
    """Remove an account, its sessions and tokens (never the last admin)."""
    require(actor, Role.ADMIN, "remove an admin account")
    if not accounts_of(inst).remove(name, actor=actor):
        raise MessageError(f"no admin account named {name!r}; see the list of accounts",
                           code="admin.unknown")


def set_role(inst: Instance, actor: Actor, name: str, role: Role | str) -> None:
    """Change an account's role; its open sessions follow at once."""
    from postroom.admin.accounts import check_role

    require(actor, Role.ADMIN, "change an account's role")
    which = check_role(role.value if isinstance(role, Role) else role)
    accounts_of(inst).set_role(name, which, actor=actor)


def list_tokens(inst: Instance, actor: Actor, account: str | None = None) -> list[dict[str, Any]]:
    """Admin API tokens (id, account, label, dates; never the secret)."""
    require(actor, Role.VIEWER, "list admin API tokens")
    return tokens_of(inst).list(account)


def create_token(inst: Instance, actor: Actor, account: str, label: str = "") -> str:
    """A new admin API token acting as ``account`` (with its role): returned once."""
    require(actor, Role.ADMIN, "create an admin API token")
    return tokens_of(inst).create(account, label, actor=actor)


def revoke_token(inst: Instance, actor: Actor, token_id: str) -> None:
    require(actor, Role.ADMIN, "revoke an admin API token")
    if not tokens_of(inst).revoke(token_id, actor=actor):
        raise MessageError(f"no admin API token with id {token_id!r}; see the list of "
                           "tokens", code="admin.token_unknown")
