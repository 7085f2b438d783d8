"""``postroom-sendmail`` (and ``postroom sendmail``): the sendmail(8) command line.

What PHP's mail(), cron, mailx/mailutils and git send-email run. Behaviour follows Postfix's
sendmail(1) where sendmail implementations differ:

* recipients on the command line, each read as an address list (``"Name <a@b>", c@d``);
  with ``-t`` the message's To/Cc/Bcc are *added* to them (Postfix 2.1+; Sendmail removes
  them instead); when the message has Resent-To/Cc/Bcc fields, only those count;
* without ``-i``/``-oi`` a line holding a single ``.`` ends the message;
* a leading mbox ``From `` line is skipped; LF or CRLF line ends become CRLF;
* envelope sender: ``-f``/``-r``, else *the Unix user*@``[sendmail] domain`` (default
  ``server.hostname``), as Postfix (login name @ myorigin), never the From field;
* From (``-F``, else $NAME, else the password file's full name, with the envelope sender),
  Date and Message-ID are added when missing; Bcc, Resent-Bcc, Return-Path and
  Content-Length are removed (Postfix's message_drop_headers); bare user names such as
  ``root`` get ``@domain`` (envelope::complete_headers).

The message goes straight into the store (delivered when a worker runs), or to a running
Postroom over SMTP when ``[sendmail] server`` is set. Exit status per sysexits.h. An error
in the command line stops before the message is read (as Postfix); any later error keeps
the message in a dead.letter file (ingress/deadletter.py) and says where.

Start-up cost matters (PHP runs this once per mail): only the standard library is imported
at first; the configuration is read without pydantic when every value in it is one the
models take as it is (ingress/sendmail_settings.py; else through postroom.settings, as every
other command), without [[connections]] and [[routes]] (their transports are the worker's
business); the message goes into a store whose schema is current through the standard
library's sqlite3 (store/direct.py), and SQLAlchemy and Alembic are imported only to create
or migrate the store, or for PostgreSQL; smtplib only in SMTP mode. tests/test_sendmail.py
checks what one run imports.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING

from postroom.exceptions import PostroomError

if TYPE_CHECKING:
    from postroom.envelope import Envelope
    from postroom.ingress.sendmail_settings import LightSettings
    from postroom.settings import Settings

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Postfix's getopt string "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx", split by kind.
_TAKES_VALUE = frozenset("ABCFLNORVXbefhopr")
_FLAGS = frozenset("GIUcimntvx")

USAGE = """\
usage: {prog} [options] [--] [recipient ...]
Reads a message on standard input (LF or CRLF line ends) and queues it in Postroom.
  -t            also send to the message's To:, Cc: and Bcc: addresses (Bcc: is removed)
  -i, -oi       a line holding a single "." does not end the message
  -f SENDER     envelope sender; also -fSENDER and -r SENDER (default: USER@DOMAIN)
  -F NAME       full name in the From: field added when the message has none
  -C FILE       Postroom configuration (default: $POSTROOM_CONFIG, ./postroom.toml,
                ~/.config/postroom/postroom.toml, /etc/postroom/postroom.toml); users
                other than root may name only a folder listed in the default one's
                [sendmail] alternate_config_directories, or their own file when the
                default configuration is theirs (else use $POSTROOM_CONFIG)
  -bm           read and queue a message (the default)
  -v            print the queued message's id on standard error
Accepted and ignored, as by Postfix: -Am -Ac -B 7BIT|8BITMIME -c -e X -G -h N -L LABEL -m
  -N DSN -n -O OPT=VALUE -o* (-oem, -odb, -odi, -oQ...) -p X -q<time> -R RET -U -V ENVID
  -X ARG -x; -bi, -bh, -bH and -I do nothing and succeed.
Exit status per sysexits.h: 0 queued, 64 usage, 65 bad message, 67 bad recipient,
  75 try again later (the message is kept in dead.letter), 77 refused, 78 configuration."""


class SendmailError(PostroomError):
    """A failure of the sendmail command, with the sysexits.h status it exits with."""

    code = "sendmail"

    def __init__(self, message: str, status: int, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


def _usage(message: str) -> SendmailError:
    return SendmailError(message, EX_USAGE, code="sendmail.usage")


# Plain classes, not dataclasses: building a dataclass (exec'ing its methods) at import costs
# a command that starts once per message more than the few lines of __init__ below.
class Options:
    recipients: list[str]
    extract: bool = False  # -t
    dot_ends: bool = True  # cleared by -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: str | None = None  # -C
    verbose: bool = False  # -v
    done: int | None = None  # set when the command has nothing to read (-bi, --help...)
    text: str = ""  # what to print then

    def __init__(self) -> None:
        self.recipients = []


_UNSUPPORTED_MODES = {
    "s": "-bs (SMTP on standard input) is not supported: have the program connect to "
         "Postroom's SMTP listener (server.smtp_listen) instead",
    "d": "-bd is not supported: run `postroom serve`",
    "l": "-bl is not supported: run `postroom serve`",
    "p": "-bp is not supported: list the queue with `postroom log`",
    "v": "-bv (address verification) is not supported",
}


def _option(opts: Options, letter: str, value: str | None) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.dot_ends = False
    elif letter == "v":
        opts.verbose = True
    elif letter == "I":
        opts.done = EX_OK  # newaliases: Postroom has no alias database to rebuild
    elif letter in ("f", "r"):
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        # Postfix takes the last -C; here a second one is refused, so that an argument
        # appended to a fixed command line (PHP mail()'s fifth) cannot replace the first.
        if opts.config is not None and opts.config != value:
            raise _usage(f"-C given twice ({opts.config}, {value}): give one configuration")
        opts.config = value
    elif letter == "o" and value is not None and value.startswith("i"):
        opts.dot_ends = False  # -oi; every other -o option is ignored, as by Postfix
    elif letter == "B" and value not in ("7BIT", "8BITMIME"):
        raise _usage(f"-B {value}: use 7BIT or 8BITMIME")
    elif letter == "b" and value:
        mode = value[0]
        if mode in _UNSUPPORTED_MODES:
            raise _usage(_UNSUPPORTED_MODES[mode])
        if mode in "ihH":
            opts.done = EX_OK  # alias database and host status: nothing to do (Postfix too)
        elif mode != "m":
            raise _usage(f"-b{value}: unknown mode; the mode this command has is -bm")
    # every other letter of Postfix's list is accepted and ignored


def parse_args(argv: Sequence[str], prog: str = "postroom-sendmail") -> Options:
    """Read the command line as POSIX getopt does with Postfix's option string: options may
    be grouped (-ti), a value may be attached (-fme@x) or follow (-f me@x), and the first
    argument that is not an option, or ``--``, ends the options."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg in ("--help", "-?"):
            opts.done, opts.text = EX_OK, USAGE.format(prog=prog)
            return opts
        if arg == "--version":
            from postroom import __version__

            opts.done, opts.text = EX_OK, f"{prog} (Postroom {__version__})"
            return opts
        if arg.startswith("--"):
            raise _usage(f"unknown option {arg}; see {prog} --help")
        if arg == "-q" or arg.startswith("-q"):
            # -q alone would flush the queue; -q<time> only matters to a daemon (ignored).
            if arg == "-q" or arg[2:3] in ("R", "I", "S"):
                raise _usage(f"{arg}: Postroom's workers deliver queued mail on their own; "
                             "see `postroom log` and `postroom resend`")
            i += 1
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in _TAKES_VALUE:
                if j + 1 < len(arg):
                    value = arg[j + 1:]
                else:
                    i += 1
                    if i >= len(argv):
                        raise _usage(f"option -{letter} needs a value; see {prog} --help")
                    value = argv[i]
                _option(opts, letter, value)
                break
            if letter not in _FLAGS:
                raise _usage(f"unknown option -{letter}; see {prog} --help")
            _option(opts, letter, None)
            j += 1
        i += 1
    opts.recipients = list(argv[i:])
    if opts.done is None and not opts.extract and not opts.recipients:
        raise _usage("no recipients: give them on the command line or use -t to read them "
                     "from the message's To:, Cc: and Bcc: fields")
    return opts


class User:
    """Who runs the command (Postfix: the login name of the real user id)."""

    __slots__ = ("full_name", "home", "name", "uid")

    def __init__(self, uid: int, name: str | None, full_name: str, home: str) -> None:
        self.uid = uid
        self.name = name  # None: no entry in the password database
        self.full_name = full_name
        self.home = home


def unix_user() -> User:
    import pwd

    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return User(uid, None, "", "")
    # The GECOS full name as Postfix's fullname(): up to the first comma, '&' = the login.
    gecos = pw.pw_gecos.split(",", 1)[0].replace("&", pw.pw_name.capitalize())
    return User(uid, pw.pw_name, gecos.strip(), pw.pw_dir)


_LINE_BREAK = re.compile(r"[\r\n\x00]")


def _check_line_breaks(opts: Options, environ: Mapping[str, str]) -> None:
    """CR, LF or NUL in a value that ends up in the envelope or a header would start a new
    line there: refuse it before anything else happens."""
    for what, value in (("-f", opts.sender), ("-F", opts.full_name),
                        ("the NAME environment variable", environ.get("NAME"))):
        if value is not None and _LINE_BREAK.search(value):
            raise _usage(f"{what} {value!r} holds a line break; give it on one line")
    for rcpt in opts.recipients:
        if _LINE_BREAK.search(rcpt):
            raise SendmailError(f"recipient {rcpt!r} holds a line break", EX_NOUSER,
                                code="sendmail.recipient")


class Submission:
    """What the command line says about the message, resolved against the configuration."""

    __slots__ = ("domain", "full_name", "recipients", "sender", "source")

    def __init__(self, sender: str, recipients: list[str], full_name: str, domain: str,
                 source: str) -> None:
        self.sender, self.recipients, self.full_name = sender, recipients, full_name
        self.domain, self.source = domain, source


def _addresses(value: str) -> list[str] | None:
    """The addresses of an address list, or None when the text is not one: the parser alone
    would read "John Smith" as the address "John"."""
    from email.utils import getaddresses

    found = [a for _, a in getaddresses([value]) if a]
    plain = not any(c in value for c in '<(":')  # bare addresses, comma-separated
    if plain and [p.strip() for p in value.split(",") if p.strip()] != found:
        return None
    return found


def resolve(opts: Options, user: User, settings: Settings | LightSettings,
            environ: Mapping[str, str]) -> Submission:
    """Envelope sender and command-line recipients, qualified and validated."""
    from postroom.envelope import qualify, validate_address
    from postroom.exceptions import MessageError

    domain = settings.sendmail.domain or settings.server.hostname
    if opts.sender is not None:
        value = opts.sender.strip()
        found = [] if value in ("", "<>") else _addresses(value)
        if found is None or (value not in ("", "<>") and len(found) != 1):
            raise _usage(f"-f {opts.sender!r}: give one address such as you@example.com "
                         "(or '<>' for the null sender)")
        sender = qualify(found[0], domain) if found else ""
    elif user.name is None:
        raise SendmailError(f"user id {user.uid} has no name in the password database, so "
                            "there is no default sender: give one with -f you@example.com",
                            EX_OSERR, code="sendmail.user")
    else:
        sender = f"{user.name}@{domain}"
    try:
        validate_address(sender, allow_empty=True)
    except MessageError as err:
        raise _usage(f"envelope sender: {err}") from err
    recipients = []
    for arg in opts.recipients:
        found = _addresses(arg)
        if not found:
            problem = "holds no address" if found == [] else "is not an address list"
            raise SendmailError(f"recipient argument {arg!r} {problem}", EX_NOUSER,
                                code="sendmail.recipient")
        for address in found:
            try:
                recipients.append(validate_address(qualify(address, domain)))
            except MessageError as err:
                raise SendmailError(f"recipient {arg!r}: {err}", EX_NOUSER,
                                    code="sendmail.recipient") from err
    if opts.full_name is not None:
        full_name = opts.full_name
    else:  # Postfix: $NAME, then the password file
        full_name = environ.get("NAME") or user.full_name
    return Submission(sender, recipients, full_name, domain,
                      f"sendmail:{user.name if user.name is not None else user.uid}")


_MBOX_FROM = re.compile(rb">*From ")


def read_message(stream: IO[bytes], *, dot_ends: bool, limit: int) -> bytes:
    """The message on ``stream`` with CRLF line ends: up to EOF, or with ``dot_ends`` up to
    a line holding a single dot; leading mbox From_ lines skipped (Postfix too)."""
    too_big = SendmailError(f"the message is larger than server.max_message_size ({limit} "
                            "bytes); it was not queued and not kept", EX_DATAERR,
                            code="sendmail.too_big")
    if dot_ends:
        lines, size = [], 0
        for line in stream:
            if line.rstrip(b"\r\n") == b".":
                break
            size += len(line)
            if size > limit:
                raise too_big
            lines.append(line)
        data = b"".join(lines)
    else:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise too_big
    while _MBOX_FROM.match(data):
        cut = data.find(b"\n")
        data = b"" if cut < 0 else data[cut + 1:]
    # Postfix strips every CR before the LF; a bare CR elsewhere is refused at intake.
    data = re.sub(rb"\r*\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if len(data) > limit:
        raise too_big
    return data


def header_recipients(raw: bytes, domain: str) -> list[str]:
    """``-t``: the addresses of To, Cc and Bcc; of Resent-To/Cc/Bcc only, when the message
    has such a field (Postfix's sendmail and cleanup)."""
    from postroom.envelope import field_name, field_text, qualify, split_header, validate_address
    from postroom.exceptions import MessageError

    regular: list[str] = []
    resent: list[str] = []
    resent_seen = False
    for fld in split_header(raw)[0]:
        name = field_name(fld)
        if name in ("to", "cc", "bcc"):
            target = regular
        elif name in ("resent-to", "resent-cc", "resent-bcc"):
            target, resent_seen = resent, True
        else:
            continue
        found = _addresses(field_text(fld))
        if found is None:
            raise SendmailError(f"the message's {name.title()}: field is not an address list: "
                                f"{field_text(fld)!r}", EX_DATAERR,
                                code="sendmail.header_recipient")
        for address in found:
            try:
                target.append(validate_address(qualify(address, domain)))
            except MessageError as err:
                raise SendmailError(f"the message's {name.title()}: field: {err}", EX_DATAERR,
                                    code="sendmail.header_recipient") from err
    return resent if resent_seen else regular


def build(raw: bytes, opts: Options, sub: Submission,
          settings: Settings | LightSettings) -> Envelope:
    from postroom.envelope import Envelope, complete_headers
    from postroom.ingress.accept import Intake

    recipients = list(sub.recipients)
    if opts.extract:
        recipients += header_recipients(raw, sub.domain)
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise SendmailError("no recipient addresses found in the message's To:, Cc: or Bcc: "
                            "fields (-t)", EX_USAGE, code="sendmail.no_recipients")
    message = complete_headers(raw, sender=sub.sender, domain=sub.domain,
                               full_name=sub.full_name)
    env = Envelope(sub.sender, recipients, message, source=sub.source)
    # The one intake path (a local user is not an app); no connection can be pinned here,
    # and none is loaded (Intake.of would find none).
    Intake(settings.server, ()).check(env)
    return env


def enqueue(env: Envelope, settings: Settings | LightSettings,
            environ: Mapping[str, str]) -> str:
    """Into the store, or to ``[sendmail] server``; returns the message id or server reply."""
    if settings.sendmail.server:
        from postroom.ingress.smtp_handoff import hand_off

        return hand_off(settings.sendmail, env, ehlo_name=settings.server.hostname,
                        resolve=settings.resolve, environ=environ)
    from postroom.store import direct

    # The common case, a store whose schema is current, without SQLAlchemy (store.direct);
    # else the full path below creates or migrates the store and words any error.
    stored = direct.enqueue(env, database_url=settings.database_url,
                            synchronous=settings.server.sqlite_synchronous,
                            lifetime=settings.delivery.max_lifetime)
    if stored is None:
        from postroom.ingress.sendmail_settings import LightSettings

        # Creating or migrating the store takes the models (postroom.runtime.Instance).
        full = settings.full(environ) if isinstance(settings, LightSettings) else settings
        stored = _enqueue_migrating(env, full)
    if settings.sendmail.syslog:
        from postroom.syslog_line import accepted_to_syslog

        accepted_to_syslog(env, settings.sendmail.syslog)
    return stored


def _enqueue_migrating(env: Envelope, settings: Settings) -> str:
    """The store through SQLAlchemy: created or migrated first, every error worded."""
    from postroom.exceptions import StoreError
    from postroom.runtime import Instance

    hint = (f"run as the user that owns {settings.data_dir}, or set [sendmail] server = "
            "\"smtp://HOST:PORT\" to hand mail to a running `postroom serve`")
    try:
        inst = Instance(settings)
    except OSError as err:  # the data folder cannot be created or entered
        raise SendmailError(f"cannot use Postroom's data folder {settings.data_dir}: "
                            f"{err.strerror}; {hint}", EX_TEMPFAIL, code="sendmail.store") from err
    except StoreError as err:  # e.g. the database file cannot be opened for writing
        raise SendmailError(f"{err.message}; {hint}", EX_TEMPFAIL, code=err.code) from err
    try:
        msg_id: str = inst.queue.enqueue_sync(env)
    finally:
        inst.close()
    return msg_id


def exit_status(err: BaseException) -> int:
    """sysexits.h status for an error raised after the command line was read."""
    from postroom.exceptions import (
        AuthError,
        ConfigError,
        DeliveryError,
        MessageError,
        StoreError,
    )
    from postroom.ingress.smtp_handoff import RECIPIENT_REFUSED

    if isinstance(err, SendmailError):
        return err.status
    if isinstance(err, ConfigError):
        return EX_CONFIG
    if isinstance(err, AuthError):
        return EX_NOPERM
    if isinstance(err, DeliveryError):
        if not err.permanent:
            return EX_TEMPFAIL
        return EX_NOUSER if err.code == RECIPIENT_REFUSED else EX_DATAERR
    if isinstance(err, MessageError):
        return EX_DATAERR
    if isinstance(err, StoreError | OSError):
        return EX_TEMPFAIL  # the store, the disk or the network: a later try may work
    return EX_SOFTWARE


def _describe(err: BaseException) -> str:
    if isinstance(err, PostroomError):
        return f"{err.message} ({err.code})"
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return f"internal error: {type(err).__name__}: {err}"


class _Command:
    def __init__(self, prog: str, stdin: IO[bytes], stderr: IO[str],
                 environ: Mapping[str, str]) -> None:
        self.prog, self.stdin, self.stderr, self.environ = prog, stdin, stderr, environ

    def say(self, text: str) -> None:
        try:
            line = " ".join(text.splitlines())  # one line per problem, for logs
            print(f"{self.prog}: {line}", file=self.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: the exit status still tells

    def keep(self, raw: bytes, err: BaseException, *, sender: str, recipients: Sequence[str],
             settings: Settings | LightSettings | None, user: User) -> None:
        from postroom.ingress import deadletter

        configured = None
        if settings is not None:
            # A dead_letter that confine() refuses was reported by _submit; the message
            # then goes to the default places.
            with contextlib.suppress(PostroomError):
                configured = deadletter.configured_file(settings, self.environ, user.home)
        entry = deadletter.mbox_entry(raw, sender=sender, recipients=recipients,
                                      reason=_describe(err))
        try:
            path = deadletter.keep(entry, deadletter.places(configured, self.environ,
                                                            user.home, user.uid))
        except PostroomError as keep_err:
            self.say(f"the message is NOT queued and could not be kept: {keep_err}")
            return
        self.say(f"the message is not queued; it was kept in {path}")

    def run(self, argv: Sequence[str]) -> int:
        try:
            opts = parse_args(argv, self.prog)
            user = unix_user()
            _check_line_breaks(opts, self.environ)
        except SendmailError as err:
            self.say(err.message)
            return err.status
        if opts.done is not None:
            if opts.text:
                with contextlib.suppress(OSError):  # e.g. `--help | head`
                    print(opts.text, flush=True)
            return opts.done
        return self._submit(opts, user)

    def _submit(self, opts: Options, user: User) -> int:
        from postroom import config_values
        from postroom.exceptions import ConfigError
        from postroom.ingress import deadletter, sendmail_settings
        from postroom.ingress.sendmail_config import trusted_config

        settings: Settings | LightSettings | None = None
        failure: BaseException | None = None
        sub: Submission | None = None
        try:
            # Connections are for the worker: this command never delivers (settings.load).
            # -C is argv, which PHP mail()'s fifth argument reaches: not every file is
            # honoured (ingress/sendmail_config.py).
            named = trusted_config(opts.config, self.environ, user.uid) if opts.config else None
            settings = sendmail_settings.load(named, self.environ)
            if settings.config_path is None:
                # Never a store in whatever folder the caller runs in (PHP: the web root).
                looked = ", ".join(str(p) for p in config_values.search_path(self.environ))
                raise ConfigError(f"no Postroom configuration found (looked for {looked}); "
                                  "give -C FILE or set POSTROOM_CONFIG",
                                  code="config.missing")
            # A dead_letter outside its bounds is refused now, not at the first failure.
            deadletter.configured_file(settings, self.environ, user.home)
            # Command-line addresses are checked before the message is read, as Postfix.
            sub = resolve(opts, user, settings, self.environ)
        except SendmailError as err:
            self.say(err.message)
            return err.status
        except (PostroomError, OSError) as err:
            failure = err  # configuration: still read the message, to keep it
        limit = settings.server.max_message_size if settings else \
            sendmail_settings.default_max_message_size()
        try:
            raw = read_message(self.stdin, dot_ends=opts.dot_ends, limit=limit)
        except SendmailError as err:
            self.say(err.message)
            return err.status
        except OSError as err:
            self.say(f"cannot read the message from standard input: {err.strerror or err}")
            return EX_DATAERR
        sender = sub.sender if sub else (opts.sender or "")
        recipients: list[str] = list(sub.recipients) if sub else list(opts.recipients)
        try:
            if failure is not None:
                raise failure
            assert settings is not None and sub is not None
            env = build(raw, opts, sub, settings)
            recipients = env.recipients
            result = enqueue(env, settings, self.environ)
        except (Exception, KeyboardInterrupt) as err:
            status = EX_TEMPFAIL if isinstance(err, KeyboardInterrupt) else exit_status(err)
            self.say(_describe(err) if not isinstance(err, KeyboardInterrupt) else "interrupted")
            self.keep(raw, err, sender=sender, recipients=recipients, settings=settings,
                      user=user)
            return status
        if opts.verbose:
            self.say(f"queued {result}")
        return EX_OK


def run(argv: Sequence[str], *, prog: str = "postroom-sendmail", stdin: IO[bytes] | None = None,
        stderr: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command; returns the exit status (never raises, never prints a traceback)."""
    if stdin is None:
        stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    cmd = _Command(prog, stdin, stderr if stderr is not None else sys.stderr,
                   os.environ if environ is None else environ)
    try:
        return cmd.run(argv)
    except KeyboardInterrupt:
        cmd.say("interrupted")
        return EX_TEMPFAIL
    except Exception as err:  # a bug: say so on one line, as an exit status
        cmd.say(_describe(err))
        return EX_SOFTWARE


def main(argv: Sequence[str] | None = None) -> int:
    """The ``postroom-sendmail`` console script (``argv`` None: this process is its own)."""
    if argv is not None:
        return run(argv)
    # A process that lives for one message: the cyclic garbage collector would only walk the
    # objects the imports make, and the interpreter's teardown only free them again.
    import gc

    gc.disable()
    status = run(sys.argv[1:])
    try:  # run() wrote its lines with flush=True, so nothing is left to write here
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except (AttributeError, OSError, ValueError):
        return status  # a closed or missing stream: the interpreter's exit handles it as ever
    # Every file is closed and every write on disk by now (the store's commit, dead.letter's
    # fsync, the syslog datagram): exit without tearing the interpreter down.
    os._exit(status)
