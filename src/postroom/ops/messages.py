"""One logged message: what an administrator sees of it, and what they do to it (resend,
retry now, delete).

Viewers see everything but the message's content; the body, the HTML preview and the
attachments need the role ``[admin] bodies`` names (admin by default), because a message
can carry a password-reset link, and every look at them is written to the audit log.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select

from postroom import audit, events, mimeparts
from postroom.admin.config import AdminSettings
from postroom.audit import Action, Actor, Role
from postroom.envelope import validate_address
from postroom.exceptions import MessageError
from postroom.ops import require
from postroom.queue import maintenance
from postroom.queue.maintenance import Retried
from postroom.store.schema import SENDING

if TYPE_CHECKING:
    from postroom.runtime import Instance

# The preview the message page frames is part of the view that page recorded: a preview
# asked for by the same actor within this many seconds of a recorded view adds no row.
VIEW_WINDOW = 300.0
MAX_EVENTS = 200
MAX_RESEND_TO = 100
# What the page shows of a text body; the whole message stays available as its .eml.
MAX_TEXT = 256 * 1024


def bodies_role(inst: Instance) -> Role:
    """The lowest role that may see bodies and attachments ([admin] bodies)."""
    return inst.settings.section(AdminSettings).bodies


def may_see_bodies(inst: Instance, actor: Actor) -> bool:
    return actor.may(bodies_role(inst))


def _found(inst: Instance, msg_id: str) -> dict[str, Any]:
    row = inst.queue.log.get(msg_id)
    if row is None:
        raise MessageError(f"no message {msg_id!r}; the log lists every message",
                           code="message.unknown")
    return row


def _recipients(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every recipient with its state, the envelope's first, then the copies the message
    policy added (``forced``: which policy rule; they are retried on their own)."""
    states: dict[str, dict[str, Any]] = dict(row.get("rcpt_status") or {})
    order = list(row.get("recipients") or [])
    order += [r for r in states if r not in order]
    return [{"address": r, "state": str(states.get(r, {}).get("state") or "pending"),
             "code": states.get(r, {}).get("code"), "reply": states.get(r, {}).get("reply"),
             "forced": states.get(r, {}).get("forced")} for r in order]


def _events(inst: Instance, msg_id: str) -> list[dict[str, Any]]:
    return [ev.as_dict() for ev in events.read(inst.engine, message_id=msg_id,
                                               limit=MAX_EVENTS)]


def detail(inst: Instance, actor: Actor, msg_id: str) -> dict[str, Any]:
    """The message's log entry without its content: summary, decoded header fields,
    recipients and their states, every attempt with its transcript and advice, the
    provider events; ``may_see_body`` says whether ``actor`` may ask for :func:`body_parts`.
    ``msg_id`` may be a unique prefix of 6+ characters."""
    from postroom.diagnostics.advice import advice_for_attempt

    require(actor, Role.VIEWER, "read the email log")
    row = _found(inst, msg_id)
    raw = row.pop("raw", None)
    row["purged"] = raw is None
    row["headers"] = [] if raw is None else mimeparts.headers(bytes(raw))
    row["recipient_states"] = _recipients(row)
    for attempt in row["attempts"]:
        attempt["advice"] = advice_for_attempt(attempt, settings=inst.settings)
    row["events"] = _events(inst, row["id"])
    from postroom.webhooks.intake import EventLog

    row["delivery_events"] = EventLog(inst.queue).for_message(row["id"])
    row["may_see_body"] = may_see_bodies(inst, actor)
    row["retryable"] = row["status"] not in ("sent", SENDING) and raw is not None
    return row


def full_id(inst: Instance, msg_id: str) -> str:
    """The full id of a message given by its id or a unique prefix (6+ characters)."""
    return maintenance.resolve(inst.queue, msg_id)


def _raw(inst: Instance, msg_id: str) -> tuple[str, bytes]:
    full = maintenance.resolve(inst.queue, msg_id)
    raw = inst.queue.log.body(full)
    if raw is None:
        raise MessageError(f"message {full} has no body any more (purged by retention)",
                           code="message.purged")
    return full, raw


def _check_bodies(inst: Instance, actor: Actor) -> None:
    require(actor, bodies_role(inst), "see message bodies and attachments ([admin] bodies)")


def body_parts(inst: Instance, actor: Actor, msg_id: str) -> mimeparts.Body:
    """The text and HTML bodies and the list of attachments; one audit row per call."""
    _check_bodies(inst, actor)
    full, raw = _raw(inst, msg_id)
    body = mimeparts.read(raw)
    audit.record(inst.engine, actor, Action.MESSAGE_VIEW_BODY, full, {"what": "body"})
    return body


def preview(inst: Instance, actor: Actor, msg_id: str) -> str | None:
    """The HTML body with its cid: images inline (None when it has none). Audited unless
    this actor's view of the message was recorded in the last VIEW_WINDOW seconds (the
    message page that frames it)."""
    _check_bodies(inst, actor)
    full, raw = _raw(inst, msg_id)
    html = mimeparts.read(raw).html
    if html is None:
        return None
    seen = audit.read(inst.engine, since=time.time() - VIEW_WINDOW, actor=actor.label,
                      action=Action.MESSAGE_VIEW_BODY.value, obj=full, limit=1)
    if not seen:
        audit.record(inst.engine, actor, Action.MESSAGE_VIEW_BODY, full, {"what": "html"})
    return mimeparts.inline_images(raw, html)


def attachment(inst: Instance, actor: Actor, msg_id: str, index: int) -> tuple[
        mimeparts.Part, bytes]:
    """Part number ``index`` (as body_parts lists it) and its bytes; audited."""
    _check_bodies(inst, actor)
    full, raw = _raw(inst, msg_id)
    found = mimeparts.part(raw, index)
    if found is None:
        raise MessageError(f"message {full} has no attachment number {index}; its page "
                           "lists them", code="message.part_unknown")
    audit.record(inst.engine, actor, Action.MESSAGE_VIEW_BODY, full,
                 {"what": "attachment", "part": index, "filename": found[0].filename})
    return found


def resend(inst: Instance, actor: Actor, msg_id: str, to: list[str] | None = None) -> str:
    """Queue a copy of the message as a new log entry, to its original recipients or to
    ``to``; returns the copy's id."""
    require(actor, Role.ADMIN, "resend a message")
    addresses: list[str] = []
    for a in to or []:
        a = a.strip()
        if a and a not in addresses:
            addresses.append(validate_address(a))
    if to is not None and not addresses:
        raise MessageError("no address to resend to; give one, or resend to the original "
                           "recipients", code="address.empty")
    if len(addresses) > MAX_RESEND_TO:
        raise MessageError(f"{len(addresses)} addresses: resend to at most {MAX_RESEND_TO} "
                           "at once", code="message.too_many_recipients")
    full = maintenance.resolve(inst.queue, msg_id)
    new_id = inst.queue.resend_sync(full, addresses or None)
    audit.record(inst.engine, actor, Action.MESSAGE_RESEND, full,
                 {"copy": new_id, "to": addresses or "the original recipients"})
    return new_id


def retry(inst: Instance, actor: Actor, msg_id: str) -> Retried:
    """Make the message due now (queue.maintenance.retry says what that means per state)."""
    require(actor, Role.ADMIN, "retry a message")
    done = maintenance.retry(inst.queue, msg_id)
    audit.record(inst.engine, actor, Action.MESSAGE_RETRY, done.id,
                 {"was": done.was, "recipients": list(done.recipients)})
    return done


def delete(inst: Instance, actor: Actor, msg_id: str) -> bool:
    """Delete the message and its attempts (never while it is being sent); False when it
    was not there. The audit row is written in the same transaction."""
    require(actor, Role.ADMIN, "delete a message")
    try:
        full = maintenance.resolve(inst.queue, msg_id)
    except MessageError as err:
        if err.code == "message.unknown":
            return False
        raise

    def op(conn: Connection) -> bool:
        from postroom.store.schema import messages

        status = conn.execute(select(messages.c.status).where(messages.c.id == full)
                              .with_for_update()).scalar()
        if status is None:
            return False
        if status == SENDING:
            raise MessageError(f"message {full} is being sent right now; wait for the attempt "
                               "to end, then delete it", code="message.sending")
        n, _ = maintenance.delete_messages(conn, [full])
        audit.record(conn, actor, Action.MESSAGE_DELETE, full, {"status": status})
        return bool(n)

    deleted: bool = inst.queue.writer.run_sync(op)
    return deleted
