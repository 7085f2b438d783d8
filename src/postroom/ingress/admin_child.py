"""The web admin's own process: ``python -m postroom.ingress.admin_child``, started by
`postroom serve` (postroom.ingress.admin_proxy) on the first admin request.

Trust rule: this process listens on a Unix socket only, in a folder of its own (0700, the
socket 0600), so the one client that can reach it is `postroom serve` under the same user,
which has already applied the web admin's fence (server.admin_networks, the Host header,
the caps and body limits). The ``x-postroom-front-*`` request headers are therefore trusted
here, and only here: the client's address and scheme as the front saw them (the front
removes any such header a client sent). Nothing else in a request is trusted more than it
would be on the front: no forwarded-for header, no proxy header (uvicorn's are off).

Set-up, parent to child: on stdin, a 4-byte length and the pickled :class:`ChildArgs`
(the parent's own objects, over a pipe only it holds: never a file or the command line);
then stdin stays open, and its end (the parent exited, or was killed) stops this process.
Child to parent, one line each on stdout: ``ready`` once the socket listens, ``wake`` when
a message was queued here (a resend), so that the server's worker picks it up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postroom.control import listen
from postroom.ingress.http_front import ASGIApp, Context, Message, Receive, Scope, Send
from postroom.settings import Settings
from postroom.web import fence

log = logging.getLogger(__name__)
HEADER_PREFIX = b"x-postroom-front-"
CLIENT = HEADER_PREFIX + b"client"  # the client's IP address, as the front's peer
SCHEME = HEADER_PREFIX + b"scheme"  # "http" or "https", the client's connection
CHECK = HEADER_PREFIX + b"check"  # "signed-in": answer 204 when the request is, else 403
DELAY = HEADER_PREFIX + b"delay"  # answer header: hold this answer so many seconds
MAX_ARGS = 16 * 1024 * 1024  # a Settings object is a few KB; this bounds a broken pipe


@dataclass(frozen=True)
class ChildArgs:
    settings: Settings  # as `postroom serve` read them (file and environment)
    socket: Path
    worker_owner: str | None  # the server's own worker, shown as such by the admin


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Admitted:
    """The application behind the socket: the front's headers turned back into the ASGI
    scope (client, scheme), a failed login's delay turned into an answer header."""

    def __init__(self, app: ASGIApp, ctx: Context) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        own: dict[bytes, bytes] = {}
        headers = []
        for name, value in scope["headers"]:
            if name.startswith(HEADER_PREFIX):
                own[name] = value
            else:
                headers.append((name, value))
        scheme = own.get(SCHEME, b"http").decode("latin-1")
        scope = {**scope, "headers": headers,
                 "client": (own.get(CLIENT, b"").decode("latin-1"), 0),
                 "scheme": scheme if scheme in ("http", "https") else "http", "state": {}}
        if own.get(CHECK) == b"signed-in":
            from postroom.web import auth

            yes = await auth.signed_in(self.ctx, scope)
            await send({"type": "http.response.start", "status": 204 if yes else 403,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        state = scope["state"]

        async def delayed(message: Message) -> None:
            if message["type"] == "http.response.start" and state.get(fence.DELAY_STATE):
                message = {**message, "headers": [
                    *message.get("headers", ()),
                    (DELAY, str(float(state[fence.DELAY_STATE])).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, delayed)
        except Exception:
            # The application has answered 500 already (its last-resort handler).
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])


def read_args(stream: Any) -> ChildArgs:
    head = stream.read(4)
    if len(head) != 4:
        raise SystemExit("postroom admin process: no arguments on stdin (started by "
                         "`postroom serve` only)")
    size = struct.unpack(">I", head)[0]
    if size > MAX_ARGS:
        raise SystemExit("postroom admin process: arguments too large")
    args = pickle.loads(stream.read(size))  # the parent's own objects, from its pipe only
    if not isinstance(args, ChildArgs):
        raise SystemExit("postroom admin process: unexpected arguments")
    return args


def write_args(args: ChildArgs) -> bytes:
    data = pickle.dumps(args)
    return struct.pack(">I", len(data)) + data


async def serve(args: ChildArgs) -> None:
    import uvicorn

    from postroom.ingress.http_api import create_app
    from postroom.reload import LiveConfig
    from postroom.runtime import Instance

    inst = Instance(args.settings, migrate_apart=True)
    ctx = Context(inst.queue, inst.apps, args.settings, on_enqueued=lambda _id: _say("wake"),
                  worker_owner=args.worker_owner, intake=inst.intake, instance=inst)
    app = Admitted(create_app(ctx, admin="all"), ctx)
    sock = listen(args.socket)
    # Stored configuration changes (made here or anywhere) reach this process the way they
    # reach every other: by the configuration's generation (postroom.reload).
    live = LiveConfig(inst, None, {})
    live_task = asyncio.create_task(live.run(), name="postroom-config-reload")
    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="off", ws="none", log_config=None, access_log=False,
        server_header=False, date_header=False, proxy_headers=False,
        timeout_graceful_shutdown=5, timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024))
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            server.should_exit = True

    loop.add_reader(0, parent_gone)
    _say("ready")  # connections wait in the socket's backlog until uvicorn accepts them
    try:
        await server.serve(sockets=[sock])
    finally:
        live_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live_task
        await live.aclose()
        await inst.queue.writer.aclose()
        inst.close()
        sock.close()
        args.socket.unlink(missing_ok=True)


def main() -> int:
    args = read_args(sys.stdin.buffer)
    from postroom.server import setup_logging

    setup_logging(args.settings.log)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    # Run as the package's module, not as __main__: the pickled ChildArgs names its class
    # by the module's import name.
    from postroom.ingress.admin_child import main as package_main

    sys.exit(package_main())
