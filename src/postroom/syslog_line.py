"""The "accepted" mail line, and its way to the system log for short-lived commands.

Apart from postroom.maillog (which re-exports both) because that module sets up a logger:
importing logging is a cost postroom-sendmail, which starts once per message, does not need
to send one datagram.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postroom.envelope import Envelope


def accepted_text(env: Envelope) -> str:
    return (f"{env.id}: accepted from=<{env.sender}> rcpts={len(env.recipients)} "
            f"size={len(env.raw)} source={env.source or '-'}")


def accepted_to_syslog(env: Envelope, socket_path: str,
                       program: str = "postroom-sendmail") -> None:
    """The accepted line of mail a short-lived command stored itself (postroom-sendmail's
    store mode), to the system log at ``socket_path`` (facility mail, as Postfix's postdrop
    logs): the command's stderr belongs to the program that ran it (PHP, cron), and no
    server saw the message arrive. A system log that is missing or full loses the line,
    never the message, which is already stored."""
    import socket
    import time

    pri = 2 * 8 + 6  # facility mail (2), severity info (6): RFC 5424 6.2.1
    line = (f"<{pri}>{time.strftime('%b %d %H:%M:%S')} {program}[{os.getpid()}]: "
            f"{accepted_text(env)}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)  # a stalled journald must not hold up the caller
            sock.sendto(line.encode("utf-8", "replace"), socket_path)
    except OSError:
        pass
