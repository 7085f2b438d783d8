"""The email log: filters, cursor pages, counts, text search and the dashboard's rollups.

Every reader of the log (``postroom log`` / ``show``, the HTTP API, exports, the web admin)
goes through :class:`Log`; the queue (``postroom.queue.sql``) only writes. Triggers of
migration 0008 do the bookkeeping, so every writer (the queue, ``postroom-sendmail``'s
direct SQLite insert, retention, maintenance) keeps the log right without knowing:

- text searches of 3+ characters use SQLite FTS5 (``trigram``) or PostgreSQL ``pg_trgm``;
  shorter ones cannot (a trigram index has nothing to look up for two characters) and
  match with LIKE over the table, which is what a two-letter search costs anyway;
- the text index is written after the enqueue's commit, not in it: which messages wait for
  it is :mod:`postroom.store.pending`'s (SQLite: the rowids above a mark, so the enqueue
  writes nothing for it; PostgreSQL: ``log_pending``, filled by an insert trigger), and
  :meth:`Log.index_pending` (:func:`index_loop`, a chore of every worker process) indexes
  them in batches. A search reads the index *and* the pending
  rows (LIKE over those few), so its answer is exactly a full scan's at any moment. While
  mail flows the chore works DUTY of the time (the enqueue and the worker keep the CPU and
  the SQLite write lock), at full speed when idle or when PENDING_BOUND rows wait;
- a search for a whole address (``bob@example.com``: the recipient or sender filter) finds
  the messages that have exactly that address (case-insensitive) in the envelope or the
  To / From header, from ``log_addresses`` (migration 0011), which the same indexer fills:
  one B-tree range, where the trigrams of a whole address ("exa", ".co") are in every row.
  Part of an address (``bob@``, ``example.com``) is a substring search, as text is;
- a text common enough to have a page among the newest rows (a word in every eighth
  subject) is not looked up in an index (SQLite: its trigrams are all common; PostgreSQL:
  a page is among the newest 2,000 rows): walking the log newest first finds the page
  after a few hundred rows, where fetching and sorting 100,000 candidates took seconds;
- where the planner cannot find a page's rows in order (a whole address in thousands of
  messages; PostgreSQL: a LIKE it cannot estimate), :meth:`Log.page` looks for the page
  among the newest rows first (:meth:`Log.window`), then wider, then in the whole log;
- ``log_rollups`` counts finished messages per (created hour, status, connection, app), so
  the dashboard reads a few hundred rows instead of counting the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Select,
    Text,
    and_,
    case,
    cast,
    column,
    func,
    literal_column,
    or_,
    select,
    table,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from postroom import events
from postroom.exceptions import MessageError
from postroom.store import addresses, pending
from postroom.store.db import is_postgresql, write_transaction
from postroom.store.schema import (
    FAILED,
    FINISHED_WHERE,
    ROLLUP_STATUSES,
    STATUSES,
    WAITING,
    attempts,
    log_pending,
    log_rollups,
    messages,
)
from postroom.store.states import PARTIAL, SENDING, SENT

log = logging.getLogger(__name__)

Cursor = tuple[float, str]  # (created_at, id) of the last row shown

HOUR = 3600
MIN_INDEXED = 3  # a trigram index matches nothing shorter (FTS5 trigram, pg_trgm)
# How text searches pick their trigrams (Log._rare_trigrams).
WINDOW = 20_000  # newest rows a trigram's frequency is sampled in
COMMON = 200  # hits in that window (1 %) that make a trigram common
# Hits in that window (10 %) up to which a trigram still joins the rare ones in a search:
# reading its doclist costs less than confirming the candidates it strikes out (a local
# part such as "harbor46668": one rare trigram, "r46", left thousands of candidates).
USABLE = 10 * COMMON
RARE_PICK = 3  # rare trigrams a search asks the index for
MAX_GRAMS = 24  # trigrams sized at most (a long value: an even sample)
_SIZE = text("SELECT count(*) FROM (SELECT 1 FROM messages_fts WHERE messages_fts MATCH :q "
             "AND rowid > :low LIMIT :cap)")
LAST_DELIVERED_WINDOW = 2000  # newest messages of a connection Log.last_delivered looks at
CANDIDATES = 5000  # candidates above which a search of common trigrams walks the log
NEWEST, PAGE = 2000, 50  # PostgreSQL: a text with PAGE hits among the NEWEST walks the log
WIDEN = 4  # Log.window: a whole address's page is first looked for in its WIDEN*limit newest
WIDENINGS, GROWTH = 3, 8  # Log.page: windows tried, each GROWTH times the one before
_FTS_COLUMNS = ("subject", "from_header", "to_header", "sender", "recipients", "message_id")
_CANDIDATES = text("SELECT count(*) FROM (SELECT 1 FROM messages_fts WHERE messages_fts "
                   "MATCH :q LIMIT :cap)")
_ANY = text("SELECT 1 FROM messages_fts WHERE messages_fts MATCH :q LIMIT 1")

# What each text filter matches, in one place: the SQLite FTS5 column set, and the column
# of PostgreSQL's message_search that holds the same columns joined (migration 0008).
_TEXT = ("subject", "from_header", "to_header", "message_id")
_TO = ("to_header", "recipients")
_SENDER = ("sender", "from_header")
_PG_COLUMN = {_TEXT: "body", _TO: "rcpt", _SENDER: "sndr"}
_search = table("message_search", column("id"), *(column(c) for c in _PG_COLUMN.values()))
# message_search's columns from a messages row (prefix `{r}`): what the indexer writes and
# what a search of the pending rows compares, so both give the same answer. (Migration 0008
# keeps its own copy: a migration does not change with later code.)
_PG_SEARCH = {
    "body": "{r}subject || E'\\n' || {r}from_header || E'\\n' || {r}to_header || E'\\n' || "
            "{r}message_id",
    "rcpt": "{r}to_header || E'\\n' || {r}recipients::text",
    "sndr": "{r}sender || E'\\n' || {r}from_header",
}
_PG_INDEX = text(f"""
WITH taken AS (
  DELETE FROM log_pending WHERE id IN (
    SELECT id FROM log_pending ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)
  RETURNING id),
written AS (
  INSERT INTO message_search (id, {', '.join(_PG_SEARCH)})
  SELECT m.id, {', '.join(e.format(r='m.') for e in _PG_SEARCH.values())}
  FROM messages m JOIN taken t ON t.id = m.id
  ON CONFLICT (id) DO NOTHING)
SELECT id FROM taken""")
# Rowid order: FTS5 appends to its segments instead of merging in the middle.
_FTS_INDEX = text(f"INSERT INTO messages_fts (rowid, {', '.join(_FTS_COLUMNS)}) "
                  f"SELECT rowid, {', '.join(_FTS_COLUMNS)} FROM messages "
                  "WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY rowid")
# The SQLite rowids of the pending messages: added to the index's candidates.
_FTS_PENDING = f"SELECT rowid FROM messages WHERE rowid > {pending.MARK_SQL}"
# A finished status's filter says the partial status index's condition (schema.py).
_FINISHED: ColumnElement[bool] = literal_column(
    FINISHED_WHERE.replace("status", "messages.status", 1))
INDEX_BATCH = 500  # rows per indexing transaction in the chore: the write lock is held
INDEX_PAUSE = 0.02  # between full batches: writers waiting for the lock get it first
INDEX_INTERVAL = 1.0  # seconds between looks when nothing was pending
# While mail flows, the indexer works at most DUTY of the time (index_loop): on a small box
# it takes the CPU and the SQLite write lock from the enqueue and the worker otherwise, and
# a burst is indexed after it. Searches compare pending rows themselves, at a cost that grows
# with their number: from PENDING_BOUND rows on it works at full speed regardless.
DUTY = 0.1
PENDING_BOUND = 5000
FLOWING = 2.0  # mail flows: a message created in the last FLOWING seconds, or one being sent

# Which text filter reads which role of log_addresses (store/addresses.py).
_ROLE: dict[tuple[str, ...], str] = {_TO: addresses.RECIPIENT, _SENDER: addresses.SENDER}


@dataclass(frozen=True)
class LogFilter:
    """What the log is filtered by; every field optional (None: any)."""

    status: str | None = None
    app: str | None = None
    connection: str | None = None  # the connection that last tried the message
    # In the envelope or the header: a whole address (whole_address) exactly, else a part.
    sender: str | None = None  # the envelope sender or From
    to: str | None = None  # the envelope recipients or To
    text: str | None = None  # in the subject, From, To or Message-ID
    tag: str | None = None
    source: str | None = None
    since: float | None = None  # created at or after (epoch seconds)
    until: float | None = None  # created before
    event: str | None = None  # had a delivery event of this kind (webhooks.Kind: bounced...)

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise MessageError(f"status {self.status!r} is not a message state: use one of "
                               f"{', '.join(STATUSES)}", code="log.filter")
        if self.event is not None:
            from postroom.webhooks import Kind

            if self.event not in set(Kind):
                raise MessageError(f"event {self.event!r} is not a delivery event: use one "
                                   f"of {', '.join(Kind)}", code="log.filter")

    def query_string(self) -> str:
        """The filter as URL query parameters (the fields that are set), for links."""
        pairs = [(f.name, _show(getattr(self, f.name))) for f in fields(self)
                 if getattr(self, f.name) not in (None, "")]
        return urlencode(pairs)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> LogFilter:
        """The filter from URL query parameters: unknown keys ignored, empty ones unset;
        ``since``/``until`` in epoch seconds. A bad value is a MessageError naming it."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = m.get(f.name)
            if raw is None or str(raw).strip() == "":
                continue
            value = str(raw).strip()
            if len(value) > 320:
                raise MessageError(f"{f.name}: at most 320 characters, got {len(value)}",
                                   code="log.filter")
            if f.name in ("since", "until"):
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number) or number < 0:
                    raise MessageError(f"{f.name} = {value!r}: give a time in epoch seconds "
                                       "(e.g. 1767225600)", code="log.filter")
                values[f.name] = number
            else:
                values[f.name] = value
        return cls(**values)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else (
        str(int(value)) if isinstance(value, float) else str(value))


def escape_like(value: str) -> str:
    """``value`` for inside a LIKE pattern with ``ESCAPE '\\'``: ``%`` and ``_`` literal."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def json_string(value: str) -> str:
    """How a string looks inside a JSON column (for LIKE over a JSON list)."""
    import json

    return json.dumps(value, ensure_ascii=False)


def fts_phrase(value: str) -> str:
    """``value`` as one FTS5 string: inside double quotes everything (``*``, ``NEAR``,
    ``OR``, ``:``...) is literal; a double quote is written twice."""
    return '"' + value.replace('"', '""') + '"'


_warned_no_fts = False


class Log:
    """Read access to the email log of one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pg = is_postgresql(engine)
        self._fts: bool | None = None  # SQLite: is the FTS5 index there (found once)
        self._trgm: bool | None = None  # PostgreSQL: are the pg_trgm indexes there
        self._addresses = False  # log_addresses filled (no backfill left): found once

    # -- where the text filters look -----------------------------------------------------
    def _has_index(self) -> bool:
        if self._pg:
            if self._trgm is None:
                with self.engine.connect() as conn:
                    self._trgm = conn.execute(text(
                        "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_message_search_body'"
                    )).first() is not None
            found = self._trgm
        else:
            if self._fts is None:
                with self.engine.connect() as conn:
                    self._fts = conn.execute(text(
                        "SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'")).first() \
                        is not None
            found = self._fts
        return found

    def _indexed(self) -> bool:
        global _warned_no_fts
        found = self._has_index()
        if not found and not _warned_no_fts:
            _warned_no_fts = True
            log.warning("the log has no text index (see migration 0008's warning): text, "
                        "sender and recipient searches scan the whole table")
        return found

    def _text(self, value: str, memo: dict[str, Any]) -> ColumnElement[bool]:
        """The text filter's condition, decided once per page (Log.page tries it in more
        than one window, and deciding may read the log: _page_among_newest,
        _rare_trigrams). memo["walk"] is the same condition when it walks the log."""
        if "text" not in memo:
            memo["text"] = self._match("fts_text", value, _TEXT, memo=memo)
        found: ColumnElement[bool] = memo["text"]
        return found

    def _match(self, name: str, value: str, cols: tuple[str, ...],
               low: float | None = None, memo: dict[str, Any] | None = None
               ) -> ColumnElement[bool]:
        role = _ROLE.get(cols)
        address = addresses.whole_address(value) if role is not None else None
        if role is not None and address is not None and self._addresses_ready():
            with self.engine.connect() as conn:
                return addresses.exact(conn, role, address, low)
        if self._pg:
            # The pg_trgm GIN index of message_search serves ILIKE of 3+ characters; it
            # rechecks its candidates itself. Pending rows: the same text, from messages.
            pattern = "%" + escape_like(value) + "%"
            col = _PG_COLUMN[cols]
            found = select(_search.c.id).where(_search.c[col].ilike(pattern, escape="\\"))
            walk = literal_column(_PG_SEARCH[col].format(r="messages.")).ilike(
                pattern, escape="\\")
            if self._page_among_newest(walk):
                if memo is not None:
                    memo["walk"] = walk
                # A common text ("password": every eighth message) has a page among the
                # newest rows, where fetching and sorting its 100,000 candidates from the
                # index took seconds: walk the log comparing each row's text (the same
                # text as the index's), pending rows included.
                return walk
            pm = messages.alias("pm")
            waiting = (select(pm.c.id).join(log_pending, log_pending.c.id == pm.c.id)
                       .where(literal_column(_PG_SEARCH[col].format(r="pm."))
                              .ilike(pattern, escape="\\")))
            return messages.c.id.in_(found.union_all(waiting))
        pattern = "%" + escape_like(value.lower()) + "%"
        columns = [cast(messages.c[c], Text) if c == "recipients" else messages.c[c]
                   for c in cols]
        like = or_(*(func.lower(c).like(pattern, escape="\\") for c in columns))
        if len(value) < MIN_INDEXED or not self._indexed():
            return like
        rare = self._rare_trigrams(value)
        if rare is None:  # every piece is common: walking the log finds a page quickly
            return like
        if not rare:  # a piece of it is in no indexed message: only pending ones can match
            return and_(pending.waiting(self._pg), like)
        query = "{" + " ".join(cols) + "} : (" + " AND ".join(map(fts_phrase, rare)) + ")"
        hits = text(f"SELECT rowid FROM messages_fts WHERE messages_fts MATCH :{name} "
                    f"UNION ALL {_FTS_PENDING}") \
            .bindparams(**{name: query}).columns(column("rowid", Integer))
        # The trigrams give the candidates (fetched by rowid: walking the log newest first
        # instead is quicker only when most candidates match, and a crawl when none does);
        # LIKE keeps those that hold the whole text.
        return and_(literal_column("messages.rowid").in_(hits), like)

    def _addresses_ready(self) -> bool:
        """Whether log_addresses answers whole-address searches: the indexer fills it (so
        not on an SQLite without FTS5, which has none) and has read every older message
        (migration 0011's backfill row is gone). Until then they take the trigram path."""
        if not self._addresses and (self._pg or self._has_index()):
            with self.engine.connect() as conn:
                self._addresses = addresses.complete(conn)
        return self._addresses

    def _page_among_newest(self, match: ColumnElement[bool]) -> bool:
        """PostgreSQL: whether the newest NEWEST messages hold a page (PAGE) of ``match``
        rows. Reading them costs a few milliseconds; asking the trigram index how many
        rows it has costs as much as the bitmap of a common text it must build first."""
        m = messages.c
        newest = (select(m.subject, m.from_header, m.to_header, m.message_id, m.sender,
                         m.recipients).order_by(m.created_at.desc()).limit(NEWEST)
                  .subquery("messages"))
        hits = select(newest.c.subject).where(match).limit(PAGE).subquery()
        with self._reader() as conn:
            n = conn.execute(select(func.count()).select_from(hits)).scalar_one()
        return int(n) >= PAGE

    def _rare_trigrams(self, value: str) -> list[str] | None:
        """Up to RARE_PICK of the value's trigrams, the rarest among the newest WINDOW
        messages; [] when one is in no indexed message; None when all are common and
        together still match CANDIDATES messages or more (the log walk finds a page).

        An FTS5 query reads its terms' whole doclists, and a trigram such as "exa" (every
        example.com address) is in nearly every row: a phrase query of a full address
        read them all. A few rare trigrams find the same candidates at a fraction of the
        cost. Each is sized by counting its hits among the newest rows (a rowid range
        the index seeks to), stopping at USABLE; below COMMON it is rare, and the rarest
        up to USABLE narrow it further."""
        # As typed: FTS5 folds case itself (casefold() here could change the length, ß->ss).
        grams = list(dict.fromkeys(value[i:i + 3] for i in range(len(value) - 2)))
        if len(grams) > MAX_GRAMS:  # a long value: an even sample of it is enough
            step = len(grams) / MAX_GRAMS
            grams = [grams[int(i * step)] for i in range(MAX_GRAMS)]
        sized: list[tuple[int, str]] = []
        with self.engine.connect() as conn:
            top = conn.execute(text("SELECT max(rowid) FROM messages")).scalar() or 0
            for gram in grams:
                phrase = fts_phrase(gram)
                n = int(conn.execute(_SIZE, {"q": phrase, "low": top - WINDOW,
                                             "cap": USABLE}).scalar_one())
                if n == 0 and conn.execute(_ANY, {"q": phrase}).first() is None:
                    return []
                sized.append((n, gram))
            sized.sort()
            picked = [g for n, g in sized[:RARE_PICK] if n < USABLE]
            if not sized or sized[0][0] >= COMMON:
                # Each piece is common; together they may still be rare (an order
                # number: common digits, one message). Many candidates: walk the log.
                picked = [g for _, g in sized[:RARE_PICK]]
                query = " AND ".join(map(fts_phrase, picked))
                n = int(conn.execute(_CANDIDATES, {"q": query, "cap": CANDIDATES})
                        .scalar_one())
                if n >= CANDIDATES:
                    return None
        return picked

    def _where(self, q: Select[Any], f: LogFilter, low: float | None = None,
               memo: dict[str, Any] | None = None) -> Select[Any]:
        """``q`` filtered by ``f``; ``low``: only messages created at or after it (a
        Log.window), also applied inside a whole-address lookup; ``memo``: conditions
        kept for the next call of the same page."""
        m = messages.c
        if f.status:
            q = q.where(m.status == f.status)
            if f.status in ROLLUP_STATUSES:
                q = q.where(_FINISHED)
        if f.app:
            q = q.where(m.app == f.app)
        if f.connection:
            q = q.where(m.via == f.connection)
        if f.source:
            q = q.where(m.source == f.source)
        if f.to:
            q = q.where(self._match("fts_to", f.to, _TO, low))
        if f.sender:
            q = q.where(self._match("fts_sender", f.sender, _SENDER, low))
        if f.text:
            q = q.where(self._text(f.text, {} if memo is None else memo))
        if f.tag:
            q = q.where(cast(m.tags, Text).like(
                "%" + escape_like(json_string(f.tag)) + "%", escape="\\"))
        if f.since is not None:
            q = q.where(m.created_at >= f.since)
        if f.until is not None:
            q = q.where(m.created_at < f.until)
        if low is not None:
            q = q.where(m.created_at >= low)
        if f.event:
            from postroom.webhooks.intake import with_event

            q = q.where(m.id.in_(with_event(f.event)))
        return q

    # -- the text index, after the commit ---------------------------------------------------
    def index_pending(self, batch: int = 2000) -> int:
        """Move up to ``batch`` pending messages (store.pending) into the text index, in one
        short write transaction; how many were taken (0: none pending, or no index). Safe
        on every node at once: PostgreSQL's SKIP LOCKED gives each caller other rows, and
        SQLite has one writer at a time. A message deleted meanwhile is simply skipped."""
        if not self._pg and not self._has_index():
            return 0  # no FTS5 here: migration 0008 made no pending trigger either
        with write_transaction(self.engine) as conn:
            if self._pg:
                taken = list(conn.execute(_PG_INDEX, {"n": batch}).scalars())
            else:
                # In arrival (rowid) order: FTS5 appends rowids in order cheaply, rowids
                # from all over its range cost it merges.
                taken, upto = pending.take(conn, batch)
                if taken:
                    conn.execute(_FTS_INDEX, {"ids": json.dumps(taken)})
                    pending.advance(conn, upto)
            addresses.write(conn, taken)
            reread = addresses.reread(conn, batch)
        return len(taken) + reread

    def backfill_addresses(self, batch: int = INDEX_BATCH) -> int:
        """Messages logged before migration 0011 read into log_addresses, about ``batch``
        at a time (:func:`postroom.store.addresses.backfill`); 0 when none are left."""
        if self._addresses:
            return 0
        with write_transaction(self.engine) as conn:
            return addresses.backfill(conn, batch)

    def gives_way(self) -> bool:
        """Whether the indexer should work at DUTY only: mail flows (a message created in
        the last FLOWING seconds, or one being sent) and fewer than PENDING_BOUND messages
        wait for the index. A paused or idle queue: full speed."""
        m = messages.c
        waiting = pending.ids(self._pg).limit(PENDING_BOUND).subquery()
        with self.engine.connect() as conn:
            if conn.execute(select(func.count()).select_from(waiting)).scalar_one() \
                    >= PENDING_BOUND:
                return False
            return any(conn.execute(select(m.id).where(flowing).limit(1)).first() is not None
                       for flowing in (m.status == SENDING,
                                       m.created_at >= time.time() - FLOWING))

    def pending(self) -> int:
        """How many messages wait to be indexed."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(
                pending.ids(self._pg).subquery())).scalar_one())

    def catch_up(self, limit: int = 50_000) -> int:
        """Index pending messages until none are left or ``limit`` were (for a command that
        searches with no server running). Best effort: a reader that may not write (a
        read-only database) gets the same answers, from a LIKE over the pending rows."""
        done = 0
        try:
            while done < limit:
                n = self.index_pending(min(2000, limit - done))
                done += n
                if n == 0:
                    break
        except SQLAlchemyError as err:
            log.debug("cannot index the log's pending messages now: %s", err)
        return done

    # -- pages -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reader(self) -> Iterator[Connection]:
        """A connection for a page of the log. PostgreSQL: without parallel workers. A page
        walks an index until it has its rows; when the planner cannot tell how soon (a
        LIKE on tags, a filter it guesses rare) it starts workers, whose start costs more
        than the walk (on two busy cores, a tag page's median went from 35 to 55-110 ms)."""
        with self.engine.connect() as conn:
            if self._pg:
                conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
            yield conn

    def page(self, f: LogFilter, *, before: Cursor | None = None, limit: int = 50,
             states: bool = False) -> list[dict[str, Any]]:
        """The log, newest first, without bodies. ``before`` = (created_at, id) of the last
        row of the previous page (a cursor that stays correct while new mail arrives,
        unlike an offset); ``states``: with each recipient's state (rcpt_status)."""
        cols = [c for c in messages.c
                if c.name != "raw" and (states or c.name != "rcpt_status")]

        memo: dict[str, Any] = {}

        def query(low: float | None) -> Select[Any]:
            q = self._where(select(*cols), f, low, memo)
            if before is not None:
                at, last_id = before
                q = q.where(or_(messages.c.created_at < at,
                                and_(messages.c.created_at == at, messages.c.id < last_id)))
            return q.order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(limit)

        with self._reader() as conn:
            for step in range(WIDENINGS):
                low = self.window(conn, f, before, limit, scale=GROWTH ** step, memo=memo)
                if low is None:
                    break
                # Every match at or after `low` is in this answer: with a whole page of
                # them, the page is the same as the unbounded query's. Else a wider one.
                rows = conn.execute(query(low)).all()
                if len(rows) >= limit:
                    return [dict(r._mapping) for r in rows]
            return [dict(r._mapping) for r in conn.execute(query(None))]

    def window(self, conn: Connection, f: LogFilter, before: Cursor | None, limit: int,
               scale: int = 1, memo: dict[str, Any] | None = None) -> float | None:
        """The created_at a page of ``f`` is looked for at or after first (None: the whole
        log at once), where the planner cannot find the page's rows in order itself;
        ``scale`` times wider on each try (Log.page):

        - a whole address (sender, recipient) found in thousands of messages: the
          WIDEN * ``limit``-th newest of its log_addresses rows (index order), so the page
          reads those rows instead of fetching and sorting all of them;
        - PostgreSQL, a text common enough to walk the log for (_page_among_newest), or
          a tag filter (no text): the NEWEST-th newest message. The planner cannot
          estimate a LIKE, guesses it rare, and scans the table (or, beside status and
          app, the app index's sixth of it) to sort the matches; within the window it
          walks a few thousand rows. (A rarer text: its trigrams find the rows.)"""
        at = None if before is None else before[0]
        lows: list[float] = []
        for value, cols in ((f.to, _TO), (f.sender, _SENDER)):
            address = addresses.whole_address(value) if value else None
            if address is not None and self._addresses_ready():
                low = addresses.newest_at(conn, _ROLE[cols], address, at,
                                          WIDEN * limit * scale)
                if low is not None:
                    lows.append(low)
        memo = {} if memo is None else memo
        walks = self._pg and bool(f.text) and self._text(f.text or "", memo) is memo.get("walk")
        if self._pg and (walks or (f.tag and not f.text)):
            m = messages.c
            q = (select(m.created_at).order_by(m.created_at.desc())
                 .offset(NEWEST * scale - 1).limit(1))
            low = conn.execute(q if at is None else q.where(m.created_at <= at)).scalar()
            if low is not None:
                lows.append(float(low))
        return max(lows) if lows else None

    def count(self, f: LogFilter, *, cap: int | None = None) -> int:
        """How many messages match; with ``cap``, counting stops there ("more than 10,000"
        costs what 10,000 rows cost, not the whole table)."""
        inner = self._where(select(messages.c.id), f)
        if cap is not None:
            inner = inner.limit(cap)
        with self._reader() as conn:
            return int(conn.execute(select(func.count()).select_from(inner.subquery()))
                       .scalar_one())

    def ids(self, f: LogFilter, *, batch: int = 500) -> Iterator[list[str]]:
        """The ids of every match, newest first, ``batch`` at a time (bulk actions): a
        cursor walk, so acting on one batch does not shift the next."""
        before: Cursor | None = None
        while True:
            q = self._where(select(messages.c.created_at, messages.c.id), f)
            if before is not None:
                q = q.where(or_(messages.c.created_at < before[0],
                                and_(messages.c.created_at == before[0],
                                     messages.c.id < before[1])))
            q = q.order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(batch)
            with self._reader() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            yield [r.id for r in rows]
            if len(rows) < batch:
                return
            before = (rows[-1].created_at, rows[-1].id)

    # -- one message -----------------------------------------------------------------------
    def get(self, msg_id: str) -> dict[str, Any] | None:
        """One message with its attempts (body included); ``msg_id`` may be a unique
        prefix of 6+ characters."""
        with self.engine.connect() as conn:
            row = conn.execute(select(messages).where(messages.c.id == msg_id)).first()
            if row is None and len(msg_id) >= 6:
                found = conn.execute(
                    select(messages).where(
                        messages.c.id.like(escape_like(msg_id) + "%", escape="\\")).limit(2)
                ).all()
                row = found[0] if len(found) == 1 else None
            if row is None:
                return None
            data = dict(row._mapping)
            data["attempts"] = [dict(a._mapping) for a in conn.execute(
                select(attempts).where(attempts.c.message_id == row.id)
                .order_by(attempts.c.id))]
            return data

    def body(self, msg_id: str) -> bytes | None:
        """A message's stored body: None when there is no such message or it was purged."""
        with self.engine.connect() as conn:
            raw = conn.execute(select(messages.c.raw).where(messages.c.id == msg_id)).scalar()
        return None if raw is None else bytes(raw)

    # -- the dashboard ---------------------------------------------------------------------
    def summary(self, since: float, until: float | None = None) -> dict[str, int]:
        """Messages created in [since, until) by status, and ``fallback_used`` events.
        Finished ones (sent, partial, failed) come from the hourly rollups, so ``since``
        counts from the start of its hour; waiting ones from the queue's index (status
        first, created_at in it: migration 0017), which only holds a few rows of those."""
        if until is None:
            return self.overview([since])[0][0]
        out = self._finished([since], until)[0]
        m = messages.c
        w = select(m.status, func.count()).where(
            m.status.in_((*WAITING, SENDING)), m.created_at >= since, m.created_at < until)
        with self.engine.connect() as conn:
            for status, n in conn.execute(w.group_by(m.status)):
                out[status] = int(n)
            out["fallback_used"] = events.count(conn, events.Kind.FALLBACK_USED, since=since,
                                                until=until)
        return out

    def overview(self, sinces: list[float]) -> tuple[list[dict[str, int]], dict[str, Any]]:
        """``summary(since)`` for each of ``sinces`` (until now) and ``queue_depth()``, the
        dashboard's figures, with one pass over the waiting mail for all of them: with a
        big backlog (tens of thousands waiting) each window's own count, and the depth's,
        walked the same index entries again."""
        out = self._finished(sinces, None) if sinces else []
        m = messages.c
        per_window = [func.sum(case((m.created_at >= since, 1), else_=0)) for since in sinces]
        q = (select(m.status, func.count(), func.min(m.created_at), *per_window)
             .where(m.status.in_((*WAITING, SENDING))).group_by(m.status))
        depth: dict[str, Any] = {s: 0 for s in (*WAITING, SENDING)}
        oldest: list[float] = []
        with self.engine.connect() as conn:
            for status, total, first, *counts in conn.execute(q):
                depth[status] = int(total)
                oldest += [float(first)] if first is not None else []
                for window, n in zip(out, counts, strict=True):
                    window[status] = int(n or 0)
            for window, since in zip(out, sinces, strict=True):
                window["fallback_used"] = events.count(conn, events.Kind.FALLBACK_USED,
                                                       since=since)
        first_at = min(oldest) if oldest else None
        depth["oldest_at"] = first_at
        depth["oldest_age"] = None if first_at is None else max(0.0, time.time() - first_at)
        return out, depth

    def _finished(self, sinces: list[float], until: float | None) -> list[dict[str, int]]:
        """Each window's finished messages by status, from the hourly rollups (one query
        for all windows), every status present."""
        starts = [math.floor(since / HOUR) * HOUR for since in sinces]
        r = log_rollups.c
        q = (select(r.status, *[func.sum(case((r.hour >= start, r.count), else_=0))
                                for start in starts])
             .where(r.hour >= min(starts)).group_by(r.status))
        if until is not None:
            q = q.where(r.hour < until)
        out = [{s: 0 for s in (*STATUSES, "fallback_used")} for _ in sinces]
        with self.engine.connect() as conn:
            for status, *sums in conn.execute(q):
                for window, n in zip(out, sums, strict=True):
                    window[status] = int(n or 0)
        return out

    def series(self, since: float, *, bucket: int = HOUR, until: float | None = None
               ) -> list[tuple[float, dict[str, int]]]:
        """Finished messages per ``bucket`` seconds (a whole number of hours) from
        ``since`` to ``until`` (now), oldest first, every bucket present (zeros included):
        a chart. At most 10,000 buckets."""
        if bucket < HOUR or bucket % HOUR:
            raise MessageError(f"bucket = {bucket}: use a whole number of hours in seconds "
                               "(3600, 86400...)", code="log.bucket")
        start = math.floor(since / bucket) * bucket
        r = log_rollups.c
        slot = (func.floor(r.hour / bucket) * bucket).label("slot")
        end = time.time() if until is None else until
        q = (select(slot, r.status, func.sum(r.count))
             .where(r.hour >= start, r.hour < end).group_by(slot, r.status))
        found: dict[float, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for at, status, n in conn.execute(q):
                found.setdefault(float(at), {})[status] = int(n or 0)
        steps = max(0, math.ceil((end - start) / bucket))
        return [(start + i * bucket,
                 {s: found.get(start + i * bucket, {}).get(s, 0) for s in ROLLUP_STATUSES})
                for i in range(min(steps, 10_000))]

    def queue_depth(self) -> dict[str, Any]:
        """Mail still in the queue: counts by status, and the oldest waiting message's
        creation time and age in seconds (None when nothing waits)."""
        return self.overview([])[1]

    def latest_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest failed messages (no body), each with its last attempt ("attempt",
        None if it never got one: expired or refused before a try)."""
        page = self.page(LogFilter(status=FAILED), limit=limit)
        with self.engine.connect() as conn:
            for row in page:
                last = conn.execute(select(attempts).where(attempts.c.message_id == row["id"])
                                    .order_by(attempts.c.id.desc()).limit(1)).first()
                row["attempt"] = None if last is None else dict(last._mapping)
        return page

    def last_delivered(self, connection: str) -> float | None:
        """When the newest message delivered (sent or partly sent) through ``connection``
        was finished, or None. The health table writes its own last_success_at only when a
        connection recovers (not on every success: the hot path), so "last success" for a
        healthy connection comes from here: one walk down the (via, created_at) index."""
        m = messages.c
        # Bounded: a connection that only fails would otherwise walk all its messages on
        # every dashboard view; past the window, the health table's own value stands.
        newest = (select(m.updated_at, m.status).where(m.via == connection)
                  .order_by(m.via.desc(), m.created_at.desc()).limit(LAST_DELIVERED_WINDOW)
                  .subquery())
        with self.engine.connect() as conn:
            at = conn.execute(select(func.max(newest.c.updated_at)).where(
                newest.c.status.in_((SENT, PARTIAL)))).scalar()
        return None if at is None else float(at)

    def counts(self) -> dict[str, int]:
        """Messages by status, over the whole log (statuses with none left out): finished
        ones from the rollups, waiting ones from the queue index."""
        r = log_rollups.c
        m = messages.c
        with self.engine.connect() as conn:
            out = {s: int(n) for s, n in conn.execute(
                select(r.status, func.sum(r.count)).group_by(r.status)) if n}
            out.update(conn.execute(
                select(m.status, func.count()).where(m.status.in_((*WAITING, SENDING)))
                .group_by(m.status)).all())
        return out


def index_pause(taken: int, batch: int, spent: float, gives_way: bool,
                interval: float = INDEX_INTERVAL) -> float:
    """Seconds index_loop waits after a round that indexed ``taken`` rows in ``spent``
    seconds: INDEX_PAUSE after a full batch (more are waiting), ``interval`` after a short
    one; while it gives way to the mail (Log.gives_way), long enough that the round was
    DUTY of the time. Measured per round, so a slow (busy) box slows it down too."""
    pause = INDEX_PAUSE if taken >= batch else interval
    if taken and gives_way:
        pause = max(pause, spent * (1 - DUTY) / DUTY)
    return pause


async def index_loop(log_: Log, *, batch: int = INDEX_BATCH,
                     interval: float = INDEX_INTERVAL) -> None:
    """The indexer chore (serve, ``postroom worker``): index pending messages, batch after
    batch while there are many (at DUTY of the time while mail flows: index_pause), else
    look again every ``interval`` seconds, until cancelled. A failure is logged once (not
    every second while the database is away) and retried; searches stay exact meanwhile,
    only slower."""
    failing = False
    while True:
        taken, gives_way = 0, False
        started = time.monotonic()
        try:
            taken = await asyncio.to_thread(log_.index_pending, batch)
            if not taken:  # nothing new: read older messages' addresses (migration 0011)
                taken = await asyncio.to_thread(log_.backfill_addresses, batch)
            if taken:
                gives_way = await asyncio.to_thread(log_.gives_way)
        except SQLAlchemyError as err:
            if not failing:
                log.warning("indexing the email log failed (retried every %.0f s; searches "
                            "stay right, only slower): %s", interval, err)
            failing = True
        else:
            if failing:
                log.warning("indexing the email log works again")
            failing = False
        spent = time.monotonic() - started
        await asyncio.sleep(index_pause(taken, batch, spent, gives_way, interval))
