"""DMARC (RFC 7489): find the policy that governs a From domain and judge alignment.

The record is looked up at ``_dmarc.<From domain>``, then at the organizational domain's
(section 6.6.3). The organizational domain is found without the Public Suffix List (no
download, nothing remote): the last two labels, or three under the common two-level
public suffixes (co.uk, com.au...). That is right for the domains people send from; a
domain under a rarer suffix gets its own name's record checked, which is also what most
senders publish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postroom.diagnostics.dns import Resolver

# Second-level labels that are public suffixes under many country TLDs (co.uk, com.au,
# ac.jp, gov.br...): the organizational domain is one label deeper there.
_SECOND_LEVEL = {"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or", "go", "gob",
                 "mil", "ltd", "plc", "nic", "sch", "nom", "gen", "biz", "info"}
POLICIES = ("none", "quarantine", "reject")


def org_domain(domain: str) -> str:
    labels = domain.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL \
        else 2
    return ".".join(labels[-keep:])


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): strict is the same name, relaxed the same
    organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
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
    org = org_domain(domain)
    candidates = [domain] if org == domain.lower() else [domain, org]
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
        f" or _dmarc.{org}" if org != domain.lower() else "")
