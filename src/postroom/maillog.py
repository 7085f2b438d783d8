"""The mail lines of the server's log, like Postfix's maillog: one when a message is accepted
(its row committed) and one when a delivery run ends (sent, partial, failed, suppressed, or
deferred for a retry), each with the message id.

Called from the two points that record them, postroom.queue.sql's ``Queue.enqueue*`` and
``Queue.finish``, and from nowhere else, so every door (SMTP, HTTP, Python API, resend,
the CLI) and every worker writes the same lines. The structured fields (postroom.logformat)
hold ids, names, counts, the status and the last error, never a secret: transcripts and
credentials are not logged here at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postroom.logformat import FIELDS
from postroom.store.states import FAILED, PARTIAL, SENT, SUPPRESSED

if TYPE_CHECKING:
    from postroom.envelope import Envelope

LOG = logging.getLogger("postroom.mail")
FINISHED = (SENT, PARTIAL, FAILED, SUPPRESSED)


def _accepted_text(env: Envelope) -> str:
    return (f"{env.id}: accepted from=<{env.sender}> rcpts={len(env.recipients)} "
            f"size={len(env.raw)} source={env.source or '-'}")


def accepted(env: Envelope) -> None:
    """``env`` is stored (after its commit: an accepted line is never for mail not kept)."""
    if not LOG.isEnabledFor(logging.INFO):  # the hot path of intake: nothing built for nobody
        return
    fields = {"event": "accepted", "id": env.id, "app": env.app, "source": env.source,
              "from": env.sender, "recipients": len(env.recipients), "size": len(env.raw)}
    LOG.info("%s", _accepted_text(env), extra={FIELDS: fields})


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
            f"{_accepted_text(env)}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)  # a stalled journald must not hold up the caller
            sock.sendto(line.encode("utf-8", "replace"), socket_path)
    except OSError:
        pass


def finished(msg_id: str, *, app: str | None, recipients: Sequence[str], status: str,
             attempts: Sequence[dict[str, Any]], tries: int, last_error: str | None) -> None:
    """A delivery run of ``msg_id`` ended with ``status`` (recorded: the lease held)."""
    if not LOG.isEnabledFor(logging.INFO):
        return
    via = ">".join(a["connection"] for a in attempts) or "-"
    fields = {"event": "finished" if status in FINISHED else status, "id": msg_id,
              "app": app, "connection": attempts[-1]["connection"] if attempts else None,
              "via": via, "recipients": len(recipients), "status": status, "tries": tries,
              "error": last_error}
    LOG.info("%s: to=%s via=%s status=%s tries=%d%s", msg_id, ",".join(recipients), via,
             status, tries, f" error={last_error}" if last_error else "",
             extra={FIELDS: fields})
