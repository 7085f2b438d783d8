"""sd_notify(3) without libsystemd: tell the service manager that `postroom serve` is ready,
reloading or stopping, what it is doing (STATUS=), and that its event loop is alive
(WATCHDOG=1).

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``: a path, or an abstract name written with a leading '@'. Without
the variable (not started by systemd with ``Type=notify``) every function here does nothing
and returns False, so the callers need no condition of their own.

The watchdog pings come from a task on the event loop (``watchdog_loop``), not from a
thread: a loop stuck in a blocking call stops pinging, and systemd restarts the service
after ``WatchdogSec``. That is the failure the watchdog is for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("postroom.system")

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(environ: Mapping[str, str]) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET`` for socket.sendto, or None when there is
    none we can use (unset, or a vsock address, which systemd only gives to VMs)."""
    name = environ.get(SOCKET_ENV, "")
    if name.startswith("@"):  # abstract namespace: a leading NUL byte on the wire
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` ("READY=1", "STATUS=...") as one message; True when it was sent.

    A failure is logged, never raised: the service works the same whether or not the
    manager hears about it (and systemd says it clearly when a READY never comes)."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as err:
        log.warning("could not notify the service manager (%s): %s", SOCKET_ENV, err)
        return False
    return True


def ready(status: str = "") -> bool:
    """Every listener is up and the store is open: systemd may start what depends on us."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    """One line shown by `systemctl status postroom`."""
    return notify(f"STATUS={text}")


def reloading(text: str = "reloading the configuration") -> bool:
    """A reload starts (SIGHUP); send ``ready()`` when it is done. MONOTONIC_USEC tells
    systemd (Type=notify-reload, 253+) which reload this is; older versions ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={text}")


def stopping(text: str = "shutting down: finishing deliveries in flight") -> bool:
    """Shutdown begins: systemd shows the service as deactivating, not failed."""
    return notify("STOPPING=1", f"STATUS={text}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of ``WatchdogSec``, as sd_watchdog_enabled
    advises), or None when no watchdog is asked of this process. ``WATCHDOG_PID``, when set,
    names the process the watchdog is for: a child that inherited the variables must not
    ping in its parent's name."""
    env = os.environ if environ is None else environ
    if _address(env) is None:
        return None
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
        pid = int(env.get(WATCHDOG_PID_ENV) or os.getpid())
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping every ``interval`` seconds until cancelled (with the server's other chores)."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> list[asyncio.Task[None]]:
    """The watchdog task on the running loop when systemd asked for one (else none), to
    cancel with the server's other chores."""
    interval = watchdog_interval()
    if interval is None:
        return []
    return [asyncio.create_task(watchdog_loop(interval), name="postroom-watchdog")]
