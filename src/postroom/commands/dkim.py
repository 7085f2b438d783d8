"""`postroom dkim keygen|show|list`: DKIM keys kept encrypted in the instance (postroom.dkim)
and the DNS records that publish them."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, fail, guard, instance
from postroom.commands.registry import help_of

cli = typer.Typer(help=help_of("dkim"), no_args_is_help=True)
DomainOpt = Annotated[str, typer.Option("--domain", "-d", help="The signing domain (d=), "
                                        "normally your From domain", show_default=False)]
SelectorOpt = Annotated[str, typer.Option("--selector", "-s", help="The selector (s=): the "
                                          "key is published at SELECTOR._domainkey.DOMAIN",
                                          show_default=False)]


def _sign_with(info: Any, settings: Any) -> str:
    """The step after publishing, naming the connections it concerns: those that send From
    the key's domain (their forced From or username), found as the doctor finds them."""
    from postroom.diagnostics.doctor import senders, signing_for

    sig = signing_for(info.domain, senders(settings), [])
    table = f'dkim = {{ domain = "{info.domain}", selector = "{info.selector}" }}'
    users = sig.signers.get(info.selector, [])
    if users:
        return (f"{_names(users)} already {'signs' if len(users) == 1 else 'sign'} with it: "
                "publish the record")
    others = [c for sel, cs in sig.signers.items() for c in cs]
    targets = sig.unsigned + others
    if not targets:
        return (f"Then sign with it: add  {table}  to the [[connections]] entry that sends "
                f"mail From {info.domain}")
    text = f"Then sign with it: add  {table}  to {_names(targets)}"
    if others:
        text += (f" ({_names(others)} {'signs' if len(others) == 1 else 'sign'} with "
                 "another selector today: switch once this record is published)")
    return text


def _names(names: list[str]) -> str:
    return ("connection " if len(names) == 1 else "connections ") + ", ".join(names)


def _print_record(info: Any, *, as_json: bool, intro: str, settings: Any) -> None:
    from rich.markup import escape

    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    con = console()
    con.print(intro, soft_wrap=True)
    con.print(f"  name:  [bold]{escape(info.name)}[/]   type: TXT", soft_wrap=True)
    con.print("  value (publish as these strings; the DNS joins them):", soft_wrap=True)
    for s in info.strings:
        con.print(f'    "{escape(s)}"', soft_wrap=True, highlight=False)
    con.print("  zone-file form:", soft_wrap=True)
    con.print(f"    {escape(info.zone_line)}", soft_wrap=True, highlight=False)
    # escape(): "[[connections]]" is Rich markup otherwise, and printed as "[]".
    con.print(escape(f"{_sign_with(info, settings)}, and check with `postroom doctor "
                     f"--domain {info.domain}`."), soft_wrap=True, highlight=False)


@cli.command()
def keygen(
    domain: DomainOpt,
    selector: SelectorOpt,
    bits: Annotated[int, typer.Option(help="RSA key size")] = 2048,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key of this "
                                        "selector (signatures made with it stop verifying)")]
    = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Make an RSA key for SELECTOR._domainkey.DOMAIN, store it encrypted in this instance,
    and print the TXT record to publish."""
    from postroom.audit import Actor
    from postroom.ops.deliverability import generate_dkim

    inst = instance(config)
    info = guard(lambda: generate_dkim(inst, Actor.cli(), domain, selector, bits=bits,
                                       force=force))
    _print_record(info, as_json=as_json, intro=f"[green]DKIM key made[/] ({info.bits} bits, "
                  "stored encrypted). Publish this DNS record:", settings=inst.settings)


@cli.command()
def show(domain: DomainOpt, selector: SelectorOpt, as_json: JsonOpt = False,
         config: ConfigOpt = None) -> None:
    """Print the DNS record of a stored key again."""
    from postroom import dkim
    from postroom.exceptions import ConfigError

    inst = instance(config)
    try:
        d = dkim.check_domain(domain)
    except ValueError as err:
        fail(ConfigError(f"--domain: {err}", code="dkim.domain"))
    info = guard(lambda: dkim.stored(inst.secrets.get, d, selector))
    if info is None:
        fail(ConfigError(f"no DKIM key for {dkim.dns_name(d, selector)}; make one with "
                         f"`postroom dkim keygen --domain {d} --selector {selector}`",
                         code="dkim.unknown"))
    _print_record(info, as_json=as_json, intro="Publish this DNS record:",
                  settings=inst.settings)


@cli.command("list")
def list_keys(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The DKIM keys stored in this instance and the connections that sign with them."""
    from rich.table import Table

    from postroom import dkim

    inst = instance(config)
    keys = guard(lambda: dkim.stored_keys(inst.engine))
    users: dict[tuple[str, str], list[str]] = {}
    for c in inst.settings.connections:
        if c.dkim is not None:
            users.setdefault((c.dkim.domain, c.dkim.selector), []).append(c.name)
    rows: list[dict[str, Any]] = [{"domain": d, "selector": s, "name": dkim.dns_name(d, s),
             "connections": users.get((d, s), [])} for d, s in keys]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("record", "used by")
    for r in rows:
        table.add_row(r["name"], ", ".join(r["connections"]) or "-")
    console().print(table)
    missing = [f"{c} ({dkim.dns_name(*k)})" for k, cs in users.items() if k not in keys
               for c in cs]
    if missing:
        console().print(f"[red]no key for[/]: {', '.join(missing)}; `postroom dkim keygen`",
                        soft_wrap=True)
