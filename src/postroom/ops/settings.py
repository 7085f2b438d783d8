"""Settings, as an administrator changes them: retention and the message policy (stored in
the database by postroom.store.dbconfig, where postroom.toml and the environment leave them
free), and moving the whole configuration between instances (postroom.config_transfer).

What the file or a ``POSTROOM_*`` variable sets is locked: :class:`SectionView` says where
each key comes from, and a change to a locked key is refused by the ConfigStore with the
words "defined in postroom.toml". An export is never in plaintext: it has a passphrase or
leaves the secrets out, and the caller must say which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postroom.audit import Actor, Role
from postroom.exceptions import ConfigError
from postroom.ops import require
from postroom.store import dbconfig

if TYPE_CHECKING:
    from postroom.config_transfer import ImportReport
    from postroom.runtime import Instance

# The sections the web admin may store (dbconfig stores these two and no other).
SECTIONS = (dbconfig.Kind.RETENTION, dbconfig.Kind.POLICY)


@dataclass(frozen=True)
class SectionView:
    """One section as it is in force: each key's value and where it comes from."""

    kind: dbconfig.Kind
    values: dict[str, Any]  # by TOML key, as in force now
    origins: dict[str, dbconfig.Origin]  # by TOML key
    stored: dict[str, Any]  # the keys the database sets

    def locked(self, key: str) -> bool:
        return self.origins[key] in (dbconfig.Origin.FILE, dbconfig.Origin.ENVIRONMENT)


def _section(kind: dbconfig.Kind | str) -> dbconfig.Kind:
    for section in SECTIONS:
        if section == kind:
            return section
    raise ConfigError(f"{kind!r} is not a section the web admin stores: use "
                      f"{' or '.join(k.value for k in SECTIONS)}", code="config.section")


def view(inst: Instance, actor: Actor, kind: dbconfig.Kind | str) -> SectionView:
    """``kind`` (retention or policy) as in force now: the file's keys, the stored ones
    laid over, the defaults, each with its origin."""
    require(actor, Role.VIEWER, "see the settings")
    section = _section(kind)
    stored = (inst.config.retention() if section is dbconfig.Kind.RETENTION
              else inst.config.policy())
    effective = dbconfig.effective(inst.file_settings, inst.engine)
    model = getattr(effective, section.value)
    values = model.model_dump(mode="json", by_alias=True)
    origins = dbconfig.key_origins(inst.file_settings, section.value, stored)
    return SectionView(section, values, origins, stored)


def change(inst: Instance, actor: Actor, kind: dbconfig.Kind | str,
           values: Mapping[str, Any]) -> SectionView:
    """Replace the stored keys of ``kind`` with ``values`` (a key left out goes back to its
    default). A key the file or the environment sets is refused. Audited; every process
    picks the change up within seconds (postroom.reload)."""
    require(actor, Role.ADMIN, "change the settings")
    section = _section(kind)
    if section is dbconfig.Kind.RETENTION:
        inst.config.set_retention(values, actor=actor, settings=inst.file_settings)
    else:
        inst.config.set_policy(values, actor=actor, settings=inst.file_settings)
    return view(inst, actor, section)


def export(inst: Instance, actor: Actor, *, passphrase: str | None,
           without_secrets: bool) -> dict[str, Any]:
    """The whole configuration as one document: the secrets encrypted under ``passphrase``,
    or left out when ``without_secrets``; one of the two must be chosen."""
    from postroom.config_transfer import export_config

    require(actor, Role.ADMIN, "export the configuration")
    if passphrase and without_secrets:
        raise ConfigError("give a passphrase or leave the secrets out, not both",
                          code="config.passphrase")
    if not passphrase and not without_secrets:
        raise ConfigError("secrets are never exported in plaintext: give a passphrase (at "
                          "least 12 characters) to encrypt them, or choose to leave them out",
                          code="config.passphrase")
    return export_config(inst, passphrase=passphrase or None, actor=actor)


def import_(inst: Instance, actor: Actor, text: str | bytes, *, passphrase: str | None,
            without_secrets: bool = False) -> ImportReport:
    """Import an export's text. The apps it holds get NEW secrets (returned once in the
    report): an app's secret cannot move between instances."""
    from postroom.config_transfer import import_config, parse

    require(actor, Role.ADMIN, "import a configuration")
    doc = parse(text)
    if doc.get("secrets") is not None and not passphrase and not without_secrets:
        raise ConfigError("this export holds encrypted secrets: give its passphrase, or "
                          "choose to import it without them", code="config.passphrase")
    return import_config(inst, doc, passphrase=passphrase or None, actor=actor,
                         skip_secrets=without_secrets or not passphrase)
