"""Recording delivery results: a claimed message's next state and its attempt rows.

A result is applied only while the lease it was claimed under is still ours (another worker
may have taken the message after our lease ran out); its attempts are recorded either way.
A batch's results are written together (postroom.queue.commit), not two statements per
message: this is the worker's hot path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, insert, select, update

from postroom.queue.lease import Claimed
from postroom.store.schema import SENDING, attempts, messages


@dataclass(frozen=True, slots=True)
class FinishRow:
    """A delivery run's result: its message's new state and its attempt rows."""

    params: dict[str, Any]  # the bind parameters of _FINISH
    attempts: list[dict[str, Any]]


def finish_row(
    msg: Claimed,
    *,
    status: str,
    next_attempt_at: float,
    last_error: str | None,
    attempts: Sequence[dict[str, Any]],
    copy_due: float | None,
    now: float,
) -> FinishRow:
    return FinishRow(
        {
            "b_id": msg.id,
            "b_token": msg.token,
            "status": status,
            "next_attempt_at": next_attempt_at,
            "rcpt_status": msg.rcpt_status,
            "last_error": last_error,
            "counted": 1 if attempts else 0,
            "updated_at": now,
            "copy_due": copy_due,
            "via": attempts[-1]["connection"] if attempts else None,
        },
        [{"message_id": msg.id, **a} for a in attempts],
    )


def record(conn: Connection, fins: list[FinishRow]) -> list[bool]:
    """Write a batch of results; for each, whether its lease was still ours."""
    if conn.dialect.name == "postgresql":
        return _record_pg(conn, fins)
    return _record_any(conn, fins)


def _record_any(conn: Connection, fins: list[FinishRow]) -> list[bool]:
    """Whose lease is still ours (one SELECT), then two executemany."""
    ids = [f.params["b_id"] for f in fins]
    held = {(r[0], r[1]) for r in conn.execute(_LEASES, {"ids": ids})}
    mine = [(f.params["b_id"], f.params["b_token"]) in held for f in fins]
    if any(mine):
        conn.execute(_FINISH, [f.params for f, ok in zip(fins, mine, strict=True) if ok])
    rows = [row for f in fins for row in f.attempts]
    if rows:
        conn.execute(_INSERT_ATTEMPT, rows)
    return mine


def _record_pg(conn: Connection, fins: list[FinishRow]) -> list[bool]:
    """The same in one statement (one round trip, one prepared plan whatever the batch
    size): the rows go as two JSON documents, which json.dumps writes at C speed and
    json_to_recordset() turns back into rows."""
    dumps = functools.partial(json.dumps, ensure_ascii=False)
    results = [{"id": p["b_id"], "token": p["b_token"], "status": p["status"],
                "next_attempt_at": p["next_attempt_at"], "rcpt_status": p["rcpt_status"],
                "last_error": p["last_error"], "counted": p["counted"],
                "updated_at": p["updated_at"], "copy_due": p["copy_due"], "via": p["via"]}
               for p in (f.params for f in fins)]
    tried = [row for f in fins for row in f.attempts]
    done = conn.exec_driver_sql(_FINISH_PG, {"results": dumps(results),
                                             "attempts": dumps(tried)})
    held = {row[0] for row in done}
    return [r["id"] in held for r in results]


# Attempts are recorded even with a lost lease (they happened; the log tells it), so the
# INSERT does not depend on the UPDATE. Both see the same snapshot and run once each.
# A forced copy's run (a finished message, not 'sending') keeps the message's status and
# error: those belong to its own recipients (postroom.policy).
_FINISH_PG = """
WITH v AS (
  SELECT * FROM json_to_recordset(%(results)s::json)
    AS v(id text, token text, status text, next_attempt_at float8, rcpt_status json,
         last_error text, counted int, updated_at float8, copy_due float8, via text)
), done AS (
  UPDATE messages AS m
  SET status = CASE WHEN m.status = 'sending' THEN v.status ELSE m.status END,
    next_attempt_at = v.next_attempt_at,
    lease_owner = NULL, lease_until = NULL, attempt_count = m.attempt_count + v.counted,
    rcpt_status = v.rcpt_status,
    last_error = CASE WHEN m.status = 'sending' THEN v.last_error ELSE m.last_error END,
    updated_at = v.updated_at, copy_due = v.copy_due, via = coalesce(v.via, m.via)
  FROM v WHERE m.id = v.id AND m.lease_owner = v.token
  RETURNING m.id
), tried AS (
  INSERT INTO attempts (message_id, connection, started_at, ended_at, outcome, reply_code,
                        reply_text, error_code, permanent, recipients, transcript,
                        provider_id)
  SELECT a.message_id, a.connection, a.started_at, a.ended_at, a.outcome, a.reply_code,
         a.reply_text, a.error_code, coalesce(a.permanent, false), a.recipients,
         coalesce(a.transcript, ''), a.provider_id
  FROM json_to_recordset(%(attempts)s::json)
    AS a(message_id text, connection text, started_at float8, ended_at float8,
         outcome text, reply_code int, reply_text text, error_code text, permanent bool,
         recipients json, transcript text, provider_id text)
)
SELECT id FROM done
"""

# Statements built once: SQLAlchemy then only looks up their compiled form.
_INSERT_ATTEMPT = insert(attempts)
_OWN_RUN = messages.c.status == SENDING  # not a forced copy's run (see _FINISH_PG)
_FINISH = (
    update(messages)
    .where(messages.c.id == bindparam("b_id"), messages.c.lease_owner == bindparam("b_token"))
    .values(
        status=case((_OWN_RUN, bindparam("status")), else_=messages.c.status),
        next_attempt_at=bindparam("next_attempt_at"),
        lease_owner=None,
        lease_until=None,
        attempt_count=messages.c.attempt_count + bindparam("counted"),
        rcpt_status=bindparam("rcpt_status", type_=messages.c.rcpt_status.type),
        last_error=case((_OWN_RUN, bindparam("last_error")), else_=messages.c.last_error),
        updated_at=bindparam("updated_at"),
        copy_due=bindparam("copy_due"),
        # the connection of the last attempt, for the log's connection filter
        via=func.coalesce(bindparam("via", type_=messages.c.via.type), messages.c.via),
    )
)
# Who holds these messages' leases (locked on PostgreSQL until the batch commits).
_LEASES = (
    select(messages.c.id, messages.c.lease_owner)
    .where(messages.c.id.in_(bindparam("ids", expanding=True)))
    .with_for_update()
)
