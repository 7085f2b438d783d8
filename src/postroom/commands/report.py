"""`postroom report --period day|week [--send] [--json]`: the summary report of the period
that ends now (postroom.reports): shown, printed as JSON, or queued as an email to
``[reports] to``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance


def report_cmd(
    period: Annotated[str, typer.Option(
        "--period", "-p", help="day (the last 24 hours) or week (the last 7 days), each "
        "compared with the one before")] = "week",
    send: Annotated[bool, typer.Option(
        "--send", help="Queue it as an email to [reports] to (HTML with a text part)")] = False,
    dns_wait: Annotated[float | None, typer.Option(
        "--dns-wait", min=0, max=120, help="Seconds to wait for the deliverability checks' "
        "DNS answers (default: [reports] dns_wait)", show_default=False)] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("report").
    from postroom.reports import build, render
    from postroom.reports.config import ReportsSettings
    from postroom.reports.schedule import prepare

    inst = instance(config)
    cfg = inst.settings.section(ReportsSettings)
    if dns_wait is not None:
        cfg = cfg.model_copy(update={"dns_wait": dns_wait})
    kind = period.strip().lower()
    guard(lambda: build.period(kind, 0))
    if send:
        env = guard(lambda: prepare(inst, kind, cfg, shared=False))
        msg_id = guard(lambda: inst.queue.enqueue_sync(env))
        if as_json:
            print(json.dumps({"id": msg_id, "to": cfg.to}))
        else:
            console().print(f"queued the {kind} report to {', '.join(cfg.to)}: message "
                            f"{msg_id} (`postroom show {msg_id}`)", markup=False)
        return
    doctor = guard(lambda: build.doctor_part(inst, wait=cfg.dns_wait,
                                             dns_server=cfg.dns_server, shared=False))
    report = guard(lambda: build.build(inst, kind, doctor=doctor))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    console().print(render.text(report, cfg.zone), markup=False, highlight=False,
                    soft_wrap=True)
