"""`postroom install-service` and `postroom install-sendmail`: Postroom as a system service,
and as the system's sendmail (postroom.system)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postroom.commands._common import console, guard
from postroom.system import install
from postroom.system.steps import Steps
from postroom.system.unit import SERVICE_NAME, WORKER_NAME, service_unit, worker_unit

PrefixOpt = Annotated[Path | None, typer.Option(
    "--prefix", help="Do it all inside this folder (a staging root for a package, or a "
    "throw-away one to look at): nothing outside it is touched", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Print every action (and the units), change nothing")]


def _steps(prefix: Path | None, dry_run: bool) -> Steps:
    out = console()
    return Steps(lambda line: out.print(line, markup=False, soft_wrap=True),
                 prefix=prefix, dry_run=dry_run)


def install_service(
    user: Annotated[str, typer.Option("--user", help="The service user (a system user "
                                      "without a login, made when missing)")]
    = install.DEFAULT_USER,
    prefix: PrefixOpt = None,
    dry_run: DryRunOpt = False,
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="The configuration the service reads (made from a commented "
        "starter when missing; never overwritten)")] = install.CONFIG,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("install-service").
    steps = _steps(prefix, dry_run)
    spec = guard(lambda: install.install_service(steps, user=user, config=config))
    if dry_run:
        for name, text in ((SERVICE_NAME, service_unit(spec)), (WORKER_NAME, worker_unit(spec))):
            steps.note(f"\n--- {install.UNIT_DIR / name} ---\n{text}")
        return
    if prefix is not None:
        steps.note(f"staged in {prefix}: on the target, systemd-sysusers and "
                   "`systemd-tmpfiles --create` make the user and give the layout to it "
                   f"({install.SYSUSERS}, {install.TMPFILES})")
        return
    steps.note("next: systemctl daemon-reload && systemctl enable --now postroom\n"
               "then: journalctl -u postroom -f  (the first start prints the link that "
               "creates the first web admin account)\n"
               "more delivery processes: systemctl enable --now postroom-worker@1")


def install_sendmail(
    prefix: PrefixOpt = None,
    dry_run: DryRunOpt = False,
    undo: Annotated[bool, typer.Option(
        "--undo", help="Put back the sendmail there was before")] = False,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("install-sendmail").
    from postroom.system import alternatives

    steps = _steps(prefix, dry_run)
    if undo:
        guard(lambda: alternatives.uninstall_sendmail(steps))
    else:
        guard(lambda: alternatives.install_sendmail(steps))
