"""The SMTP listener (aiosmtpd): validate, enqueue durably, answer. Nothing else.

Policy, deny by default:
- clients in ``trusted_networks`` may send without AUTH (when ``trusted_without_auth``);
  everyone else must authenticate as an app first — never an open relay;
- AUTH is only offered and accepted over TLS, except to clients in ``trusted_networks``;
- failed AUTH is answered after a delay that grows with the address's recent failures
  (across sessions), and the session is closed after a few failures;
- sessions are capped per address and in all, junk commands (NOOP...) per session, and a
  client outside ``trusted_networks`` must authenticate within ``smtp_auth_deadline``;
- an authenticated session sends as its app: the app's limits apply (allowed senders,
  rate), and a session whose app was removed or rotated since it logged in sends no more;
- what a message must be to be stored is not decided here: ``ingress.accept`` (the one
  intake path) says, for this door as for every other (bare CR or LF, size, header bytes);
- mail to a signed return path of ``[bounces]`` (postroom.bounces) is a delivery report:
  read and recorded on its message, never queued. Clients in [bounces] networks may send
  one without AUTH, with the null reverse path, and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from postroom.apps import AppPolicy, Apps
from postroom.envelope import Envelope, validate_address
from postroom.exceptions import EventError, IntakeError, MessageError, PostroomError
from postroom.ingress.accept import Intake
from postroom.ingress.guard import FailureLimiter, Networks, SessionCaps, client_address
from postroom.ingress.smtpdata import Refusal, read_data
from postroom.queue.sql import Queue
from postroom.settings import ServerSettings

if TYPE_CHECKING:
    from postroom.bounces import Door

log = logging.getLogger(__name__)


_SIMPLE_ADDR = re.compile(r'[^\s<>()\[\]\\,;:"@]+@[^\s<>()\[\]\\,;:"@]+')


# aiosmtpd's per-session command budgets (its command_call_limit): a command over budget is
# answered "421 4.7.0 <COMMAND> sent too many times" and the session is closed. Every valid
# command restarts the idle timer, so without a budget a NOOP loop holds a session (and its
# file descriptor) forever. The commands of real mail (MAIL, RCPT, DATA, and RSET, which
# PHPMailer's keep-alive sends between messages) get budgets no mail-sending session reaches;
# the rest get small ones (Postfix: smtpd_junk_command_limit = 100).
COMMAND_CALL_LIMITS = {
    "*": 100_000, "RSET": 10_000, "NOOP": 100, "HELO": 100, "EHLO": 100,
    "VRFY": 10, "EXPN": 10, "HELP": 10, "AUTH": 10, "STARTTLS": 3,
}
TOO_MANY_SESSIONS = b"421 4.7.0 Too many connections from your address, try again later\r\n"


class Policy:
    """What every session of one `postroom serve` shares: its rules, and the per-peer
    accounting (open sessions, failed AUTHs) across the SMTP and SMTPS listeners."""

    def __init__(self, server: ServerSettings) -> None:
        self.trusted = Networks(server.trusted_networks)
        self.trusted_without_auth = server.trusted_without_auth
        self.max_recipients = server.max_recipients
        self.max_size = server.max_message_size
        self.auth_failure_delay = server.auth_failure_delay
        self.max_auth_failures = server.max_auth_failures
        self.auth_deadline = server.smtp_auth_deadline
        self.auth_failures = FailureLimiter(
            base_delay=server.auth_failure_delay,
            max_delay=max(server.auth_failure_delay, server.auth_failure_max_delay),
        )
        # A tenth of the places is kept for trusted_networks (this host's apps by default).
        self.sessions = SessionCaps(
            per_peer=server.smtp_max_sessions_per_ip,
            total=server.smtp_max_sessions,
            reserve=server.smtp_max_sessions // 10,
        )


def _rebind(method: Any, obj: object) -> Any:
    return types.MethodType(method.__func__, obj)


class PostroomSMTP(SMTP):
    """aiosmtpd's SMTP with per-peer policy decided when the client connects."""

    def __init__(self, handler: Handler, *, implicit_tls: bool, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._postroom_init(handler, implicit_tls)

    def _postroom_init(self, handler: Handler, implicit_tls: bool) -> None:
        # aiosmtpd keeps these per-command line limits in a class-level dict that EHLO raises
        # (SIZE/SMTPUTF8 parameters) and every __init__ clears: one per session instead.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.policy = handler.policy
        self.implicit_tls = implicit_tls
        self.trusted = False
        self.auth_failures = 0
        self.auth_pending: LoginPassword | None = None
        self.app: AppPolicy | None = None  # the app this session authenticated as
        self.handler = handler
        self.peer_addr: str | None = None  # counted in policy.sessions while this is set
        self.auth_deadline: asyncio.TimerHandle | None = None
        # This transaction: a delivery report to these messages' return paths (bounces), and
        # whether it came without AUTH from [bounces] networks (then it may be nothing else).
        self.dsn_for: list[str] = []
        self.dsn_only = False

    @classmethod
    def like(cls, template: PostroomSMTP) -> PostroomSMTP:
        """A protocol for a new connection, configured as ``template`` (never connected).

        aiosmtpd's __init__ rebuilds its command and AUTH tables by introspection for every
        connection (inspect.getmembers, dir: ~0.2 ms, a fifth of the listener's CPU per
        message when each message has its own connection). Here the stream state is made
        fresh and those tables are copied, with methods bound to the new object.
        tests/test_listener_fastpath.py checks the result equals a normal construction.
        """
        obj = cls.__new__(cls)
        asyncio.StreamReaderProtocol.__init__(
            obj,
            asyncio.StreamReader(loop=template.loop, limit=template.line_length_limit),
            client_connected_cb=obj._cb_client_connected,
            loop=template.loop,
        )
        fresh = vars(obj).keys() | {"_smtp_methods", "_auth_methods"}
        obj.__dict__.update((k, v) for k, v in vars(template).items() if k not in fresh)
        obj._smtp_methods = {name: getattr(obj, f"smtp_{name}") for name in template._smtp_methods}
        obj._auth_methods = {
            mech: type(attr)(_rebind(attr.method, obj) if attr.is_builtin else attr.method,
                             attr.is_builtin)
            for mech, attr in template._auth_methods.items()
        }
        obj._postroom_init(template.handler, template.implicit_tls)
        return obj

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Fast path for the usual `<local@domain> PARAMS`: aiosmtpd's own parser builds an
        # RFC 5322 token tree (and a Protocol class) per call, ~65 µs; anything unusual
        # (quoting, source routes, <>, no brackets) still goes to it.
        s = arg.lstrip()
        if s.startswith("<"):
            end = s.find(">")
            addr = s[1:end]
            if end > 1 and _SIMPLE_ADDR.fullmatch(addr):
                local = addr.rpartition("@")[0]
                if not (self.local_part_limit and len(local) > self.local_part_limit):
                    return addr, s[end + 1 :].strip()
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's own DATA, with the data read in blocks (ingress.smtpdata) instead of
        # line by line; the checks before 354 and the handler call after are its own.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(self._reader, self.data_size_limit,
                                      self.line_length_limit)
        except asyncio.CancelledError:
            # The connection was lost during DATA (eof_received cancels this coroutine).
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        # aiosmtpd's _set_post_data_state: a fresh envelope for the next transaction.
        if isinstance(content, Refusal):
            self.envelope = self._create_envelope()
            await self.push(content.value)
            return
        self.envelope.content = self.envelope.original_content = content
        assert self.session is not None
        status = await self.handler.handle_DATA(self, self.session, self.envelope)
        self.envelope = self._create_envelope()
        await self.push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None  # not the second call made by STARTTLS
        if first:
            peer = transport.get_extra_info("peername")
            ip = client_address(peer)
            self.trusted = ip in self.policy.trusted
            addr = str(ip) if ip is not None else str(peer)
            if not self.policy.sessions.try_open(addr, exempt=self.trusted):
                # Refused before aiosmtpd sees the connection: no session, no reader task,
                # no banner; connection_lost below then has nothing of aiosmtpd's to undo.
                log.warning("refused a connection from %s: too many sessions (%d open)",
                            addr, self.policy.sessions.open)
                transport.write(TOO_MANY_SESSIONS)  # type: ignore[attr-defined]
                transport.close()
                return
            self.peer_addr = addr
        super().connection_made(transport)
        if first and self.session is not None:
            # AUTH in the clear only from trusted_networks (default: this machine's 127.0.0.1
            # and ::1, not every loopback address); implicit TLS is already encrypted.
            self._auth_require_tls = not (self.implicit_tls or self.trusted)
            if not self.trusted:
                self.auth_deadline = self.loop.call_later(
                    self.policy.auth_deadline, self._auth_deadline_passed
                )

    def _auth_deadline_passed(self) -> None:
        # Outside trusted_networks nothing can be sent before AUTH: a client that has not
        # authenticated by now only holds a session (idle or looping on NOOP, RSET, EHLO...).
        if self.transport is None or self.session is None or self.session.authenticated:
            return
        log.info("closing %s: not authenticated %.0f s after connecting",
                 self.peer_addr, self.policy.auth_deadline)
        self.transport.write(  # type: ignore[attr-defined]
            b"421 4.7.0 Authenticate within %g seconds of connecting; closing\r\n"
            % self.policy.auth_deadline
        )
        self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self.auth_deadline is not None:
            self.auth_deadline.cancel()
            self.auth_deadline = None
        if self.peer_addr is None:
            if self.session is None:
                return  # refused in connection_made: aiosmtpd never started on it
        else:
            # aiosmtpd may call this twice (TLS setup errors): give the place back once.
            self.policy.sessions.close(self.peer_addr)
            self.peer_addr = None
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self.session is None:
            return False  # refused in connection_made (over TLS the EOF still comes here)
        result: bool | None = super().eof_received()
        return result

    async def smtp_AUTH(self, arg: str) -> None:
        # aiosmtpd parses the exchange and hands the credentials to Handler.authenticator,
        # which only parks them here; the answer is given below, after the check on a thread
        # (a keyed hash and a cached lookup, but the lookup may have to ask the database).
        self.auth_pending = None
        await super().smtp_AUTH(arg)
        creds, self.auth_pending = self.auth_pending, None
        if creds is None:
            return  # aiosmtpd already answered (bad base64, unknown mechanism, aborted...)
        try:
            app = await asyncio.to_thread(
                self.handler.apps.authenticate, creds.login.decode(), creds.password.decode()
            )
        except UnicodeDecodeError:
            app = None
        assert self.session is not None
        if app is not None:
            self.app = app
            self.session.authenticated = True
            self.session.auth_data = creds
            self.session.login_data = creds.login
            self.policy.auth_failures.succeeded(self.peer_addr or str(self.session.peer))
            await self.push("235 2.7.0 Authentication successful")
            return
        self.auth_failures += 1
        limiter, addr = self.policy.auth_failures, self.peer_addr or str(self.session.peer)
        limiter.failed(addr)
        delay = limiter.delay(addr)
        log.warning("failed AUTH from %s (%d in this session, %d from this address); "
                    "answering in %.1f s", addr, self.auth_failures, limiter.failures(addr),
                    delay)
        # Delay the failure reply itself (as Dovecot does), growing with the address's recent
        # failures, so guessing is slow even for a client that opens a new connection for
        # every try. The wait is a timer on the event loop: it holds no thread.
        await asyncio.sleep(delay)
        await self.push("535 5.7.8 Authentication credentials invalid")
        if self.auth_failures >= self.policy.max_auth_failures:
            await self.push("421 4.7.0 Too many failed authentication attempts, closing")
            if self.transport is not None:
                self.transport.close()


class Handler:
    """aiosmtpd hooks. Every reply carries an enhanced status code and says what to fix."""

    def __init__(
        self,
        queue: Queue,
        apps: Apps,
        policy: Policy,
        intake: Intake,
        on_enqueued: Callable[[str], Any] | None = None,
        bounces: Door | None = None,
    ) -> None:
        self.queue = queue
        self.apps = apps
        self.policy = policy
        self.intake = intake
        self.on_enqueued = on_enqueued
        self.bounces = bounces  # [bounces]: delivery reports to signed return paths

    def authenticator(
        self, server: PostroomSMTP, session: Session, envelope: SmtpEnvelope, mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        # Checked asynchronously by PostroomSMTP.smtp_AUTH, which also sends the reply.
        server.auth_pending = auth_data if isinstance(auth_data, LoginPassword) else (
            LoginPassword(b"", b""))
        return AuthResult(success=False, handled=True)

    async def handle_EHLO(
        self, server: PostroomSMTP, session: Session, envelope: SmtpEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd handles pipelined commands (it reads line by line) but does not say so.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: PostroomSMTP, session: Session, envelope: SmtpEnvelope, address: str,
        mail_options: list[str],
    ) -> str:
        server.dsn_for, server.dsn_only = [], False
        if not session.authenticated and not (server.trusted and self.policy.trusted_without_auth):
            if not self._reports_from(server, address):
                return "530 5.7.0 Authentication required: log in with an app's credentials first"
            server.dsn_only = True  # handle_RCPT takes signed return paths only
            if server.auth_deadline is not None:
                server.auth_deadline.cancel()
                server.auth_deadline = None
        if address == "<>":  # the null reverse-path (bounces, DSNs; RFC 5321 4.5.5)
            address = ""
        try:
            validate_address(address, allow_empty=True)
        except MessageError as err:
            return f"553 5.1.7 Bad sender address syntax: {err.message}"
        if server.app is not None:
            try:
                # Each transaction asks again: `postroom app remove` or `rotate` in another
                # process must stop a session that is already logged in.
                server.app = self.intake.current_app(server.app.name, server.app.credential)
                self.intake.check_sender(server.app, address)
            except IntakeError as err:
                if err.code == "app.revoked":
                    server.app = None
                    session.authenticated = False
                return err.smtp_reply
        if not address.isascii() and "SMTPUTF8" not in (o.upper() for o in mail_options):
            return "553 5.6.7 Non-ASCII sender address needs MAIL FROM ... SMTPUTF8 (RFC 6531)"
        for opt in mail_options:
            key, _, value = opt.partition("=")
            if key.upper() == "SIZE" and value.isdigit() and int(value) > self.policy.max_size:
                return (f"552 5.3.4 Message size exceeds the limit of {self.policy.max_size} "
                        "bytes")
        # aiosmtpd's RCPT and DATA take an empty mail_from for "no MAIL yet" (503): the null
        # path is kept as "<>" until DATA builds the envelope.
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: PostroomSMTP, session: Session, envelope: SmtpEnvelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        try:
            self.intake.check_recipient_count(len(envelope.rcpt_tos) + 1)
        except IntakeError as err:
            return err.smtp_reply
        try:
            validate_address(address)
        except MessageError as err:
            return f"553 5.1.3 Bad recipient address syntax: {err.message}"
        refused = self._report_recipient(server, envelope, address)
        if refused is not None:
            return refused
        smtputf8 = "SMTPUTF8" in (o.upper() for o in envelope.mail_options)
        if not address.isascii() and not smtputf8:
            return "553 5.6.7 Non-ASCII recipient address needs MAIL FROM ... SMTPUTF8 (RFC 6531)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _reports_from(self, server: PostroomSMTP, address: str) -> bool:
        """Whether an unauthenticated client may start a delivery report: [bounces] is on,
        it comes from its networks, with the null reverse path."""
        return (self.bounces is not None and address == "<>" and server.peer_addr is not None
                and server.peer_addr in self.bounces.networks)

    def _report_recipient(self, server: PostroomSMTP, envelope: SmtpEnvelope,
                          address: str) -> str | None:
        """RCPT for a report: a signed return path is taken (and marks the transaction as a
        report), any other form of the bounce address refused; None: an ordinary recipient,
        for an ordinary transaction."""
        door = self.bounces
        if door is not None and door.verp.is_ours(address):
            msg_id = door.verp.message_of(address)
            if msg_id is None:
                return "550 5.1.1 No such bounce address (its signature does not match)"
            if envelope.rcpt_tos and not server.dsn_for:
                return ("452 4.5.3 A delivery report goes in a transaction of its own; send "
                        "it separately")
            server.dsn_for.append(msg_id)
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        if server.dsn_only:
            return ("530 5.7.0 Authentication required: without AUTH only delivery reports "
                    "to Postroom's return paths are taken")
        if server.dsn_for:
            return ("452 4.5.3 A delivery report goes in a transaction of its own; send "
                    "this recipient separately")
        return None

    async def _take_report(self, server: PostroomSMTP, envelope: SmtpEnvelope) -> str:
        door = self.bounces
        if door is None:  # dsn_for is only filled while it is set
            return "451 4.3.0 Delivery reports are not taken now; try again later"
        try:
            done = await door.take(envelope.original_content or b"", list(server.dsn_for))
        except EventError as err:
            return f"550 5.6.0 Not a delivery report: {err.message}"
        except PostroomError as err:
            log.error("could not record a delivery report: %s", err)
            return "451 4.3.0 Temporary failure storing the report; try again later"
        return (f"250 2.0.0 Ok: delivery report recorded ({len(done.new)} new, "
                f"{done.duplicates} already known)")

    async def handle_DATA(
        self, server: PostroomSMTP, session: Session, envelope: SmtpEnvelope
    ) -> str:
        if server.dsn_for:
            return await self._take_report(server, envelope)
        app = server.app
        env = Envelope(
            sender="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            raw=envelope.original_content or b"",
            source=f"smtp:{app.name}" if app is not None else "smtp:trusted",
            app=app.name if app is not None else None,
        )
        try:
            self.intake.check(env, app)
        except IntakeError as err:
            return f"{err.smtp} Message refused: {err.message}"
        except MessageError as err:
            return f"554 5.6.0 Message refused: {err.message}"
        try:
            msg_id = await self.queue.enqueue(env)
        except PostroomError as err:
            log.error("could not store a message: %s", err)
            return "451 4.3.0 Temporary failure storing the message; try again later"
        if self.on_enqueued is not None:
            self.on_enqueued(msg_id)
        return f"250 2.0.0 Ok: queued as {msg_id}"


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def start(
    handler: Handler,
    server: ServerSettings,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    *,
    implicit_tls: bool = False,
) -> asyncio.Server:
    """Listen on host:port. STARTTLS is offered on the plain port; ``implicit_tls`` wraps
    the whole connection instead (RFC 8314)."""

    template = PostroomSMTP(
        handler,
        implicit_tls=implicit_tls,
        data_size_limit=server.max_message_size,
        enable_SMTPUTF8=True,
        decode_data=False,
        hostname=server.hostname,
        ident="Postroom ESMTP",
        tls_context=None if implicit_tls else tls,
        authenticator=handler.authenticator,
        auth_require_tls=True,
        command_call_limit=COMMAND_CALL_LIMITS,
        timeout=server.smtp_idle_timeout,
    )

    def factory() -> PostroomSMTP:
        return PostroomSMTP.like(template)

    loop = asyncio.get_running_loop()
    return await loop.create_server(
        factory, host=host, port=port, ssl=tls if implicit_tls else None, reuse_address=True
    )
