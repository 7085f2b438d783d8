"""DMARC (RFC 7489): find the policy that governs a From domain and judge alignment.

The record is looked up at ``_dmarc.<From domain>``, then at the organizational domain's
(section 6.6.3). The organizational domain (section 3.2) is the public suffix plus one label,
the public suffix coming from the Public Suffix List that the ``publicsuffixlist`` package
ships: nothing is fetched at run time, and the list is brought up to date by upgrading that
package (it is released with each change of the list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from postroom.diagnostics.dns import Resolver
from postroom.exceptions import MessageError
from postroom.idn import ascii_domain

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

POLICIES = ("none", "quarantine", "reject")


@cache
def _suffixes() -> PublicSuffixList:
    """The list, parsed once and only when a DMARC question is asked: parsing it takes
    memory and time that `serve`, which never asks, must not pay.

    The whole list, its private section included: RFC 7489 names the Public Suffix List
    without narrowing it, and the private entries are exactly the names under which
    strangers register (foo.github.io and bar.github.io have different owners). Reading
    only the ICANN section would make them one organizational domain, so that one could
    pass relaxed alignment for the other. A TLD missing from the list counts as a public
    suffix (the list's own "*" rule), so names under .test or a new TLD still work."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(accept_unknown=True)


def org_domain(domain: str) -> str:
    """The organizational domain of ``domain``, lower-cased, in the form it was given
    (U-labels stay Unicode, A-labels stay punycode: the list matches both). A name that is
    itself a public suffix (co.uk, github.io) is its own organizational domain."""
    name = domain.lower().rstrip(".")
    return _suffixes().privatesuffix(name) or name


def ascii_name(domain: str) -> str:
    """One spelling for names that may be written as U-labels or A-labels (the A-labels,
    which is also what a URI in a record must use)."""
    name = domain.lower().rstrip(".")
    try:
        return ascii_domain(name)
    except MessageError:
        # Not a valid IDN: compared as written; the DNS lookups report the name itself.
        return name


def report_uri(domain: str) -> str:
    """The rua= address suggested for ``domain``: one mailbox at its organizational domain,
    which its subdomains' reports can share, as an ASCII mailto: URI (a URI has no
    Unicode form)."""
    return f"mailto:dmarc-reports@{ascii_name(org_domain(domain))}"


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): strict is the same name, relaxed the same
    organizational domain."""
    a, b = ascii_name(a), ascii_name(b)
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


@dataclass
class Policy:
    domain: str  # where the record was found (the From domain or its organizational domain)
    text: str
    tags: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    inherited: bool = False  # found at the organizational domain

    @property
    def p(self) -> str:
        value = self.tags.get("p", "").lower()
        return value if value in POLICIES else "none"

    def applies(self) -> str:
        """The policy for the looked-up domain: sp= for a subdomain when inherited."""
        if self.inherited:
            sp = self.tags.get("sp", "").lower()
            if sp in POLICIES:
                return sp
        return self.p

    @property
    def adkim(self) -> str:
        return "s" if self.tags.get("adkim", "r").lower() == "s" else "r"

    @property
    def aspf(self) -> str:
        return "s" if self.tags.get("aspf", "r").lower() == "s" else "r"

    @property
    def pct(self) -> int:
        try:
            return max(0, min(100, int(self.tags.get("pct", "100"))))
        except ValueError:
            return 100


def parse(domain: str, text: str) -> Policy:
    pol = Policy(domain, text)
    parts = [p.strip() for p in text.split(";") if p.strip()]
    for i, part in enumerate(parts):
        k, eq, v = part.partition("=")
        if not eq:
            pol.problems.append(f"{part!r} is not a tag=value pair")
            continue
        k = k.strip().lower()
        if i == 0 and (k != "v" or v.strip() != "DMARC1"):
            pol.problems.append("the record must start with v=DMARC1")
        pol.tags[k] = v.strip()
    if pol.tags.get("p", "").lower() not in POLICIES:
        given = pol.tags.get("p")
        pol.problems.append(f"p={given} is not none, quarantine or reject" if given
                            else "p= (the policy) is missing; receivers read it as p=none")
    for tag in ("adkim", "aspf"):
        if tag in pol.tags and pol.tags[tag].lower() not in ("r", "s"):
            pol.problems.append(f"{tag}={pol.tags[tag]} must be r (relaxed) or s (strict)")
    return pol


def lookup(resolver: Resolver, domain: str) -> tuple[Policy | None, str]:
    """(policy, note): the policy that applies to mail From ``domain``; the note says where
    it was found or why none was."""
    domain = domain.lower().rstrip(".")
    org = org_domain(domain)
    candidates = [domain] if org == domain else [domain, org]
    for i, name in enumerate(candidates):
        ans, texts = resolver.txt(f"_dmarc.{name}")
        if ans.temporary:
            return None, ans.describe()
        records = [t for t in texts if t.replace(" ", "").upper().startswith("V=DMARC1")]
        if len(records) > 1:
            pol = parse(name, records[0])
            pol.problems.append(f"_dmarc.{name} has {len(records)} DMARC records; receivers "
                                "ignore them all (publish exactly one)")
            pol.inherited = i > 0
            return pol, f"_dmarc.{name}"
        if records:
            pol = parse(name, records[0])
            pol.inherited = i > 0
            return pol, f"_dmarc.{name}"
    return None, f"no DMARC record at _dmarc.{domain}" + (
        f" or _dmarc.{org}" if org != domain else "")
