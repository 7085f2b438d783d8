"""Connectivity probe: which SMTP ports of a host answer, how, and which one to use.

For each port, in parallel and under one overall deadline: DNS (A/AAAA, system resolver),
TCP (open / refused / dropped / unreachable), the banner and the time to it, EHLO
capabilities before and after TLS, the STARTTLS or implicit-TLS handshake (version, cipher,
certificate subject/SANs against the host name, expiry, chain trusted or not), and a verdict.
A port that answers the other way than its number suggests is recognised: 465 sending a
plain-text banner ("wrong version number" for a TLS client), or a port that stays silent
until the client starts TLS. Then one recommendation: "use 465 implicit TLS, AUTH PLAIN
LOGIN".

Trust is judged by a verifying handshake (the system CAs or ``ca_file``, exactly what the
SMTP transport will use); when it fails, the session is repeated with verification off to
collect the facts (who issued the certificate, for which names, until when), so that a
certificate problem is explained rather than only detected. Names and expiry are judged
from the certificate itself (tlsinfo).

No credentials are ever sent: the probe stops after EHLO and says QUIT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from postroom.diagnostics import https as https_mod
from postroom.diagnostics import net
from postroom.diagnostics.report import (
    PortResult,
    ProbeReport,
    Recommendation,
    Verdict,
    mechanisms,
    overall,
    recommend,
)
from postroom.diagnostics.tlsinfo import session_facts
from postroom.exceptions import ConfigError
from postroom.smtpwire import Closed, Garbled, Wire, capabilities

__all__ = ["DEFAULT_PORTS", "IMPLICIT_TLS_PORTS", "PortResult", "ProbeReport", "Recommendation",
           "Verdict", "probe", "probe_sync"]

DEFAULT_PORTS: tuple[int, ...] = (25, 465, 587, 2525)
IMPLICIT_TLS_PORTS: frozenset[int] = frozenset({465})  # RFC 8314 submissions
DEFAULT_TIMEOUT = 10.0
DEFAULT_BANNER_WAIT = 3.0  # silence this long on a plain port: try TLS (implicit TLS there?)
_CONNECTIONS_PER_PORT = 4  # a mode switch and an unverified retry at most


def _not_tls(err: ssl.SSLError) -> bool:
    """The handshake read something that is not TLS: a plain-text greeting, typically."""
    text = f"{err.reason or ''} {err}".upper()
    return any(k in text for k in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                                   "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"))


@dataclass
class _Step:
    """What to do next on a new connection."""

    mode: str  # "smtps" or "plain"
    verify: bool


class _PortProber:
    """The conversation with one port, over as many connections as it takes (bounded)."""

    def __init__(self, probe: _Probe, result: PortResult) -> None:
        self.p = probe
        self.r = result
        self.connected_at = 0.0
        self.mode_noted = False
        self.guessing = False  # sent a TLS handshake to a port that stayed silent

    async def run(self) -> None:
        r = self.r
        step: _Step | None = _Step("smtps" if r.port in self.p.implicit_ports else "plain",
                                   True)
        guess = True  # may silence on a plain port mean "implicit TLS"? The first time only.
        for _ in range(_CONNECTIONS_PER_PORT):
            assert step is not None
            r.stage = "connect"
            self.connected_at = time.monotonic()  # time to banner counts from here
            conn = await net.connect(self.p.addresses, r.port)
            if isinstance(conn, net.NotConnected):
                self._not_connected(conn)
                return
            if r.tcp is None:
                r.tcp, r.address, r.connect_ms = net.Reach.OPEN, str(conn.address), conn.connect_ms
            sess = Wire(conn.reader, conn.writer, r.transcript)
            r.transcript.append(f"*  connected to {conn.address}:{r.port} "
                                f"in {conn.connect_ms:.0f} ms")
            try:
                if step.mode == "smtps":
                    step = await self._implicit(sess, step.verify, guessed=False)
                else:
                    step = await self._plain(sess, step.verify, guess)
            except Closed as err:
                r.verdict, r.error, step = self._failed_at(), f"{r.stage}: {err}", None
            except Garbled as err:
                r.verdict, r.error, step = Verdict.NOT_SMTP, str(err), None
            except OSError as err:  # reset, broken pipe...
                r.verdict, r.error, step = self._failed_at(), f"{r.stage}: {err}", None
            finally:
                await sess.close(0.3)
            if step is None:
                return
            guess = False
        r.verdict, r.error = Verdict.ERROR, f"gave up after {_CONNECTIONS_PER_PORT} connections"

    def _not_connected(self, conn: net.NotConnected) -> None:
        r = self.r
        if r.tcp is None:  # the first connection: this is the port's answer
            r.tcp = conn.reach
            r.address = str(conn.address) if conn.address else None
            r.verdict, r.error = _connect_verdict(conn.reach), conn.error
        else:  # it answered before; connecting again (to learn more) failed
            r.verdict = Verdict.CERTIFICATE if r.trust_error else Verdict.ERROR
            r.error = f"connecting again failed: {conn.error}"

    def _failed_at(self) -> Verdict:
        return Verdict.TLS_FAILED if self.r.stage in ("tls", "starttls") else Verdict.NOT_SMTP

    async def _handshake(self, sess: Wire, verify: bool) -> None:
        """TLS on this connection; on return, ``r.tls`` holds the facts and judgements."""
        r, p = self.r, self.p
        r.stage = "tls"
        t0 = time.monotonic()
        await sess.start_tls(p.verify_ctx if verify else p.facts_ctx, p.server_name)
        obj = sess.writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        r.tls = session_facts(obj.version(), obj.cipher(), obj.getpeercert(binary_form=True),
                              p.server_name, trusted=verify, trust_error=r.trust_error)
        r.tls.handshake_ms = (time.monotonic() - t0) * 1000
        sess.transcript.append(f"*  TLS {r.tls.version} {r.tls.cipher}")

    async def _tls(self, sess: Wire, verify: bool, mode: str,
                   guessed: bool) -> _Step | Literal[True] | None:
        """Handshake: True when it worked, else the next step (None: stop here)."""
        r = self.r
        try:
            await self._handshake(sess, verify)
        except ssl.SSLCertVerificationError as err:
            self._tls_answered(guessed)
            r.trust_error = err.verify_message or str(err)
            sess.transcript.append(f"*  certificate not trusted: {r.trust_error}; "
                            "again without verification, to see the certificate")
            return _Step(mode, False)
        except ssl.SSLError as err:
            sess.transcript.append(f"*  TLS handshake: {err.reason or err}")
            if mode == "smtps" and _not_tls(err):
                # The server spoke first, in plain text: an SMTP greeting, so this port
                # wants STARTTLS (or it is just slow to greet, when we guessed).
                if not guessed:
                    self.mode_noted = True
                    r.notes.append(f"port {r.port} does not start with TLS: it greets in plain "
                                   "text, so it wants STARTTLS (security = \"starttls\")")
                return _Step("plain", verify)
            r.verdict, r.error = Verdict.TLS_FAILED, f"TLS handshake failed: {err.reason or err}"
            if guessed:  # silent in plain text and no TLS either
                r.verdict = Verdict.NOT_SMTP
                r.error = "no greeting, and no TLS handshake either"
            return None
        self._tls_answered(guessed)
        return True

    def _tls_answered(self, guessed: bool) -> None:
        self.guessing = False
        if guessed:
            self.mode_noted = True
            self.r.notes.append(f"port {self.r.port} sends no greeting until TLS is up: it "
                                "speaks implicit TLS (security = \"smtps\")")

    async def _implicit(self, sess: Wire, verify: bool, guessed: bool) -> _Step | None:
        r = self.r
        done = await self._tls(sess, verify, "smtps", guessed)
        if done is not True:
            return done
        r.security = "smtps"
        await self._greeting(sess)
        r.stage = "ehlo"
        r.ehlo_tls = await self._ehlo(sess)
        await sess.quit()
        self._judge()
        return None

    async def _plain(self, sess: Wire, verify: bool, guess: bool) -> _Step | None:
        r = self.r
        r.stage = "banner"
        wait = self.p.banner_wait if guess else None
        first = await sess.first_bytes(wait)
        if first is None:
            sess.transcript.append(f"*  no greeting after {self.p.banner_wait:g} s: "
                            "trying TLS at once (implicit TLS?)")
            self.guessing = True
            return await self._implicit(sess, verify, guessed=True)
        if first == b"":
            raise Closed("closed the connection without a greeting")
        if first[:1] in (b"\x15", b"\x16"):  # a TLS record (alert/handshake), not "220"
            self.mode_noted = True
            r.notes.append(f"port {r.port} sent TLS data instead of a greeting: it speaks "
                           "implicit TLS (security = \"smtps\")")
            sess.transcript.append("*  TLS data instead of a greeting")
            return _Step("smtps", verify)
        if not await self._greeting(sess):
            return None
        r.stage = "ehlo"
        r.ehlo = await self._ehlo(sess)
        if "STARTTLS" not in r.ehlo:
            r.security = "none"
            await sess.quit()
            self._judge()
            return None
        r.stage = "starttls"
        code, lines = await sess.command("STARTTLS")
        if code != 220:
            r.verdict = Verdict.TLS_FAILED
            r.error = f"STARTTLS refused: {code} {' '.join(lines)}"
            await sess.quit()
            return None
        done = await self._tls(sess, verify, "starttls", guessed=False)
        if done is not True:
            return None if done is None else _Step("plain", done.verify)
        r.security = "starttls"
        r.stage = "ehlo"
        r.ehlo_tls = await self._ehlo(sess)
        await sess.quit()
        self._judge()
        return None

    async def _greeting(self, sess: Wire) -> bool:
        r = self.r
        r.stage = "banner"
        code, lines = await sess.reply()
        if r.banner_ms is None:
            r.banner_ms = (time.monotonic() - self.connected_at) * 1000
        r.banner = f"{code} {' '.join(lines)}".strip()
        if code != 220:
            r.verdict, r.error = Verdict.REJECTED, f"the server greets with {r.banner}"
            await sess.quit()
            return False
        return True

    async def _ehlo(self, sess: Wire) -> dict[str, str]:
        name = self.p.ehlo_name or _address_literal(sess.writer.get_extra_info("sockname"))
        code, lines = await sess.command(f"EHLO {name}")
        if code == 250:
            return capabilities(lines)
        self.r.notes.append(f"EHLO refused ({code} {' '.join(lines)}); a very old server?")
        await sess.command(f"HELO {name}")
        return {}

    def _judge(self) -> None:
        r = self.r
        if r.security == "none":
            r.verdict = Verdict.NO_TLS
        elif r.tls is not None and r.tls.ok:
            r.verdict = Verdict.OK
        else:
            r.verdict = Verdict.CERTIFICATE
        if r.security not in (None, "none", r.expected) and not self.mode_noted:
            want = "implicit TLS" if r.security == "smtps" else "STARTTLS"
            r.notes.append(f"port {r.port} uses {want}: set security = \"{r.security}\" for it")
        if mechanisms(r.ehlo):
            r.notes.append(f"port {r.port} offers AUTH before TLS: a password sent that way "
                           "can be read on the way (Postroom never does it unless "
                           "allow_plaintext_auth = true)")


def _address_literal(sockname: Any) -> str:
    # Our own address as the EHLO argument (RFC 5321 section 4.1.3): a name would need DNS
    # and might not resolve back to us, a literal is always valid.
    try:
        ip = ipaddress.ip_address(str(sockname[0]).split("%")[0])
    except (ValueError, TypeError, IndexError):
        return "[127.0.0.1]"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _connect_verdict(reach: str) -> Verdict:
    return {
        net.Reach.REFUSED: Verdict.REFUSED, net.Reach.DROPPED: Verdict.DROPPED,
        net.Reach.UNREACHABLE: Verdict.UNREACHABLE, net.Reach.DNS: Verdict.DNS,
    }.get(net.Reach(reach), Verdict.ERROR)


class _Probe:
    def __init__(self, host: str, server_name: str, ehlo_name: str | None, banner_wait: float,
                 implicit_ports: Collection[int], ca_file: Path | None) -> None:
        self.host = host
        self.server_name = server_name
        self.ehlo_name = ehlo_name
        self.banner_wait = banner_wait
        self.implicit_ports = frozenset(implicit_ports)
        self.addresses: list[net.Address] = []
        try:
            self.verify_ctx = ssl.create_default_context(
                cafile=str(ca_file) if ca_file else None)
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"--ca-file {ca_file}: not a PEM CA bundle ({err})",
                              code="config.ca_file") from err
        # Names are judged separately, from the certificate (tlsinfo.name_matches).
        self.verify_ctx.check_hostname = False
        # Verification off: no CA store to load (that alone costs ~50 ms).
        self.facts_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.facts_ctx.check_hostname = False
        self.facts_ctx.verify_mode = ssl.CERT_NONE


async def _probe_port(p: _Probe, r: PortResult, deadline: float) -> None:
    t0 = time.monotonic()
    prober = _PortProber(p, r)
    try:
        async with asyncio.timeout_at(deadline):
            await prober.run()
    except TimeoutError:
        if r.tcp is None:
            r.tcp, r.verdict = net.Reach.DROPPED, Verdict.DROPPED
            r.error = "no answer before the deadline (packets silently dropped?)"
        elif prober.guessing and r.stage == "tls" and r.security is None:
            r.verdict = Verdict.NOT_SMTP
            r.error = ("connected, but the server sends no greeting and does not answer a TLS "
                       "handshake either (not an SMTP server, or a tarpit)")
        else:
            r.verdict = Verdict.TIMEOUT
            r.error = f"no answer before the deadline while waiting for the {r.stage} reply"
    finally:
        r.elapsed_ms = (time.monotonic() - t0) * 1000


async def probe(
    host: str,
    ports: Sequence[int] = DEFAULT_PORTS,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca_file: Path | None = None,
    server_name: str | None = None,
    ehlo_name: str | None = None,
    banner_wait: float = DEFAULT_BANNER_WAIT,
    implicit_tls_ports: Collection[int] = IMPLICIT_TLS_PORTS,
    https: bool = True,
    endpoints: Sequence[https_mod.Endpoint] | None = None,  # None: every provider's
    environ: Mapping[str, str] | None = None,
    addresses: Sequence[str] | None = None,
) -> ProbeReport:
    """Probe ``host`` on ``ports`` (and the providers' HTTPS endpoints) in parallel; returns by
    ``timeout`` seconds. Raises ConfigError for bad arguments only: every network outcome is
    part of the report. ``addresses``: the host's IPs when the caller resolved it already
    (the wizard, with the DNS server it was given); the system resolver is then not asked."""
    host = host.strip()
    _check_args(host, ports, timeout, banner_wait)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    deadline = loop.time() + timeout
    name = server_name or host.strip("[]")
    p = _Probe(host.strip("[]"), name, ehlo_name, banner_wait,
               implicit_tls_ports, ca_file)
    env = os.environ if environ is None else environ
    https_task = (asyncio.create_task(https_mod.check(endpoints, environ=env, deadline=deadline))
                  if https else None)
    ordered = list(dict.fromkeys(ports))
    results = [PortResult(port, "smtps" if port in p.implicit_ports else "starttls")
               for port in ordered]
    report = ProbeReport(host=host, timeout=timeout, ports=results)
    try:
        async with asyncio.timeout_at(deadline):
            p.addresses = _given(addresses) if addresses else await net.resolve(p.host, 0)
    except TimeoutError:
        report.dns_error = f"the resolver did not answer for {p.host} within {timeout:g} s"
    except OSError as err:
        report.dns_error = f"cannot resolve {p.host}: {net.classify(err)[1]}"
    report.addresses = [a.ip for a in p.addresses]
    if p.addresses:
        await asyncio.gather(*(_probe_port(p, r, deadline) for r in results))
    else:
        for r in results:
            r.verdict, r.tcp, r.error = Verdict.DNS, net.Reach.DNS, report.dns_error
    if https_task is not None:
        report.https = await https_task
        proxy = https_mod.proxy_for(endpoints[0].host if endpoints else "", env)
        report.proxy = proxy.display if isinstance(proxy, https_mod.Proxy) else None
    report.recommendation = recommend(report)
    report.summary = overall(report)
    report.elapsed_ms = (time.monotonic() - t0) * 1000
    return report


def _given(addresses: Sequence[str]) -> list[net.Address]:
    return [net.Address(int(socket.AF_INET6 if ":" in a else socket.AF_INET), a)
            for a in addresses]


def probe_sync(host: str, ports: Sequence[int] = DEFAULT_PORTS, **kw: Any) -> ProbeReport:
    """:func:`probe` for synchronous callers (the CLI)."""
    return asyncio.run(probe(host, ports, **kw))


def _check_args(host: str, ports: Sequence[int], timeout: float, banner_wait: float) -> None:
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"host {host!r}: give a host name or an IP address",
                          code="probe.host")
    bad = [p for p in ports if not 1 <= p <= 65535]
    if bad or not ports:
        raise ConfigError(f"ports {bad or '(none)'}: give ports between 1 and 65535",
                          code="probe.port")
    if not 0 < timeout <= 3600:
        raise ConfigError(f"timeout {timeout}: give seconds between 0 and 3600",
                          code="probe.timeout")
    if banner_wait <= 0:
        raise ConfigError(f"banner wait {banner_wait}: must be positive", code="probe.timeout")
