"""`postroom log`, `show` and `queue list` answered by a running `postroom serve`.

Nearly all the time these commands take is Python importing the database layer, the
settings models and the command-line toolkit (docs/benchmarks.md, issue 16). A running
`postroom serve` of the same instance has them loaded already: when it runs, the command
sends its request over a Unix socket in the data folder (``cli.sock``), serve reads the rows
with the functions below (the ones the command uses when it reads the database itself) and
answers them as JSON, and the command prints them with postroom.commands.views, which the
direct way prints with too: the output is the same byte for byte.

The command takes this way only for the forms of those three commands it reads here
exactly as Click would (see :func:`request_from`); any other form, and every failure on
the way (no socket, a refused connection, another version or configuration, an error
answer, a deadline), goes the usual way through Typer, silently. ``POSTROOM_CLI_DIRECT=1``
makes the command never ask.

Who may ask (SECURITY.md): the socket is created 0600 in the data folder and serve
answers a peer whose credentials (SO_PEERCRED) are serve's own user or root only; the
command checks the socket's owner and mode as serve checks the database file's. Serve
answers these reads and nothing else (nothing that changes state), one request per
connection, each bounded in size, time, rows and concurrent connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom import __version__
from postroom.exceptions import PostroomError

if TYPE_CHECKING:
    import asyncio

    from postroom.queue.maintenance import Filter
    from postroom.runtime import Instance
    from postroom.store.log import LogFilter

PROTOCOL = 1  # the request's and answer's shape; with the version, both ends must agree
SOCKET_NAME = "cli.sock"
DEFAULT_DATA_DIR = "postroom-data"  # [server] data_dir's default (postroom.settings)
SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes on Linux, 104 on the BSDs
DIRECT_ENV = "POSTROOM_CLI_DIRECT"  # "1": the commands never ask a running serve
MAX_REQUEST = 4096  # one JSON line: a filter, an id
MAX_CLIENTS = 4  # connections answered at once; more are closed unanswered
DEADLINE = 10.0  # seconds for one connection: request, reads, answer
MAX_ROWS = 10_000  # a longer `log --limit` reads the database itself
MAX_ID = 256  # `show ID`: a message id or a prefix
ASK_TIMEOUT = 5.0  # the command's wait for the answer before it reads the database itself
MAX_ANSWER = 256 * 1024 * 1024  # `show --json` carries the message
LOG_FILTER = ("status", "to", "sender", "connection", "since", "event", "text", "tag", "app",
              "source", "until")
QUEUE_FILTER = ("app", "to", "sender", "priority", "due_by")


# -- what is read: the same functions whether the command or serve reads -------------------
def log_rows(inst: Instance, wanted: LogFilter, limit: int, states: bool
             ) -> list[dict[str, Any]]:
    """`postroom log`: one page of the log, newest first."""
    if wanted.to or wanted.sender or wanted.text:
        # with no server indexing, a backlog would make the search a scan
        inst.queue.log.catch_up()
    return inst.queue.log.page(wanted, limit=limit, states=states)


def show_data(inst: Instance, msg_id: str, as_json: bool) -> dict[str, Any] | None:
    """`postroom show`: the message (without its body, but with ``--json``), the advice for
    each attempt, its delivery events and events; None when there is no such message."""
    from postroom.diagnostics.advice import advice_for_attempt
    from postroom.events import read as read_events
    from postroom.webhooks.intake import EventLog

    m = inst.queue.log.get(msg_id)
    if m is None:
        return None
    reported = EventLog(inst.queue).for_message(m["id"])
    noted = [ev.as_dict() for ev in read_events(inst.engine, message_id=m["id"])]
    if as_json:
        m["raw"] = None if m["raw"] is None else m["raw"].decode("utf-8", "replace")
        m["delivery_events"] = reported
        m["events"] = noted
        return {"message": m}
    m["raw"] = None  # not printed
    advice = [advice_for_attempt(a, settings=inst.settings) for a in m["attempts"]]
    return {"message": m, "advice": advice, "reported": reported, "events": noted}


def queue_data(inst: Instance, flt: Filter, limit: int, table: bool) -> dict[str, Any]:
    """`postroom queue list`: the rows; for the table also the counts and the pause."""
    from postroom.queue.maintenance import list_queue, waiting_counts
    from postroom.routing.health import Health

    rows = list_queue(inst.queue, flt, limit)
    if not table:
        return {"rows": rows}
    d = inst.settings.delivery
    return {"rows": rows, "counts": waiting_counts(inst.queue),
            "paused": Health(inst.queue, d.breaker_failures, d.breaker_cooldown).queue_paused()}


# -- the command's side ------------------------------------------------------------------
FLAG, VALUE, MULTI, NUMBER = "flag", "value", "multi", "number"
CONFIG = {"--config": VALUE, "-c": VALUE}
LOG_OPTIONS = {"--status": VALUE, "--to": VALUE, "--from": VALUE, "--connection": VALUE,
               "--since": VALUE, "--event": VALUE, "--text": VALUE, "--tag": VALUE,
               "--app": VALUE, "--source": VALUE, "--until": VALUE, "--limit": NUMBER,
               "--json": FLAG, **CONFIG}
SHOW_OPTIONS = {"--json": FLAG, **CONFIG}
QUEUE_OPTIONS = {"--status": MULTI, "--app": VALUE, "--to": VALUE, "--from": VALUE,
                 "--priority": VALUE, "--due": FLAG, "--limit": NUMBER, "--json": FLAG,
                 **CONFIG}


def _options(args: Sequence[str], spec: Mapping[str, str]
             ) -> tuple[dict[str, Any], list[str]] | None:
    """The options and the arguments, or None for anything Click might read otherwise
    than plainly (an option twice, a value that looks like an option or is empty, `--`,
    `-cPATH`, an unknown option such as --help): Typer reads those."""
    found: dict[str, Any] = {}
    positional: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        name, eq, value = arg.partition("=")
        kind = spec.get(name)
        if kind is None or (eq and (kind == FLAG or not name.startswith("--"))):
            return None
        key = "--config" if name == "-c" else name
        if kind == FLAG:
            if key in found:
                return None
            found[key] = True
            continue
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if not value or value.startswith("-"):
            return None
        if kind == NUMBER and not (value.isascii() and value.isdigit()):
            return None
        if kind == MULTI:
            found.setdefault(key, []).append(value)
        elif key in found:
            return None
        else:
            found[key] = int(value) if kind == NUMBER else value
    return found, positional


def request_from(argv: Sequence[str], now: float) -> dict[str, Any] | None:
    """The request for ``argv`` (the command line without the program's name), or None
    when it is not one this module answers (see :func:`_options`); with "config" (the
    --config given, or None) added for the caller."""
    from postroom.commands.views import PRIORITY, parse_since

    if not argv:
        return None
    if argv[0] == "log":
        parsed = _options(argv[1:], LOG_OPTIONS)
        if parsed is None or parsed[1]:
            return None
        opts = parsed[0]
        limit = opts.get("--limit", 50)
        if not 1 <= limit <= MAX_ROWS:
            return None
        flt = {key: opts.get("--from" if key == "sender" else f"--{key}") for key in LOG_FILTER}
        try:
            for key in ("since", "until"):
                if flt[key] is not None:
                    flt[key] = parse_since(str(flt[key]))
        except PostroomError:
            return None  # Typer's way prints the error
        return {"op": "log", "filter": flt, "limit": limit, "json": "--json" in opts,
                "config": opts.get("--config")}
    if argv[0] == "show":
        parsed = _options(argv[1:], SHOW_OPTIONS)
        if parsed is None or len(parsed[1]) != 1 or len(parsed[1][0]) > MAX_ID:
            return None
        opts = parsed[0]
        return {"op": "show", "id": parsed[1][0], "json": "--json" in opts,
                "config": opts.get("--config")}
    if argv[:2] == ["queue", "list"]:
        parsed = _options(argv[2:], QUEUE_OPTIONS)
        if parsed is None or parsed[1]:
            return None
        opts = parsed[0]
        limit = opts.get("--limit", 100)
        prio = opts.get("--priority")
        if not 1 <= limit <= 100_000 or (prio is not None and prio not in PRIORITY):
            return None
        return {"op": "queue", "statuses": opts.get("--status", []), "app": opts.get("--app"),
                "to": opts.get("--to"), "sender": opts.get("--from"),
                "priority": None if prio is None else PRIORITY[prio],
                "due_by": now if "--due" in opts else None, "limit": limit,
                "json": "--json" in opts, "config": opts.get("--config")}
    return None


def overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The POSTROOM_<SECTION>__<KEY> overrides in ``environ``: serve answers a command
    whose configuration is the same as its own only."""
    return {k: v for k, v in environ.items() if k.startswith("POSTROOM_") and "__" in k}


def socket_of(config: str | None, environ: Mapping[str, str]) -> tuple[Path, Path] | None:
    """(the configuration file, the socket of its instance) when the file exists, reading
    only [server] data_dir from it; None otherwise (then the command reads the database)."""
    from postroom.config_values import config_path_from, value_from_text

    cfg = config_path_from(config, environ)
    try:
        text = cfg.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    folder: Any = DEFAULT_DATA_DIR
    if "data_dir" in text:  # else the default, without loading the TOML parser
        import tomllib

        try:
            server = tomllib.loads(text).get("server", {})
        except tomllib.TOMLDecodeError:
            return None
        folder = server.get("data_dir", DEFAULT_DATA_DIR) if isinstance(server, dict) else None
    if "POSTROOM_SERVER__DATA_DIR" in environ:
        folder = value_from_text(environ["POSTROOM_SERVER__DATA_DIR"])
    if not isinstance(folder, str):
        return None
    base = cfg.parent.resolve()
    return cfg.resolve(), (base / folder).resolve() / SOCKET_NAME


def trusted_socket(path: Path) -> bool:
    """The socket is ours (or we are root) and open to nobody else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    uid = os.getuid()
    return (stat.S_ISSOCK(st.st_mode) and (st.st_uid == uid or uid == 0)
            and not stat.S_IMODE(st.st_mode) & 0o077)


def ask(path: Path, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """serve's answer to ``request``, or None (not running, another version, an error)."""
    deadline = time.monotonic() + ASK_TIMEOUT
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(ASK_TIMEOUT)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_ANSWER:
                    return None
                chunks.append(chunk)
        answer = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) and answer.get("ok") is True else None


def answered(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Print serve's answer to the command line ``argv`` and return True; False (nothing
    printed) when the command should read the database itself."""
    from postroom.commands import views
    from postroom.launch import completing

    if environ.get(DIRECT_ENV) == "1" or completing(environ):
        return False
    now = time.time()
    request = request_from(argv, now)
    if request is None:
        return False
    located = socket_of(request.pop("config"), environ)
    if located is None or not trusted_socket(located[1]):
        return False
    answer = ask(located[1], {**request, "protocol": PROTOCOL, "version": __version__,
                              "configfile": str(located[0]), "env": overrides(environ)})
    if answer is None:
        return False
    op, as_json = request["op"], request["json"]
    if op == "show":
        if answer.get("found") is None:
            return False  # the usual way says there is no such message
        views.show_message(answer["found"], as_json)
    elif as_json:
        views.json_lines(answer["rows"])
    elif op == "log":
        views.log_table(answer["rows"])
    else:
        views.queue_table(answer["rows"], answer["counts"], answer["paused"], now)
    return True


# -- serve's side -------------------------------------------------------------------------
def listen(path: Path) -> socket.socket:
    """A Unix socket at ``path``, 0600 from its creation (umask), listening."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def peer_allowed(sock: socket.socket) -> bool:
    """The peer runs as this process's user, or as root (who may read the files anyway)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.geteuid(), 0)


def _log() -> Any:
    import logging  # serve's side only: the commands do without

    return logging.getLogger(__name__)


class ReadSocket:
    """serve's end: the reads above for the commands of the same instance."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.path = inst.settings.data_dir / SOCKET_NAME
        config = inst.settings.config_path
        self.configfile = str(Path(config).resolve()) if config is not None else None
        self.env = overrides(os.environ)
        self.active = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        """Listen; False (and a log line) where that cannot be done safely: no
        SO_PEERCRED, a path too long for a socket, no configuration file."""
        if (not hasattr(socket, "SO_PEERCRED") or self.configfile is None
                or len(os.fsencode(self.path)) > SUN_PATH_MAX):
            _log().info("no %s: the commands read the database themselves", SOCKET_NAME)
            return False
        import asyncio

        try:
            sock = listen(self.path)
        except OSError as err:
            _log().warning("cannot listen on %s (%s): the commands read the database "
                        "themselves", self.path, err.strerror)
            return False
        self.server = await asyncio.start_unix_server(self.client, sock=sock,
                                                      limit=MAX_REQUEST)
        return True

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CLIENTS or not peer_allowed(writer.get_extra_info("socket")):
            writer.close()
            return
        import asyncio

        self.active += 1
        try:
            async with asyncio.timeout(DEADLINE):
                line = await reader.readline()
                answer = await self.answer(line)
                writer.write(json.dumps(answer, default=str).encode())
                await writer.drain()
        except (TimeoutError, ValueError, OSError):
            pass  # the command reads the database itself
        finally:
            self.active -= 1
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # a request nested past json's depth
            return {"ok": False}
        if (not isinstance(req, dict) or req.get("protocol") != PROTOCOL
                or req.get("version") != __version__ or req.get("configfile") != self.configfile
                or req.get("env") != self.env):
            return {"ok": False, "mismatch": True}
        try:
            read = self.reader(req)
        except (TypeError, ValueError, KeyError, PostroomError):
            return {"ok": False}
        import asyncio

        try:
            return {"ok": True, **await asyncio.to_thread(read)}
        except PostroomError as err:
            return {"ok": False, "code": err.code}
        except Exception:
            _log().exception("answering a %s command", req.get("op"))
            return {"ok": False}

    def reader(self, req: Mapping[str, Any]) -> Any:
        """The read ``req`` asks for, checked; raises on anything else."""
        inst, op, as_json = self.inst, req["op"], req["json"]
        if not isinstance(as_json, bool):
            raise TypeError("json")
        if op == "log":
            from postroom.store.log import LogFilter

            flt, limit = req["filter"], req["limit"]
            if (set(flt) != set(LOG_FILTER)
                    or not all(v is None or isinstance(v, str | float | int)
                               for v in flt.values())
                    or not isinstance(limit, int) or not 1 <= limit <= MAX_ROWS):
                raise ValueError("log")
            wanted = LogFilter(**flt)
            return lambda: {"rows": log_rows(inst, wanted, limit, as_json)}
        if op == "show":
            msg_id = req["id"]
            if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_ID:
                raise ValueError("id")
            return lambda: {"found": show_data(inst, msg_id, as_json)}
        if op == "queue":
            from postroom.queue.maintenance import Filter

            statuses, limit = req["statuses"], req["limit"]
            values = {key: req[key] for key in QUEUE_FILTER}
            if (not isinstance(statuses, list) or len(statuses) > 16
                    or not all(isinstance(s, str) for s in statuses)
                    or not all(v is None or isinstance(v, str | float | int)
                               for v in values.values())
                    or not isinstance(limit, int) or not 1 <= limit <= 100_000):
                raise ValueError("queue")
            flt = Filter(statuses=tuple(statuses), **values)
            return lambda: queue_data(inst, flt, limit, table=not as_json)
        raise ValueError(f"not a read: {op!r}")
