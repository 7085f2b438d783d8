"""What a sending domain publishes, judged on its own: MX (and null MX), the SPF record
(syntax, lookups, void lookups, its ``all``), DKIM keys at the selectors worth trying (and
their sizes), the DMARC policy. Each finding carries its fix, with the exact record to
publish where one helps. What the domain must say about *Postroom's* connections (SPF
authorisation, alignment) is postroom.diagnostics.doctor's part.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from postroom import dkim
from postroom.diagnostics import dmarc, spf
from postroom.diagnostics.dns import Resolver

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
# Selectors tried on every domain (the defaults of common signers); the configured ones,
# Postroom's own keys and the providers' are added per domain.
COMMON_SELECTORS = ("default", "dkim", "mail", "selector1", "selector2", "google", "k1", "k2",
                    "s1", "s2", "postroom", "smtp", "key1", "zmail", "fm1", "protonmail",
                    "mandrill", "mailjet", "sig1")
RECOMMENDED_BITS = 2048


@dataclass
class Record:
    """A DNS record to publish (the fix)."""

    name: str
    type: str
    value: str

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "value": self.value}
        if self.type == "TXT" and len(self.value) > dkim.MAX_TXT_STRING:
            out["strings"] = dkim.split_txt(self.value)
        return out

    def zone(self) -> str:
        if self.type == "TXT":
            strings = " ".join(f'"{s}"' for s in dkim.split_txt(self.value))
            return f"{self.name}. IN TXT {strings}"
        return f"{self.name}. IN {self.type} {self.value}"


@dataclass
class Finding:
    subject: str  # the domain, or "connection NAME"
    check: str  # mx | spf | spf.sender | dkim | dkim.sender | dmarc | dmarc.sender | health
    status: str  # ok | warn | fail | info
    summary: str
    fix: str | None = None
    record: Record | None = None
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "check": self.check, "status": self.status,
                "summary": self.summary, "fix": self.fix,
                "record": self.record.to_dict() if self.record else None,
                "details": self.details}


@dataclass
class DkimKey:
    selector: str
    key: dkim.PublishedKey


@dataclass
class DomainFacts:
    """What the domain publishes; the doctor's per-connection checks read it."""

    domain: str
    mx: list[tuple[int, str]] = field(default_factory=list)
    null_mx: bool = False
    accepts_mail: bool = True
    spf: spf.Analysis | None = None
    dkim: dict[str, DkimKey] = field(default_factory=dict)
    dmarc: dmarc.Policy | None = None
    dmarc_note: str = ""
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Signing:
    """How Postroom signs for one domain today, so that DKIM advice names the selector a
    connection already signs with (one key to publish, not a second one) and the
    connections to add the ``dkim`` table to."""

    domain: str
    signers: dict[str, list[str]] = field(default_factory=dict)  # selector -> connections
    stored: list[str] = field(default_factory=list)  # selectors with a key in the store
    unsigned: list[str] = field(default_factory=list)  # connections sending From it unsigned

    def selector(self) -> str:
        """The selector to use: one a connection signs with (its key stored first), else a
        stored key's, else "postroom"."""
        ranked = sorted(self.signers, key=lambda sel: sel not in self.stored)
        return (ranked or self.stored or ["postroom"])[0]

    def _key_step(self, sel: str) -> str:
        if sel in self.stored:
            return (f"publish its key (postroom dkim show --domain {self.domain} --selector "
                    f"{sel} prints the record)")
        return (f"make its key with postroom dkim keygen --domain {self.domain} --selector "
                f"{sel} and publish the record it prints")

    def advice(self, connection: str | None = None) -> str:
        """What to do so that mail From the domain (through ``connection``, or any) carries
        an aligned DKIM signature made by Postroom."""
        d, sel = self.domain, self.selector()
        table = f'dkim = {{ domain = "{d}", selector = "{sel}" }}'
        users = self.signers.get(sel, [])
        if connection is not None and any(connection in c for c in self.signers.values()):
            mine = next(s for s, c in self.signers.items() if connection in c)
            return f"connection {connection} signs with selector {mine}: " + \
                self._key_step(mine)
        if connection is not None:
            where = f"connection {connection}"
        elif self.unsigned:
            where = ("connection " if len(self.unsigned) == 1 else "connections ") + \
                ", ".join(self.unsigned)
        else:
            where = f"the [[connections]] entry that sends From {d}"
        if users:
            one = len(users) == 1
            who = ("connection " if one else "connections ") + ", ".join(users)
            if connection is None:
                return (f"{who} {'signs' if one else 'sign'} with selector {sel}: "
                        f"{self._key_step(sel)}"
                        + (f"; add {table} to {where} too" if self.unsigned else ""))
            return (f"let Postroom sign as {who} already {'does' if one else 'do'}: add "
                    f"{table} to {where}")
        if sel in self.stored:
            return (f"let Postroom sign with the key it already has for {d}: add {table} to "
                    f"{where}, and {self._key_step(sel)}")
        return (f"let Postroom sign: postroom dkim keygen --domain {d} --selector {sel}, "
                f"publish the record it prints, and add {table} to {where}")


def check_domain(resolver: Resolver, domain: str, selectors: Iterable[str] = (),
                 signing: Signing | None = None) -> DomainFacts:
    """``signing``: how Postroom signs for the domain (its selectors are tried too)."""
    facts = DomainFacts(domain)
    sign = signing or Signing(domain)
    _mx(resolver, facts)
    _spf(resolver, facts)
    _dkim(resolver, facts, [*dict.fromkeys([*selectors, *sign.signers, *sign.stored,
                                             *COMMON_SELECTORS])], sign)
    _dmarc(resolver, facts)
    return facts


# -- MX ------------------------------------------------------------------------------------------
def _mx(resolver: Resolver, f: DomainFacts) -> None:
    d = f.domain
    ans, hosts = resolver.mx(d)
    f.mx = hosts
    if ans.temporary:
        f.findings.append(Finding(d, "mx", WARN, f"MX lookup failed: {ans.describe()}"))
        return
    if hosts and all(h == "" for _, h in hosts):
        f.null_mx, f.accepts_mail = True, False
        f.findings.append(Finding(
            d, "mx", WARN,
            "null MX (RFC 7505): the domain says it receives no mail, so bounces and replies "
            "to it cannot arrive, and receivers may refuse mail whose envelope sender is in it",
            fix=(f"send with an envelope sender in a domain that receives mail (the connection's "
                 f"policy: envelope_sender = \"bounces@<a domain with MX>\"), or publish real "
                 f"MX records for {d} instead of the null MX")))
        return
    if any(h == "" for _, h in hosts):
        f.findings.append(Finding(d, "mx", FAIL, "a null MX ('.') mixed with other MX records "
                                  "(RFC 7505 allows it only alone)",
                                  fix=f"remove the '0 .' MX record of {d}"))
        return
    if not hosts:
        addrs = resolver.addresses(d)
        if addrs:
            # The one host known to exist is the domain itself: this MX keeps mail going
            # where it goes today. A name like mail.<domain> would be a guess shown as fact.
            f.findings.append(Finding(
                d, "mx", WARN, f"no MX record: mail for {d} goes to its A/AAAA address "
                f"({', '.join(addrs[:3])}) (RFC 5321 5.1)",
                fix=f"publish an MX record: this one names {d} itself, the host that receives "
                "its mail today; name your mail provider's host instead if another server "
                "should receive it", record=Record(d, "MX", f"10 {d}.")))
        else:
            f.accepts_mail = False
            f.findings.append(Finding(
                d, "mx", FAIL, f"{d} has neither MX nor address records: nothing can reply or "
                "bounce to it, and many receivers refuse mail from a domain that cannot "
                "receive", fix=f"publish an MX record for {d}: {d}. IN MX 10 <your mail "
                "server>. (a placeholder: put the host name your mail provider gives)"))
        return
    missing = [h for _, h in hosts if not resolver.addresses(h)]
    text = ", ".join(f"{p} {h}" for p, h in hosts)
    if missing:
        f.findings.append(Finding(d, "mx", WARN, f"MX {text}; {', '.join(missing)} has no "
                                  "address", fix="fix or remove the MX records whose host does "
                                  "not resolve"))
    else:
        f.findings.append(Finding(d, "mx", OK, f"MX {text}"))


# -- SPF -----------------------------------------------------------------------------------------
def _spf(resolver: Resolver, f: DomainFacts) -> None:
    d = f.domain
    a = spf.analyze(resolver, d)
    f.spf = a
    if a.status == spf.NONE:
        f.findings.append(Finding(
            d, "spf", FAIL, "no SPF record: receivers cannot tell your servers from forgers "
            "(Gmail and Yahoo require SPF or DKIM, bulk senders both)",
            fix="publish an SPF record listing the servers that send for the domain (the "
            "connections' checks below give the mechanisms)",
            record=Record(d, "TXT", spf.merge([], ["mx"])) if f.mx else None))
        return
    if a.status == spf.TEMPERROR:
        f.findings.append(Finding(d, "spf", WARN, f"SPF lookup failed: {a.reason}"))
        return
    if len(a.records) > 1:
        merged = spf.merge(a.records)
        f.findings.append(Finding(
            d, "spf", FAIL, f"{a.reason}: " + " | ".join(a.records),
            fix="replace them with one record that has the mechanisms of all of them",
            record=Record(d, "TXT", merged) if _parses(merged) else None))
        return
    if a.record is None:
        f.findings.append(Finding(d, "spf", FAIL, f"SPF is broken (permerror): {a.reason}",
                                  fix="publish exactly one valid record (see RFC 7208)"))
        return
    details = a.tree
    summary = f"{a.record.text} ({a.lookups} of {spf.MAX_LOOKUPS} DNS lookups)"
    if a.problems:
        fix = None
        if a.lookups > spf.MAX_LOOKUPS:
            fix = ("cut lookups to 10 or fewer: replace include/a/mx of your own servers with "
                   "ip4:/ip6: ranges, drop includes of services you no longer use, or split "
                   "senders onto subdomains with their own SPF")
        elif a.void_lookups > spf.MAX_VOID:
            fix = "remove the mechanisms that name domains without records"
        f.findings.append(Finding(d, "spf", FAIL, f"{summary}: " + "; ".join(a.problems),
                                  fix=fix, details=details))
        return
    qual = a.all_qualifier
    redirect = a.record.modifier("redirect")
    if qual is None and redirect is None:
        f.findings.append(Finding(
            d, "spf", WARN, f"{summary}: no 'all' at the end, so unlisted servers get "
            "'neutral': the record protects nothing", fix="end the record with ~all or -all",
            record=Record(d, "TXT", spf.merge([a.record.text])), details=details))
    elif qual == spf.NEUTRAL:
        f.findings.append(Finding(
            d, "spf", WARN, f"{summary}: '?all' treats unlisted servers as neutral",
            fix="end the record with ~all (soft fail) or -all (fail)",
            record=Record(d, "TXT", spf.merge([a.record.text])), details=details))
    else:
        f.findings.append(Finding(d, "spf", OK, summary, details=details))


def _parses(text: str) -> bool:
    try:
        spf.parse(text)
    except spf.SPFError:
        return False
    return True


# -- DKIM ----------------------------------------------------------------------------------------
def _dkim(resolver: Resolver, f: DomainFacts, selectors: list[str], sign: Signing) -> None:
    d = f.domain

    def look(sel: str) -> tuple[str, list[str]]:
        _, texts = resolver.txt(dkim.dns_name(d, sel))
        return sel, [t for t in texts if "p=" in t]

    with ThreadPoolExecutor(8) as pool:
        found = [(sel, texts) for sel, texts in pool.map(look, selectors) if texts]
    for sel, texts in found:
        key = dkim.parse_record(texts[0])
        f.dkim[sel] = DkimKey(sel, key)
        name = dkim.dns_name(d, sel)
        if key.error:
            f.findings.append(Finding(d, "dkim", FAIL, f"{name}: {key.error}",
                                      fix="publish the record your signer gives, unchanged"))
        elif key.revoked:
            f.findings.append(Finding(d, "dkim", INFO, f"{name}: revoked (empty p=)"))
        elif key.key_type == "rsa" and (key.bits or 0) < dkim.MIN_BITS:
            f.findings.append(Finding(
                d, "dkim", FAIL, f"{name}: RSA {key.bits} bits: receivers ignore keys under "
                f"{dkim.MIN_BITS} bits (RFC 8301)",
                fix=f"make a {RECOMMENDED_BITS}-bit key and publish it under a new selector"))
        elif key.key_type == "rsa" and (key.bits or 0) < RECOMMENDED_BITS:
            f.findings.append(Finding(
                d, "dkim", WARN, f"{name}: RSA {key.bits} bits: accepted today, but "
                f"{RECOMMENDED_BITS} is the recommended size",
                fix=f"rotate to a {RECOMMENDED_BITS}-bit key under a new selector (postroom "
                f"dkim keygen --domain {d} --selector NEW), then retire this one"))
        else:
            f.findings.append(Finding(d, "dkim", OK, f"{name}: {key.key_type.upper()} "
                                      f"{key.bits} bits"))
    if not found:
        f.findings.append(Finding(
            d, "dkim", WARN, f"no DKIM key found at the {len(selectors)} selectors tried "
            f"({', '.join(selectors[:6])}...)",
            fix=sign.advice() if sign.signers else f"have your provider sign for {d} (its "
            f"DKIM set-up page), or {sign.advice()}"))


# -- DMARC ---------------------------------------------------------------------------------------
def _dmarc(resolver: Resolver, f: DomainFacts) -> None:
    d = f.domain
    pol, note = dmarc.lookup(resolver, d)
    f.dmarc, f.dmarc_note = pol, note
    rua = dmarc.report_uri(d)
    if pol is None:
        f.findings.append(Finding(
            d, "dmarc", WARN, f"no DMARC policy ({note}): receivers decide alone what to do "
            "with forged mail, and you get no reports (Gmail and Yahoo require DMARC from "
            "bulk senders)",
            fix="start by monitoring (p=none with reports), then move to quarantine or reject "
            f"once the reports show only your own mail; rua= is where the reports go: "
            f"{rua.removeprefix('mailto:')} must be a mailbox you read (or put yours)",
            record=Record(f"_dmarc.{d}", "TXT", f"v=DMARC1; p=none; rua={rua}")))
        return
    where = f"_dmarc.{pol.domain}" + (" (inherited from the organizational domain)"
                                      if pol.inherited else "")
    summary = (f"{where}: p={pol.applies()}, DKIM alignment "
               f"{'strict' if pol.adkim == 's' else 'relaxed'}, SPF alignment "
               f"{'strict' if pol.aspf == 's' else 'relaxed'}"
               + (f", pct={pol.pct}" if pol.pct != 100 else ""))
    if pol.problems:
        f.findings.append(Finding(d, "dmarc", FAIL, f"{summary}: " + "; ".join(pol.problems),
                                  fix="publish one record of the form shown",
                                  record=Record(f"_dmarc.{pol.domain}", "TXT",
                                                f"v=DMARC1; p=none; rua={rua}")))
    elif pol.applies() == "none":
        f.findings.append(Finding(
            d, "dmarc", INFO, f"{summary}: monitoring only, forged mail is still delivered",
            fix="once the aggregate reports show only your own mail, raise the policy to "
            "p=quarantine, then p=reject"))
    else:
        f.findings.append(Finding(d, "dmarc", OK, summary))
