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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postroom.logformat import FIELDS
from postroom.store.states import FAILED, PARTIAL, SENT, SUPPRESSED
from postroom.syslog_line import accepted_text
from postroom.syslog_line import accepted_to_syslog as accepted_to_syslog  # its old home

if TYPE_CHECKING:
    from postroom.envelope import Envelope

LOG = logging.getLogger("postroom.mail")
FINISHED = (SENT, PARTIAL, FAILED, SUPPRESSED)


def accepted(env: Envelope) -> None:
    """``env`` is stored (after its commit: an accepted line is never for mail not kept)."""
    if not LOG.isEnabledFor(logging.INFO):  # the hot path of intake: nothing built for nobody
        return
    fields = {"event": "accepted", "id": env.id, "app": env.app, "source": env.source,
              "from": env.sender, "recipients": len(env.recipients), "size": len(env.raw)}
    LOG.info("%s", accepted_text(env), extra={FIELDS: fields})


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
