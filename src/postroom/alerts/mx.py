"""The email channel's direct path: an alert handed straight to a recipient domain's MX
hosts, as one mail server hands mail to another (RFC 5321 section 5), with no connection of
the user's in between.

The MX hosts come from DNS (postroom.diagnostics.dns: this machine's resolver or the one the
rule names), by preference; a domain without MX records is its own MX (RFC 5321 5.1); a
null MX (RFC 7505) or a domain that does not exist takes no mail. Each MX gets the alert
through Postroom's own SMTP transport (postroom.transports.smtp), to an address DNS gave
(the system resolver may not know a split-horizon name), with STARTTLS and its certificate
checked against the MX's name; only an MX that offers no STARTTLS at all gets it in clear,
as from any mail server's opportunistic TLS (RFC 3207, RFC 7435).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from postroom.diagnostics.dns import NXDOMAIN, Resolver
from postroom.envelope import Envelope
from postroom.exceptions import ConnectError, PostroomError
from postroom.transports import smtp
from postroom.transports.base import DeliveryResult, TransportContext

MAX_HOSTS = 5  # MX hosts of one domain tried, by preference
MAX_ADDRESSES = 2  # addresses of one MX host tried
CONNECT_TIMEOUT = 10.0  # an MX that does not answer is given up soon: other paths wait
TIMEOUT = 30.0
NO_STARTTLS = "tls.starttls_unavailable"  # postroom.transports.smtp's code for it


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    addresses: tuple[str, ...]


def hosts(resolver: Resolver, domain: str) -> tuple[list[Host], str]:
    """(the MX hosts of ``domain`` by preference, with their addresses; why there are none).
    Blocking: DNS queries."""
    if domain.startswith("[") and domain.endswith("]"):  # an address literal (RFC 5321 4.1.3)
        ip = domain[1:-1].removeprefix("IPv6:")
        return [Host(ip, (ip,))], ""
    answer, found = resolver.mx(domain)
    if answer.temporary or answer.status == NXDOMAIN:
        return [], answer.describe()
    if any(not name for _, name in found):
        return [], f"{domain} takes no mail (null MX, RFC 7505)"
    names = [name for _, name in found] or [domain]
    return [Host(n, tuple(resolver.addresses(n))) for n in names[:MAX_HOSTS]], ""


@dataclass(frozen=True, slots=True)
class Sent:
    """What one MX said, and how the alert went to it (for the alert's text)."""

    result: DeliveryResult
    how: str


async def send(host: Host, port: int, ctx: TransportContext,
               build: Callable[[str], Envelope]) -> Sent:
    """Deliver to ``host``: each address in turn, STARTTLS first. ``build(how)`` makes the
    message, which says how it came. Raises the last PostroomError when none took it."""
    last: PostroomError = ConnectError(f"MX {host.name} has no address in DNS",
                                       code="connect.dns")
    ways: tuple[tuple[smtp.Security, str], ...] = (
        ("starttls", f"sent direct to MX {host.name} over TLS"),
        ("none", f"sent direct to MX {host.name}, in clear (it offers no STARTTLS)"))
    for ip in host.addresses[:MAX_ADDRESSES]:
        for security, how in ways:
            transport = smtp.Transport(smtp.Settings(
                name="alert-mx", transport="smtp", host=ip, port=port, security=security,
                tls_server_name=host.name, connect_timeout=CONNECT_TIMEOUT, timeout=TIMEOUT,
                pool_size=1), ctx)
            try:
                return Sent(await transport.send(build(how)), how)
            except PostroomError as err:
                last = err
                if err.code != NO_STARTTLS:
                    break  # this address failed: the next one (not in clear: TLS broke)
            finally:
                await transport.aclose()
    raise last
