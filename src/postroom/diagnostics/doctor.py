"""`postroom doctor`: will mail from these domains, sent through these connections, be
accepted? Local DNS queries only (postroom.diagnostics.dns), no vendor service.

For each sending domain (``--domain``, else the domains of the connections' senders: a
forced From, the username when it is an address) the domain's own records are judged
(postroom.diagnostics.domaincheck). Then, for each connection that sends for it:

- SPF: does the envelope sender's domain authorise where the mail comes from? For a known
  provider (by host or transport: smtp.sendgrid.net, the Gmail API...) that is its
  documented include; for any other server, its addresses, evaluated with check_host()
  exactly as a receiver would (the best guess of where mail leaves from: a relay's own
  server sends from the addresses it answers on).
- DKIM: when Postroom signs (the connection's ``dkim`` table), the key is stored, published,
  and the published key is the stored one; otherwise whether the provider's selectors
  answer for the domain.
- DMARC: does SPF or DKIM pass *aligned* with the From domain (relaxed or strict, as the
  policy says)? With p=reject or quarantine and neither, receivers refuse the mail.
- Health: the circuit breaker's view (postroom.queue.status), a live ``check()`` that
  connects and logs in without sending (auth still works), and for OAuth connections the
  grant check (refresh works, the send permission is there).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom import dkim
from postroom.diagnostics import dmarc, providers, spf
from postroom.diagnostics.dns import Resolver
from postroom.diagnostics.domaincheck import (
    FAIL,
    INFO,
    OK,
    WARN,
    DomainFacts,
    Finding,
    Record,
    Signing,
    check_domain,
)
from postroom.exceptions import PostroomError
from postroom.settings import ConnectionBase, Settings

NOT_SENDING = ("memory", "capture")  # transports that deliver nowhere


@dataclass
class Sender:
    """One connection as the doctor sees it for one From domain."""

    connection: str
    from_domain: str
    envelope_domain: str
    host: str | None
    provider: providers.Provider | None
    dkim: dkim.DkimSettings | None
    subject: str = ""  # "connection NAME", with the From domain when it sends for several


@dataclass
class Report:
    resolver: str
    domains: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(f.status == FAIL for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for f in self.findings if f.status == s)
                  for s in (OK, INFO, WARN, FAIL)}
        return {"resolver": self.resolver, "domains": self.domains, "counts": counts,
                "findings": [f.to_dict() for f in self.findings]}


def _domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    addr = address.strip()
    if "<" in addr and addr.endswith(">"):
        addr = addr[addr.rindex("<") + 1:-1]
    return addr.rpartition("@")[2].lower().rstrip(".") or None


def _policy_value(settings: Settings, conn: ConnectionBase, key: str) -> str:
    """A message-policy value: the connection's, else the global one (if it inherits)."""
    cp = conn.policy
    value = getattr(cp, key, "") if cp is not None else ""
    if not value and (cp is None or cp.inherit):
        value = getattr(settings.policy, key, "")
    return str(value or "")


def senders(settings: Settings, domains: Sequence[str] = ()) -> list[Sender]:
    """Every (connection, From domain) pair to check. With ``domains`` each connection is
    taken to send for each of them (unless its policy forces another From)."""
    out: list[Sender] = []
    for c in settings.connections:
        if c.transport in NOT_SENDING:
            continue
        forced_from = _domain_of(_policy_value(settings, c, "from_"))
        forced_env = _domain_of(_policy_value(settings, c, "envelope_sender"))
        user_domain = _domain_of(getattr(c, "username", None))
        froms = [forced_from] if forced_from else list(domains) or (
            [user_domain] if user_domain else [])
        host = getattr(c, "host", None)
        prov = (providers.by_host(host) if host else None) or providers.by_transport(
            c.transport)
        mine = list(dict.fromkeys(d for d in froms if d))
        for fd in mine:
            subject = f"connection {c.name}" + (f" (From {fd})" if len(mine) > 1 else "")
            out.append(Sender(c.name, fd, forced_env or fd, host, prov, c.dkim, subject))
    return out


def selectors_for(domain: str, sends: Iterable[Sender],
                  stored: Iterable[tuple[str, str]]) -> list[str]:
    sels: list[str] = []
    for s in sends:
        if s.dkim is not None and s.dkim.domain == domain:
            sels.append(s.dkim.selector)
        if s.provider is not None:
            sels += s.provider.dkim_selectors
    sels += [sel for d, sel in stored if d == domain]
    return list(dict.fromkeys(sels))


def signing_for(domain: str, sends: Iterable[Sender],
                stored: Iterable[tuple[str, str]]) -> Signing:
    """Which connections sign for ``domain`` and with which selector, the keys stored for
    it, and the connections that send From it without signing."""
    out = Signing(domain, stored=[sel for d, sel in stored if d == domain])
    for s in sends:
        if s.dkim is not None and s.dkim.domain == domain:
            users = out.signers.setdefault(s.dkim.selector, [])
            if s.connection not in users:
                users.append(s.connection)
        elif s.dkim is None and s.from_domain == domain and s.connection not in out.unsigned:
            out.unsigned.append(s.connection)
    return out


# -- per connection ------------------------------------------------------------------------------
@dataclass
class _SpfVerdict:
    passed: bool
    finding: Finding
    # Mechanisms the envelope domain's record must gain for this connection. The record to
    # publish is filled in once every connection is known (one_spf_record): one name has
    # one SPF record, so each finding shows the same record with every connection's needs.
    needs: str = ""


def check_spf(resolver: Resolver, s: Sender, facts: DomainFacts) -> _SpfVerdict:
    d = s.envelope_domain
    subject = s.subject
    a = facts.spf
    what = s.host or (s.provider.title if s.provider else s.connection)
    if a is None or a.record is None:
        mech = _mechanism_for(resolver, s)
        if a is not None and len(a.records) > 1:
            return _SpfVerdict(False, Finding(
                subject, "spf.sender", FAIL, f"{d} publishes {len(a.records)} SPF records, "
                f"itself an error (permerror, RFC 7208 3.2): nothing authorises {what}",
                fix="replace them with one record" + (f" that also has {mech}" if mech else ""),
            ), mech)
        if a is not None and a.status == spf.NONE:
            return _SpfVerdict(False, Finding(
                subject, "spf.sender", FAIL, f"{d} has no SPF record, so nothing authorises "
                f"{what}", fix="publish an SPF record" + (f" with {mech}" if mech else
                                                           " listing the servers it sends from")
            ), mech)
        return _SpfVerdict(False, Finding(
            subject, "spf.sender", FAIL, f"{d} has no usable SPF record "
            f"({a.reason if a else 'not checked'}), so nothing authorises {what}",
            fix=f"fix {d}'s SPF record first (see the SPF finding of {d})"
            + (f", then add {mech}" if mech else "")))
    if s.provider is not None and s.provider.spf:
        hit = next((inc for inc in s.provider.spf if inc in a.includes), None)
        if hit:
            return _SpfVerdict(True, Finding(
                subject, "spf.sender", OK, f"the SPF of {d} authorises {what} "
                f"(include:{hit}, {s.provider.title}'s documented include)"))
        mech = f"include:{s.provider.spf[0]}"
        return _SpfVerdict(False, Finding(
            subject, "spf.sender", FAIL, f"your SPF does not authorise {what}: {d}'s record "
            f"has no include:{s.provider.spf[0]} ({s.provider.title} sends from its own "
            "servers, not from the address you connect to)",
            fix=f"add {mech} to the record (before the all)"), mech)
    if s.host is None:
        return _SpfVerdict(False, Finding(subject, "spf.sender", INFO,
                                          f"where {s.connection} sends from is not known: "
                                          "SPF not checked"))
    ips = _addresses(resolver, s.host)
    if not ips:
        return _SpfVerdict(False, Finding(subject, "spf.sender", WARN,
                                          f"{s.host} does not resolve: SPF not checked"))
    results = [spf.check_host(resolver, ip, d, f"postmaster@{d}") for ip in ips]
    bad = [r for r in results if r.result != spf.PASS]
    note = ""
    if any(ipaddress.ip_address(ip).is_private or ipaddress.ip_address(ip).is_loopback
           for ip in ips):
        note = (f" ({s.host} has a private address: receivers see the public address of "
                "the server it relays through; checked for the address Postroom connects to)")
    if not bad:
        by = results[0].matched or ""
        shown = s.host if ips == [s.host] else f"{s.host} ({', '.join(ips)})"
        return _SpfVerdict(True, Finding(
            subject, "spf.sender", OK, f"the SPF of {d} authorises {shown} via {by}{note}"))
    worst = bad[0]
    if worst.result in (spf.PERMERROR, spf.TEMPERROR):
        return _SpfVerdict(False, Finding(
            subject, "spf.sender", FAIL, f"SPF evaluation for {s.host} ({worst.ip}) ends in "
            f"{worst.result}: {worst.reason}", details=worst.trace))
    mechs = " ".join(f"ip{ipaddress.ip_address(r.ip).version}:{r.ip}" for r in bad)
    return _SpfVerdict(False, Finding(
        subject, "spf.sender", FAIL, f"your SPF does not authorise {s.host} "
        f"({', '.join(r.ip for r in bad)}): {d} gives it '{worst.result}'{note}",
        fix=f"add {mechs} (or a:{s.host}) to the record, before the all",
        details=worst.trace), mechs)


def one_spf_record(resolver: Resolver, facts: DomainFacts,
                   verdicts: Sequence[tuple[Sender, _SpfVerdict]]) -> None:
    """Give every SPF finding of one name the same record to publish: the name's records
    (one, or several merged) with the mechanisms of every connection that needs one.
    Advising each connection its own record would have the user publish two, and two SPF
    records on one name fail SPF for all its mail (RFC 7208 3.2)."""
    d, a = facts.domain, facts.spf
    if a is None or (a.record is None and len(a.records) <= 1 and a.status != spf.NONE):
        return  # broken or unreadable: its own finding says what to fix first
    needs = [(s, v) for s, v in verdicts if v.needs]
    mechs = [v.needs for _, v in needs]
    if not a.records and not mechs:
        return  # nothing published, nothing known to authorise: the domain finding's advice
    text = spf.merge(a.records, mechs or (["mx"] if facts.mx and not facts.null_mx else []))
    cost = spf.analyze_text(resolver, d, text)
    if cost.record is None:
        return
    record = Record(d, "TXT", text)
    note = ""
    if cost.lookups > spf.MAX_LOOKUPS:
        note = (f"; this record needs {cost.lookups} DNS lookups, more than "
                f"{spf.MAX_LOOKUPS}: receivers would treat it as broken, so first replace "
                "include/a/mx of your own servers with ip4:/ip6: ranges or drop includes of "
                "services you no longer use")
    users = sorted({s.connection for s, _ in needs})
    mine = next((f for f in facts.findings if f.check == "spf"), None)
    if mine is not None and (mine.record is not None or a.status == spf.NONE):
        mine.record = record
        if users:
            mine.fix = (mine.fix or "publish this record") + \
                f" (this one has what {_connections(users, 'need')})" + note
    for s, v in needs:
        v.finding.record = record
        rest = [u for u in users if u != s.connection]
        if rest:
            v.finding.fix = (v.finding.fix or "") + (
                f"; the record shown also has what {_connections(rest, 'need')}: {d} must "
                "publish exactly one SPF record")
        v.finding.fix = (v.finding.fix or "") + note


def _connections(names: Sequence[str], verb: str) -> str:
    """"connection a needs" / "connections a, b need"."""
    if len(names) == 1:
        return f"connection {names[0]} {verb}s"
    return f"connections {', '.join(names)} {verb}"


def _addresses(resolver: Resolver, host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        return resolver.addresses(host)


def _mechanism_for(resolver: Resolver, s: Sender) -> str:
    if s.provider is not None and s.provider.spf:
        return f"include:{s.provider.spf[0]}"
    if s.host:
        ips = _addresses(resolver, s.host)
        return " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips)
    return ""


def check_dkim(s: Sender, facts: DomainFacts, stored_key: dkim.KeyInfo | None,
               signing: Signing) -> tuple[str | None, Finding]:
    """(the aligned-candidate signing domain when DKIM will pass, finding)."""
    subject = s.subject
    cfg = s.dkim
    if cfg is not None:
        name = dkim.dns_name(cfg.domain, cfg.selector)
        if stored_key is None:
            return None, Finding(
                subject, "dkim.sender", FAIL, f"signs as {name}, but this instance has no key "
                "for it: mail through the connection waits",
                fix=f"postroom dkim keygen --domain {cfg.domain} --selector {cfg.selector}, "
                "then publish the record it prints")
        record = Record(name, "TXT", stored_key.record)
        pub = facts.dkim.get(cfg.selector)
        if pub is None:
            return None, Finding(
                subject, "dkim.sender", FAIL, f"signs as {name}, but the key is not published: "
                "receivers cannot verify the signature", fix="publish this TXT record",
                record=record)
        if pub.key.p != dkim.parse_record(stored_key.record).p:
            return None, Finding(
                subject, "dkim.sender", FAIL, f"signs as {name}, but the published key is not "
                "the one Postroom signs with: every signature fails",
                fix="replace the published record with this one", record=record)
        return cfg.domain, Finding(subject, "dkim.sender", OK,
                                   f"signs as {name}; the published key matches the stored one "
                                   f"({stored_key.bits} bits)")
    prov = s.provider
    if prov is not None:
        found = [sel for sel in prov.dkim_selectors if sel in facts.dkim]
        if found:
            return facts.domain, Finding(
                subject, "dkim.sender", OK, f"{prov.title} signs for {facts.domain} "
                f"(selector {', '.join(found)} published)")
    return None, Finding(
        subject, "dkim.sender", WARN, f"mail through {s.connection} is not known to carry a "
        f"DKIM signature of {facts.domain} (a provider signing with its own domain does not "
        "align with your From)",
        fix=(f"turn on DKIM for {facts.domain} at {prov.title} ({prov.docs})" if prov and
             prov.docs and not signing.signers else signing.advice(s.connection)))


def check_alignment(s: Sender, facts: DomainFacts, spf_pass: bool,
                    dkim_domain: str | None, signing: Signing) -> Finding:
    subject = s.subject
    pol = facts.dmarc
    fd, ed = s.from_domain, s.envelope_domain
    if pol is None:
        return Finding(subject, "dmarc.sender", INFO, f"no DMARC policy for {fd}: alignment not "
                       "enforced")
    spf_aligned = dmarc.aligned(ed, fd, pol.aspf)
    dkim_aligned = dkim_domain is not None and dmarc.aligned(dkim_domain, fd, pol.adkim)
    parts = [f"SPF {'passes' if spf_pass else 'does not pass'} for {ed}"
             f" ({'aligned' if spf_aligned else 'not aligned'} with From {fd}, "
             f"{'strict' if pol.aspf == 's' else 'relaxed'})",
             f"DKIM {'aligned (' + str(dkim_domain) + ')' if dkim_aligned else 'not aligned'}"]
    if (spf_pass and spf_aligned) or dkim_aligned:
        return Finding(subject, "dmarc.sender", OK, "DMARC passes: " + "; ".join(parts))
    policy = pol.applies()
    fixes = []
    if not spf_aligned:
        fixes.append(f"send with an envelope sender in {fd} (policy envelope_sender = "
                     f"\"bounces@{fd}\")" if pol.aspf == "s" else
                     f"use an envelope sender under {dmarc.org_domain(fd)}")
    elif not spf_pass:
        fixes.append(f"authorise the connection in {ed}'s SPF (see the SPF finding)")
    fixes.append(f"sign with DKIM for {fd} ({signing.advice(s.connection)})")
    status = FAIL if policy in ("reject", "quarantine") else WARN
    verb = {"reject": "receivers reject", "quarantine": "receivers put in spam"}.get(
        policy, "DMARC fails for")
    return Finding(subject, "dmarc.sender", status,
                   f"DMARC fails (p={policy}): {verb} mail From {fd} sent through "
                   f"{s.connection}: " + "; ".join(parts), fix=" or ".join(fixes))


# -- health --------------------------------------------------------------------------------------
async def connection_health(inst: Any, connect: bool, timeout: float) -> list[Finding]:
    """The breaker's view, a live login check, and the OAuth grant check per connection."""
    from postroom.diagnostics.advice import advise_error
    from postroom.queue.status import connections_report

    settings: Settings = inst.settings
    report = await asyncio.to_thread(connections_report, inst.queue, settings)
    out: list[Finding] = []
    transports = inst.transports() if connect else {}
    try:
        for row in report["connections"]:
            name = row["name"]
            subject = f"connection {name}"
            conn = settings.connection(name)
            health = row["health"]
            text = f"health {health}" + (", paused" if row["paused"] else "")
            if row["last_error"]:
                text += f"; last error {row['last_error'][:200]} ({row['last_error_at']})"
            status = {"up": OK, "degraded": WARN, "down": FAIL}.get(health, INFO)
            if row["paused"]:
                status = WARN
            out.append(Finding(subject, "health", status, text,
                               fix=f"postroom connections resume {name}" if row["paused"]
                               else None))
            if conn.oauth is not None:
                out.append(await _oauth_check(inst, name))
            if connect and conn.transport not in NOT_SENDING:
                out.append(await _live_check(transports[name], conn, timeout, advise_error))
    finally:
        for t in transports.values():
            await t.aclose()
    return out


async def _oauth_check(inst: Any, name: str) -> Finding:
    from postroom.oauth.checks import check_one

    try:
        c = await asyncio.to_thread(check_one, inst.oauth, name)
    except PostroomError as err:
        return Finding(f"connection {name}", "oauth", FAIL, err.message)
    return Finding(f"connection {name}", "oauth", OK if c.ok else FAIL,
                   f"OAuth grant {c.state}: {c.detail}",
                   fix=None if c.ok else f"postroom oauth login {name}")


async def _live_check(transport: Any, conn: ConnectionBase, timeout: float,
                      advise: Any) -> Finding:
    subject = f"connection {conn.name}"
    host = getattr(conn, "host", None)
    try:
        transcript = await asyncio.wait_for(transport.check(), timeout)
    except TimeoutError:
        return Finding(subject, "login", FAIL, f"no answer within {timeout:g} s",
                       fix=f"postroom probe {host}" if host else None)
    except PostroomError as err:
        adv = advise(err, host=host, security=getattr(conn, "security", None))
        return Finding(subject, "login", FAIL, f"connecting and logging in fails: "
                       f"{err.code}: {err.message}", fix=adv.fix if adv else None,
                       details=(getattr(err, "transcript", "") or "").splitlines()[-12:])
    if "C: AUTH" in transcript.upper():
        return Finding(subject, "login", OK, "connected and logged in without sending: the "
                       "credentials still work")
    return Finding(subject, "login", OK, "connected without sending (no login configured, "
                   "or none to check for this transport)")


# -- the whole run -------------------------------------------------------------------------------
def run(inst: Any, resolver: Resolver, domains: Sequence[str] = (), *, connect: bool = True,
        timeout: float = 20.0, selectors: Sequence[str] = ()) -> Report:
    """Every check; ``selectors``: DKIM selectors to try on every domain besides the common
    ones, the connections' and the stored keys'."""
    settings: Settings = inst.settings
    sends = senders(settings, domains)
    stored = dkim.stored_keys(inst.engine)
    wanted = list(dict.fromkeys([*domains, *(s.from_domain for s in sends),
                                 *(s.envelope_domain for s in sends),
                                 *(s.dkim.domain for s in sends if s.dkim)]))
    report = Report(resolver.describe(), wanted)
    if not wanted:
        report.findings.append(Finding(
            "configuration", "domains", WARN, "no sending domain to check: no connection has "
            "a username address or a forced From", fix="run postroom doctor --domain "
            "example.com"))
    signing = {d: signing_for(d, sends, stored) for d in wanted}
    facts = {d: check_domain(resolver, d, [*selectors, *selectors_for(d, sends, stored)],
                             signing[d]) for d in wanted}
    for d in wanted:
        report.findings += facts[d].findings
    spf_verdicts: dict[str, list[tuple[Sender, _SpfVerdict]]] = {}
    for s in sends:
        env_facts, from_facts = facts[s.envelope_domain], facts[s.from_domain]
        spf_v = check_spf(resolver, s, env_facts)
        spf_verdicts.setdefault(s.envelope_domain, []).append((s, spf_v))
        report.findings.append(spf_v.finding)
        key = dkim.stored(inst.secrets.get, s.dkim.domain, s.dkim.selector) if s.dkim else None
        dkim_facts = facts[s.dkim.domain] if s.dkim else from_facts
        dkim_domain, dkim_finding = check_dkim(s, dkim_facts, key, signing[dkim_facts.domain])
        report.findings.append(dkim_finding)
        if s.envelope_domain != s.from_domain and not env_facts.accepts_mail:
            report.findings.append(Finding(
                s.subject, "mx", WARN,
                f"the envelope sender's domain {s.envelope_domain} receives no mail: bounces "
                "are lost"))
        report.findings.append(check_alignment(s, from_facts, spf_v.passed, dkim_domain,
                                               signing[s.from_domain]))
    for d in wanted:
        one_spf_record(resolver, facts[d], spf_verdicts.get(d, []))
    if settings.connections:
        report.findings += asyncio.run(connection_health(inst, connect, timeout))
    return report
