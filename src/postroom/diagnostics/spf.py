"""SPF (RFC 7208): parse a record, evaluate ``check_host()`` for an address, and walk a
domain's whole record tree the way a receiver would count it.

Two questions for the doctor:

- :func:`check_host`: would a receiver's SPF check pass mail from this IP with this
  envelope sender? (Evaluated as RFC 7208 section 4 says: terms left to right, the
  10-DNS-lookup limit over include/a/mx/ptr/exists/redirect, at most 10 MX or PTR names per
  term, at most 2 void lookups, macros of section 7.)
- :func:`analyze`: the whole tree at once: every record reached through include and
  redirect, the lookups it costs in the worst case (an address that matches nothing walks
  every term), void lookups, loops, syntax errors, and every domain included, so that a
  provider's documented include (``include:sendgrid.net``) can be looked for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from postroom.diagnostics.dns import Resolver

MAX_LOOKUPS = 10  # RFC 7208 4.6.4
MAX_VOID = 2  # RFC 7208 4.6.4 (SHOULD)
MAX_NAMES = 10  # MX or PTR names evaluated per term
PASS, FAIL, SOFTFAIL, NEUTRAL = "pass", "fail", "softfail", "neutral"
NONE, PERMERROR, TEMPERROR = "none", "permerror", "temperror"
_QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}
_LOOKUP_TERMS = {"include", "a", "mx", "ptr", "exists", "redirect"}
_MECHANISMS = {"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"}
_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$")
_MACRO = re.compile(r"%(?:\{([slodiphcrtvSLODIPHCRTV])(\d*)(r?)([.\-+,/_=]*)\}|(.))")


class SPFError(Exception):
    """Ends an evaluation with permerror or temperror."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(frozen=True)
class Term:
    text: str
    qualifier: str  # pass | fail | softfail | neutral ("" for modifiers)
    name: str  # mechanism or modifier name, lower case
    value: str  # domain-spec, IP network, or "" (the default)
    cidr4: int | None = None
    cidr6: int | None = None

    @property
    def modifier(self) -> bool:
        return self.qualifier == ""


@dataclass(frozen=True)
class Record:
    text: str
    terms: tuple[Term, ...]

    @property
    def mechanisms(self) -> list[Term]:
        return [t for t in self.terms if not t.modifier]

    def modifier(self, name: str) -> Term | None:
        return next((t for t in self.terms if t.modifier and t.name == name), None)

    @property
    def all_term(self) -> Term | None:
        return next((t for t in self.terms if t.name == "all" and not t.modifier), None)


def is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def _cidr(spec: str, term: str) -> tuple[str, int | None, int | None]:
    """Split "domain/24//64" into ("domain", 24, 64)."""
    c4 = c6 = None
    m = re.search(r"(?:/(\d+))?(?://(\d+))?$", spec)
    if m and m.group(0):
        spec = spec[: m.start()]
        if m.group(1) is not None:
            c4 = int(m.group(1))
            if c4 > 32:
                raise SPFError(PERMERROR, f"{term}: IPv4 prefix /{c4} is longer than 32")
        if m.group(2) is not None:
            c6 = int(m.group(2))
            if c6 > 128:
                raise SPFError(PERMERROR, f"{term}: IPv6 prefix //{c6} is longer than 128")
    return spec, c4, c6


def parse(text: str) -> Record:
    """Parse one SPF record; raises SPFError(permerror) saying which term is wrong."""
    if not is_spf(text):
        raise SPFError(PERMERROR, f"not an SPF record (must start with v=spf1): {text[:60]!r}")
    terms: list[Term] = []
    seen_mod: set[str] = set()
    for raw in text.split()[1:]:
        m = _MODIFIER.match(raw)
        if m and m.group(1).lower() not in _MECHANISMS:
            name = m.group(1).lower()
            if name in ("redirect", "exp"):
                if name in seen_mod:
                    raise SPFError(PERMERROR, f"{name}= appears twice")
                if not m.group(2):
                    raise SPFError(PERMERROR, f"{raw}: {name}= needs a domain")
                _check_macros(m.group(2), raw)
            seen_mod.add(name)
            terms.append(Term(raw, "", name, m.group(2)))  # unknown modifiers: ignored
            continue
        qual = "+"
        body = raw
        if body[:1] in _QUALIFIERS:
            qual, body = body[0], body[1:]
        name, sep, arg = body.partition(":")
        name = name.lower()
        if "/" in name:  # "a/24", "mx/24//64": a CIDR on the default domain
            name, slash, rest = name.partition("/")
            arg, sep = slash + rest, ""
        if name not in _MECHANISMS:
            raise SPFError(PERMERROR, f"unknown mechanism {raw!r}")
        qualifier = _QUALIFIERS[qual]
        if name == "all":
            if sep or arg:
                raise SPFError(PERMERROR, f"{raw}: 'all' takes no argument")
            terms.append(Term(raw, qualifier, name, ""))
        elif name in ("ip4", "ip6"):
            try:
                net = ipaddress.ip_network(arg, strict=False)
            except ValueError:
                raise SPFError(PERMERROR, f"{raw}: {arg!r} is not an IP address or "
                                          "network") from None
            if (net.version == 4) != (name == "ip4"):
                raise SPFError(PERMERROR, f"{raw}: an IPv{net.version} address under {name}")
            terms.append(Term(raw, qualifier, name, str(net)))
        elif name in ("include", "exists"):
            if not sep or not arg:
                raise SPFError(PERMERROR, f"{raw}: {name} needs a domain ({name}:example.com)")
            _check_macros(arg, raw)
            terms.append(Term(raw, qualifier, name, arg))
        else:  # a, mx, ptr: optional domain, a and mx optional CIDR lengths
            if sep and not arg:
                raise SPFError(PERMERROR, f"{raw}: empty domain after ':'")
            spec, c4, c6 = (_cidr(arg, raw) if name != "ptr" else (arg, None, None))
            if spec:
                _check_macros(spec, raw)
            terms.append(Term(raw, qualifier, name, spec, c4, c6))
    return Record(text, tuple(terms))


def _check_macros(spec: str, term: str) -> None:
    i = spec.find("%")
    while i != -1:
        m = _MACRO.match(spec, i)
        if m is None or (m.group(5) is not None and m.group(5) not in "%_-"):
            raise SPFError(PERMERROR, f"{term}: bad macro at {spec[i:i + 8]!r}")
        i = spec.find("%", m.end())


# -- macros (section 7) ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Who:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str

    @property
    def local(self) -> str:
        return self.sender.rpartition("@")[0] or "postmaster"

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2]


def expand(spec: str, who: _Who, domain: str) -> str:
    def letter(ch: str) -> str:
        ch = ch.lower()
        if ch == "s":
            return f"{who.local}@{who.sender_domain}"
        if ch == "l":
            return who.local
        if ch == "o":
            return who.sender_domain
        if ch == "d":
            return domain
        if ch in ("i", "c"):
            if who.ip.version == 4:
                return str(who.ip)
            return ".".join(who.ip.exploded.replace(":", ""))
        if ch == "v":
            return "in-addr" if who.ip.version == 4 else "ip6"
        if ch == "h":
            return who.helo
        return "unknown"  # p (validated name: discouraged, RFC 7208 5.5), r, t

    def sub(m: re.Match[str]) -> str:
        if m.group(5) is not None:
            return {"%": "%", "_": " ", "-": "%20"}[m.group(5)]
        value = letter(m.group(1))
        delims = m.group(4) or "."
        parts = re.split("[" + re.escape(delims) + "]", value)
        if m.group(3):
            parts.reverse()
        if m.group(2):
            keep = int(m.group(2))
            if keep == 0:
                raise SPFError(PERMERROR, f"macro {m.group(0)}: a digit of 0")
            parts = parts[-keep:]
        return ".".join(parts)

    out = _MACRO.sub(sub, spec)
    while len(out) > 253 and "." in out:  # RFC 7208 7.3: drop labels from the left
        out = out.split(".", 1)[1]
    return out


# -- check_host (section 4) ---------------------------------------------------------------------
@dataclass
class Result:
    result: str
    domain: str
    ip: str
    reason: str = ""
    matched: str | None = None  # the term that decided, "domain: term"
    lookups: int = 0
    void_lookups: int = 0
    trace: list[str] = field(default_factory=list)


@dataclass
class _Run:
    resolver: Resolver
    who: _Who
    lookups: int = 0
    void: int = 0
    trace: list[str] = field(default_factory=list)

    def count(self, term: Term, domain: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise SPFError(PERMERROR, f"more than {MAX_LOOKUPS} DNS lookups (at {domain}: "
                                      f"{term.text}); receivers treat the record as broken")

    def void_hit(self, what: str) -> None:
        self.void += 1
        if self.void > MAX_VOID:
            raise SPFError(PERMERROR, f"more than {MAX_VOID} lookups found nothing (last: "
                                      f"{what}); receivers treat the record as broken")


def record_for(resolver: Resolver, domain: str) -> tuple[str, Record | None, str]:
    """(status, record, reason): status is "ok", NONE, TEMPERROR or PERMERROR."""
    ans, texts = resolver.txt(domain)
    if ans.temporary:
        return TEMPERROR, None, ans.describe()
    spf = [t for t in texts if is_spf(t)]
    if not spf:
        return NONE, None, f"{domain} publishes no SPF record"
    if len(spf) > 1:
        return PERMERROR, None, (f"{domain} publishes {len(spf)} SPF records: two SPF records "
                                 "on one name are themselves an error, receivers return "
                                 "permerror and SPF fails for all its mail (RFC 7208 3.2)")
    try:
        return "ok", parse(spf[0]), ""
    except SPFError as err:
        return PERMERROR, None, f"{domain}: {err.reason}"


def check_host(resolver: Resolver, ip: str, domain: str, sender: str = "",
               helo: str = "") -> Result:
    """The SPF result for mail from ``ip`` with envelope sender ``sender`` (default
    postmaster@domain) checked against ``domain``."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    who = _Who(addr, sender or f"postmaster@{domain}", helo or domain)
    run = _Run(resolver, who)
    try:
        result, matched = _check(run, domain, depth=0)
        reason = ""
    except SPFError as err:
        result, matched, reason = err.result, None, err.reason
    return Result(result, domain, str(addr), reason, matched, run.lookups, run.void, run.trace)


def _check(run: _Run, domain: str, depth: int) -> tuple[str, str | None]:
    if depth > MAX_LOOKUPS:
        raise SPFError(PERMERROR, f"include/redirect loop at {domain}")
    status, rec, reason = record_for(run.resolver, domain)
    if rec is None:
        if status == NONE:
            return NONE, None
        raise SPFError(status, reason)
    run.trace.append(f"{domain}: {rec.text}")
    for term in rec.mechanisms:
        if _matches(run, term, domain, depth):
            run.trace.append(f"{domain}: matched {term.text} -> {term.qualifier}")
            return term.qualifier, f"{domain}: {term.text}"
    redirect = rec.modifier("redirect")
    if redirect is not None and rec.all_term is None:
        run.count(redirect, domain)
        target = expand(redirect.value, run.who, domain)
        result, matched = _check(run, target, depth + 1)
        if result == NONE:
            raise SPFError(PERMERROR, f"redirect={target}: {target} has no SPF record")
        return result, matched
    return NEUTRAL, None


def _net_match(ips: list[str], who: _Who, term: Term) -> bool:
    for text in ips:
        ip = ipaddress.ip_address(text)
        if ip.version != who.ip.version:
            continue
        bits = term.cidr4 if ip.version == 4 else term.cidr6
        prefix = ip.max_prefixlen if bits is None else bits
        if who.ip in ipaddress.ip_network(f"{ip}/{prefix}", strict=False):
            return True
    return False


def _matches(run: _Run, term: Term, domain: str, depth: int) -> bool:
    who = run.who
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        net = ipaddress.ip_network(term.value)
        return net.version == who.ip.version and who.ip in net
    run.count(term, domain)
    target = expand(term.value, who, domain) if term.value else domain
    family = "A" if who.ip.version == 4 else "AAAA"
    if name == "include":
        result, _ = _check(run, target, depth + 1)
        if result == PASS:
            return True
        if result == NONE:
            raise SPFError(PERMERROR, f"include:{target}: {target} has no SPF record")
        if result in (PERMERROR, TEMPERROR):
            raise SPFError(result, f"include:{target} failed")
        return False
    if name in ("a", "exists"):
        ans = run.resolver.query(target, "A" if name == "exists" else family)
        if ans.temporary:
            raise SPFError(TEMPERROR, ans.describe())
        if ans.void:
            run.void_hit(f"{term.text} ({ans.describe()})")
            return False
        if name == "exists":
            return True
        return _net_match([r.address for r in ans.records], who, term)
    if name == "mx":
        ans, hosts = run.resolver.mx(target)
        if ans.temporary:
            raise SPFError(TEMPERROR, ans.describe())
        if ans.void:
            run.void_hit(f"{term.text} ({ans.describe()})")
            return False
        if len(hosts) > MAX_NAMES:
            raise SPFError(PERMERROR, f"{term.text}: {target} has {len(hosts)} MX hosts, "
                                      f"more than {MAX_NAMES}")
        for _, host in hosts:
            if host and _net_match(run.resolver.addresses(host, (family,)), who, term):
                return True
        return False
    if name == "ptr":  # discouraged (RFC 7208 5.5) but still evaluated
        for host in run.resolver.ptr(str(who.ip))[:MAX_NAMES]:
            if (host.lower() == target.lower() or host.lower().endswith("." + target.lower())) \
                    and str(who.ip) in run.resolver.addresses(host, (family,)):
                return True
        return False
    return False


# -- the whole tree ------------------------------------------------------------------------------
@dataclass
class Analysis:
    domain: str
    status: str  # "ok", NONE, PERMERROR, TEMPERROR
    record: Record | None = None
    reason: str = ""
    records: list[str] = field(default_factory=list)  # every v=spf1 text at the name
    lookups: int = 0  # worst case: an address that matches nothing
    void_lookups: int = 0
    includes: list[str] = field(default_factory=list)  # every include/redirect target
    problems: list[str] = field(default_factory=list)
    tree: list[str] = field(default_factory=list)  # "  include:x -> v=spf1 ..." lines

    @property
    def all_qualifier(self) -> str | None:
        """The top record's final ``all`` (or the redirect target's), None if missing."""
        term = self.record.all_term if self.record else None
        return term.qualifier if term else None


def analyze(resolver: Resolver, domain: str) -> Analysis:
    status, rec, reason = record_for(resolver, domain)
    out = Analysis(domain, status, rec, reason)
    _, texts = resolver.txt(domain)  # cached: record_for just asked
    out.records = [t for t in texts if is_spf(t)]
    if rec is None:
        return out
    return _analyze(resolver, domain, rec, out)


def analyze_text(resolver: Resolver, domain: str, text: str) -> Analysis:
    """The cost of a record not published yet (the doctor's merged record), walked as if
    ``domain`` published it."""
    try:
        rec = parse(text)
    except SPFError as err:
        return Analysis(domain, PERMERROR, None, err.reason, [text])
    return _analyze(resolver, domain, rec, Analysis(domain, "ok", rec, "", [text]))


def _analyze(resolver: Resolver, domain: str, rec: Record, out: Analysis) -> Analysis:
    out.tree.append(f"{domain}: {rec.text}")
    _walk(resolver, rec, domain, out, depth=1, seen={domain.lower()})
    if out.lookups > MAX_LOOKUPS:
        out.problems.append(
            f"the record needs {out.lookups} DNS lookups; receivers stop at {MAX_LOOKUPS} "
            "and treat it as broken (permerror), so SPF fails for everyone")
    if out.void_lookups > MAX_VOID:
        out.problems.append(
            f"{out.void_lookups} lookups find nothing (void); receivers may stop at "
            f"{MAX_VOID} and treat the record as broken")
    top_all = rec.all_term
    if top_all is not None and top_all.qualifier == PASS:
        out.problems.append("'+all' (or 'all') authorises every server on the internet")
    if out.problems and out.status == "ok":
        out.status = PERMERROR if out.lookups > MAX_LOOKUPS or out.void_lookups > MAX_VOID \
            else out.status
    return out


def _targets(rec: Record) -> Iterator[Term]:
    for t in rec.terms:
        if t.name in _LOOKUP_TERMS and (not t.modifier or t.name == "redirect"):
            yield t


def _walk(resolver: Resolver, rec: Record, domain: str, out: Analysis, depth: int,
          seen: set[str]) -> None:
    indent = "  " * depth
    for term in _targets(rec):
        if term.name == "redirect" and rec.all_term is not None:
            continue  # ignored when 'all' is present (RFC 7208 6.1)
        out.lookups += 1
        spec = term.value or domain
        if "%" in spec:  # depends on the sender or the address: not walked
            out.tree.append(f"{indent}{term.text}: macro, evaluated per message")
            continue
        target = spec.lower()
        if term.name in ("include", "redirect"):
            out.includes.append(target)
            if target in seen:
                out.problems.append(f"{domain}: {term.text} loops back to {target}")
                continue
            status, sub, reason = record_for(resolver, target)
            if sub is None:
                why = reason if status != NONE else f"{target} has no SPF record"
                out.problems.append(f"{domain}: {term.text}: {why}")
                out.tree.append(f"{indent}{term.text}: {why}")
                if status == TEMPERROR:
                    out.status = TEMPERROR
                elif out.status == "ok":
                    out.status = PERMERROR
                continue
            out.tree.append(f"{indent}{term.text} -> {sub.text}")
            _walk(resolver, sub, target, out, depth + 1, seen | {target})
        elif term.name == "mx":
            ans, hosts = resolver.mx(target)
            if ans.void:
                out.void_lookups += 1
            if len(hosts) > MAX_NAMES:
                out.problems.append(f"{domain}: {term.text}: {len(hosts)} MX hosts, more than "
                                    f"{MAX_NAMES}")
        elif term.name in ("a", "exists"):
            ans = resolver.query(target, "A")
            if ans.void and (term.name == "exists" or resolver.query(target, "AAAA").void):
                out.void_lookups += 1
                out.tree.append(f"{indent}{term.text}: {ans.describe()}")


# -- one record per name -------------------------------------------------------------------------
def merge(texts: Sequence[str], mechanisms: Iterable[str] = ()) -> str:
    """The one record to publish at a name: every term of ``texts`` (what the name publishes:
    one record, or several published by mistake) in their order without repeats, then
    ``mechanisms`` (what the connections need) before the final ``all`` or ``redirect=``,
    where receivers read them (RFC 7208 5.1: nothing after ``all`` is evaluated).

    The ``all`` is the records' own when they agree on ``-all`` or ``~all``, else ``~all``
    (a missing, neutral ``?all`` or ``+all`` protects nothing). A lone record's
    ``redirect=`` without ``all`` is kept last; once records are merged, each redirect
    becomes an ``include:`` (only one redirect may exist, RFC 7208 6.1)."""
    terms: list[str] = []
    modifiers: dict[str, str] = {}
    alls: list[str] = []
    redirects: list[str] = []
    for text in texts:
        for raw in text.split()[1:]:
            low = raw.lower()
            if low.lstrip("+-~?") == "all":
                alls.append(low if low[0] in "+-~?" else "+" + low)
            elif low.startswith("redirect="):
                redirects.append(raw.partition("=")[2])
            elif _MODIFIER.match(raw) and raw.partition("=")[0].lower() not in _MECHANISMS:
                modifiers.setdefault(raw.partition("=")[0].lower(), raw)  # exp=: the first
            else:
                terms.append(raw)
    for mechanism in mechanisms:
        terms += mechanism.split()
    tail: list[str] = []
    if len(texts) == 1 and not alls and len(redirects) == 1:
        tail = [f"redirect={redirects[0]}"]
    else:
        terms += [f"include:{r}" for r in redirects]
        tail = [alls[0] if len(set(alls)) == 1 and alls[0] in ("-all", "~all") else "~all"]
    seen: set[str] = set()
    unique = []
    for t in terms:
        key = t.lower().removeprefix("+")
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return " ".join(["v=spf1", *unique, *tail, *modifiers.values()])
