"""The wizard's way out when SMTP is blocked: an HTTPS API connection.

When no submission server answers from this machine (most cloud VMs drop port 25, some
networks every SMTP port), `postroom wizard` lists the HTTPS API transports that send for
the user's provider (diagnostics/providers.toml ``transports``: Gmail -> gmail, Microsoft
365 -> msgraph, a SendGrid relay -> sendgrid...), or every API-key provider when the
provider is not known, says which of their API hosts this machine reaches
(postroom.diagnostics.https), and sets one up: it asks for the provider's required
settings and the API key (hidden; or ``--password-env`` / ``--password-stdin``), checks the
key without sending (the transport's ``check()``), appends the connection and stores the
key encrypted, then sends the test message. ``--api KIND`` goes straight here.

Everything comes from the transports registry (postroom.diagnostics.api_providers): a
provider added there is offered without a change here.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from postroom.diagnostics.api_providers import ApiProvider
from postroom.diagnostics.providers import Provider
from postroom.exceptions import ConfigError, CredentialsError

PROBE_TIMEOUT = 10.0


class Output(Protocol):
    data: dict[str, Any]

    def say(self, text: str, **kw: Any) -> None: ...
    def done(self, code: int) -> NoReturn: ...
    def fail(self, err: Any) -> NoReturn: ...


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--setting KEY=VALUE``: the value as TOML when it reads as one (numbers, true/false,
    lists), else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--setting {item!r}: expected KEY=VALUE, e.g. region=eu",
                              code="wizard.setting")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def reachable_hosts(choices: Sequence[ApiProvider], timeout: float) -> dict[str, str]:
    """host -> "reachable" or why not, for every API host of ``choices`` (one TLS handshake
    and one HEAD each, in parallel; no credentials sent)."""
    from postroom.diagnostics import https

    targets = [https.Endpoint(p.title, host) for p in choices for _, host in p.hosts]
    results = asyncio.run(https.check(targets, timeout=timeout)) if targets else []
    return {r.host: "reachable" if r.reachable else (r.error or str(r.status))
            for r in results}


def offer(out: Output, *, address: str, provider: Provider | None, cfg_path: Path,
          kind: str | None, settings: dict[str, Any], name: str | None, interactive: bool,
          key_env: str | None, key_stdin: bool, send_test: Callable[[str], int] | None,
          ehlo_name: str) -> NoReturn:
    """List the API transports for ``provider``, set one up (``kind``, or the user's
    choice), and end the command. ``send_test(name)``: the test message (None: none)."""
    from postroom.diagnostics import api_providers

    every = api_providers.providers()
    if kind is not None:
        choices = [p for p in every if p.kind == kind]
        if not choices:
            out.fail(ConfigError(f"--api {kind!r} is not an HTTPS API transport; use one of: "
                                 f"{', '.join(p.kind for p in every if p.api_key)}",
                                 code="wizard.api"))
    else:
        choices = api_providers.for_provider(provider)
    # Named by the user (--api): no need to ask the network which ones answer.
    reach = {} if kind is not None else reachable_hosts(choices, PROBE_TIMEOUT)
    _show(out, choices, reach, provider)
    chosen = _choose(out, choices, reach, kind, interactive)
    if not chosen.api_key:
        out.say(f"{chosen.title} signs in with OAuth 2.0: add a [[connections]] entry with "
                f"transport = \"{chosen.kind}\" and its oauth table (README), then run "
                "`postroom oauth login NAME`.")
        out.done(1)
    conn_name = name or chosen.kind
    entry = _entry(out, chosen, conn_name, settings, interactive)
    from postroom.configedit import existing_names

    if conn_name in existing_names(cfg_path):
        out.fail(ConfigError(
            f"{cfg_path} already has a connection named {conn_name!r}; choose another name "
            "with --name, or remove that [[connections]] entry first", code="config.dupe"))
    key = read_secret(out, env=key_env, stdin=key_stdin, interactive=interactive,
                      prompt=f"{chosen.title} API key", needs=f"{chosen.title} needs its "
                      "API key: give it", what="API key")
    out.say(f"Checking the {chosen.title} API key (nothing is sent)...")
    from postroom.diagnostics.wizard import check_login

    err = asyncio.run(check_login(entry, key, ehlo_name=ehlo_name))
    if err is not None:
        out.data["login"] = {"code": err.code, "message": err.message}
        out.say(f"[bold red]the key does not work[/] ({err.code}): {err.message}",
                markup=False)
        out.say("nothing written")
        out.done(1)
    out.data["login"] = "ok"
    _save(out, cfg_path, entry, key, address, chosen)
    if send_test is None:
        out.done(0)
    out.done(send_test(conn_name))


def _show(out: Output, choices: Sequence[ApiProvider], reach: dict[str, str],
          provider: Provider | None) -> None:
    whose = f"{provider.title}'s" if provider and provider.transports else "an"
    out.say(f"SMTP is blocked from here: {whose} HTTPS API is the way out (port 443).")
    listed = []
    for p in choices:
        hosts = [{"host": h, "region": label, "reach": reach.get(h, "not checked")}
                 for label, h in p.hosts]
        listed.append({"kind": p.kind, "title": p.title, "hosts": hosts, "api_key": p.api_key})
        state = "; ".join(f"{h['host']} {h['reach']}" for h in hosts) or "your own installation"
        out.say(f"  {p.kind:<13} {p.title}: {state}", markup=False, highlight=False)
    out.data["api"] = listed


def _choose(out: Output, choices: Sequence[ApiProvider], reach: dict[str, str],
            kind: str | None, interactive: bool) -> ApiProvider:
    if kind is not None:
        return choices[0]
    usable = [p for p in choices if any(reach.get(h) == "reachable" for _, h in p.hosts)
              or not p.hosts]
    if not usable:
        out.say("No API host is reachable either: this network blocks HTTPS too (or needs a "
                "proxy: set HTTPS_PROXY).")
        out.done(1)
    if len(usable) == 1 and not interactive:
        return usable[0]
    if not interactive:
        out.say("Choose one and run again with --api KIND --password-env VAR (and --setting "
                "KEY=VALUE for its settings), e.g. `postroom wizard ADDRESS --api "
                f"{usable[0].kind} --password-env API_KEY`.")
        out.done(1)
    from rich.prompt import Prompt

    from postroom.commands._common import console

    picked = Prompt.ask("Set up which one (none: stop here)",
                        choices=[p.kind for p in usable] + ["none"], default=usable[0].kind,
                        console=console(stderr=True))
    if picked == "none":
        out.say("nothing written")
        out.done(1)
    return next(p for p in usable if p.kind == picked)


def _entry(out: Output, p: ApiProvider, name: str, given: dict[str, Any],
           interactive: bool) -> dict[str, Any]:
    """The connection's keys: ``--setting`` values, then the provider's required keys and
    choices (region...) asked for on a terminal; unattended, a missing required key fails
    naming the flag, a choice takes its default."""
    entry: dict[str, Any] = {"name": name, "transport": p.kind, **given}
    for s in p.settings:
        if s.name in entry or not (s.required or s.choices):
            continue
        if not interactive:
            if s.required:
                out.fail(ConfigError(f"{p.title} needs {s.name}: give --setting "
                                     f"{s.name}=VALUE", code="wizard.setting"))
            continue
        from rich.prompt import Prompt

        from postroom.commands._common import console

        value = Prompt.ask(f"{p.title} {s.name}", choices=list(s.choices) or None,
                           default=str(s.default) if s.default is not None else None,
                           console=console(stderr=True))
        if value and value.strip():
            entry[s.name] = value.strip()
    return entry


def read_secret(out: Output, *, env: str | None, stdin: bool, interactive: bool,
                prompt: str, needs: str, what: str) -> str:
    """A secret from ``--password-env``, ``--password-stdin`` or a hidden prompt, for both
    wizard paths (SMTP password, API key); refused, with nothing written, when none of
    them applies or the secret is empty."""
    if env:
        secret = os.environ.get(env, "")
        if not secret:
            out.fail(CredentialsError(f"--password-env {env}: the variable is not set or "
                                      "empty", code="wizard.password"))
    elif stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    elif interactive:
        from rich.prompt import Prompt

        from postroom.commands._common import console

        secret = Prompt.ask(prompt, password=True, console=console(stderr=True))
    else:
        out.fail(CredentialsError(
            f"{needs} with --password-env VAR or --password-stdin (or run on a terminal to "
            "be asked)", code="wizard.password"))
    if not secret:
        out.fail(CredentialsError(f"empty {what}; nothing written", code="wizard.password"))
    return secret


def _save(out: Output, path: Path, entry: dict[str, Any], key: str, address: str,
          p: ApiProvider) -> None:
    """Append the entry and store the key encrypted (``connection set-password``'s secret)."""
    import datetime as dt

    from postroom import settings as settings_mod
    from postroom.configedit import append_connection
    from postroom.runtime import Instance
    from postroom.secrets import Secret, secret_name

    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    comments = [f"Added by `postroom wizard {address}` on {when}: SMTP was blocked, so "
                f"{p.title}'s HTTPS API ({p.docs_url}).",
                f"The API key is stored encrypted in the database; change it with `postroom "
                f"connection set-password {entry['name']}`."]
    append_connection(path, entry, comments)
    inst = Instance(settings_mod.load(path))
    try:
        inst.secrets.set(secret_name(str(entry["name"]), Secret.API_KEY), key)
    finally:
        inst.close()
    out.data.update(config=str(path), connection=entry, password_stored=True)
    out.say(f"[green]saved[/] connection [bold]{entry['name']}[/] ({p.title} API) to {path}; "
            "API key stored encrypted")
