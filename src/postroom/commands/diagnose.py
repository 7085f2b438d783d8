"""The setup and deliverability commands: `postroom wizard`, `postroom doctor`,
`postroom dkim ...` (registered on the main app by postroom.cli)."""

from __future__ import annotations

import typer

from postroom.commands import dkim, doctor, wizard


def register(app: typer.Typer) -> None:
    app.command()(wizard.wizard)
    app.command()(doctor.doctor)
    app.add_typer(dkim.cli, name="dkim")
