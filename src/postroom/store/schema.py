"""Tables. The email log *is* the queue: one ``messages`` row per accepted message and one
``attempts`` row per delivery try. Times are UNIX epoch seconds (float): portable between
SQLite and PostgreSQL and cheap to compare in the claim query.

Changing a table means adding an Alembic revision in ``migrations/versions``.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from postroom.store.states import DEFERRED as DEFERRED
from postroom.store.states import FAILED as FAILED
from postroom.store.states import PARTIAL as PARTIAL
from postroom.store.states import PRIORITIES as PRIORITIES
from postroom.store.states import QUEUED as QUEUED
from postroom.store.states import SENDING as SENDING
from postroom.store.states import SENT as SENT
from postroom.store.states import STATUSES as STATUSES
from postroom.store.states import SUPPRESSED as SUPPRESSED
from postroom.store.states import WAITING as WAITING

metadata = MetaData()
# The messages of ix_messages_status_created (migration 0017): the finished ones. A query
# that wants that index says this very condition too (SQLite uses a partial index only for
# a query whose WHERE has its condition's terms; postroom.store.log).
FINISHED_WHERE = "status IN ('sent', 'partial', 'failed', 'suppressed')"


def partial_index(name: str, *columns: str, where: str) -> Index:
    """An index of the rows where ``where`` holds, on SQLite and PostgreSQL alike (the
    migrations create it so on both). Only SQLite's predicate is a SQLAlchemy keyword
    (``sqlite_where``); PostgreSQL's is kept in ``info``: a ``postgresql_where`` keyword
    makes SQLAlchemy import its whole PostgreSQL dialect to check it, in every process,
    SQLite ones included (tests/test_memory_imports.py). Alembic does not compare index
    predicates, so the declared schema still matches what the migrations build."""
    return Index(name, *columns, sqlite_where=text(where), info={"postgresql_where": where})


messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("attempt_count", Integer, nullable=False, default=0),
    Column("sender", String(320), nullable=False),
    Column("recipients", JSON, nullable=False),  # every envelope recipient, in order
    # {address: {"state": "pending"|"sent"|"failed", "code": int, "reply": str}}
    Column("rcpt_status", JSON, nullable=False),
    Column("source", String(80), nullable=False),  # the door, for the log ("smtp:shop")
    # The app that owns the message: set only when a door authenticated one (API key, SMTP
    # AUTH, Mailer(app=...)). Apps read and resend by equality on this, never on `source`.
    Column("app", String(64)),
    Column("connection", String(64)),  # pinned connection, if the sender chose one
    Column("message_id", String(255), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("from_header", String(255), nullable=False),
    Column("to_header", String(1000), nullable=False),
    Column("size", Integer, nullable=False),
    Column("raw", LargeBinary),  # NULL only after a retention purge (later issue)
    Column("last_error", Text),
    Column("tags", JSON),  # the app's labels for this message (API, Mailer), for search
    Column("meta", JSON),  # the app's own key/value pairs ("metadata" in the API)
    # PRIORITIES: higher goes first (a password reset before a newsletter).
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    # When a policy-forced copy (an archive Bcc) of a finished message is due again on its
    # own; NULL when none waits (postroom.policy, migration 0007).
    Column("copy_due", Float),
    # The connection that last tried the message (the log's connection filter, migration
    # 0008); `connection` above is only the one the sender pinned.
    Column("via", String(64)),
    # The claim's (status, priority, next_attempt_at); created_at at the end (migration 0017)
    # gives the dashboard's waiting counts and oldest waiting message from the index alone,
    # now that the status index below has finished messages only.
    Index("ix_messages_due", "status", "priority", "next_attempt_at", "created_at"),
    # Partial: only the few rows with a copy waiting are in it, so no other write pays for it
    # (a comparison on copy_due implies NOT NULL: SQLite and PostgreSQL both use it).
    partial_index("ix_messages_copy_due", "copy_due", where="copy_due IS NOT NULL"),
    Index("ix_messages_created", "created_at"),
    # The log's filters, newest first (postroom.store.log, migration 0008). Text columns
    # have no B-tree index: a trigram index kept by the database serves their searches.
    # Partial (migration 0017): finished messages only, so an enqueue and a claim do not
    # write it; a waiting status is the queue's, found through ix_messages_due.
    partial_index("ix_messages_status_created", "status", "created_at",
                  where=FINISHED_WHERE),
    # Partial: mail of no app (sendmail, plain SMTP) and an enqueue (no via yet) do not write
    # them; `app = x` / `via = x` implies the condition, so the filters still use them.
    partial_index("ix_messages_app_created", "app", "created_at", where="app IS NOT NULL"),
    partial_index("ix_messages_via_created", "via", "created_at", where="via IS NOT NULL"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        String(32),
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("connection", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),  # sent | partial | deferred | failed
    Column("reply_code", Integer),
    Column("reply_text", Text),
    Column("error_code", String(64)),  # exceptions.*.code, stable for advice and API
    Column("permanent", Boolean, nullable=False, default=False),
    Column("recipients", JSON, nullable=False),  # {address: {"code", "reply", "state"}}
    Column("transcript", Text, nullable=False, default=""),  # AUTH secrets redacted
    # The provider's id for the message (an API's message id, an SMTP queue id): delivery
    # events (webhooks) find their message by (connection, provider_id). Migration 0012.
    Column("provider_id", String(255)),
    Index("ix_attempts_message", "message_id", "id"),
    Index("ix_attempts_provider", "connection", "provider_id"),
)

apps = Table(
    "apps",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("secret_hash", String(255), nullable=False),  # HMAC-SHA256 (older rows: argon2id)
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("rotated_at", Float),
    Column("allowed_senders", JSON),  # addresses / domains it may send as; NULL: any
    Column("allowed_connections", JSON),  # connections it may pin and see; NULL: any
    Column("rate_limit", String(32)),  # "100/hour"; NULL: none
)

secrets = Table(
    "secrets",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("ciphertext", Text, nullable=False),  # Fernet token
    Column("updated_at", Float, nullable=False),
)

# The same Idempotency-Key from the same app returns the first message, never a second one.
idempotency = Table(
    "idempotency",
    metadata,
    Column("app", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("message_id", String(32), nullable=False),
    Column("request_hash", String(64), nullable=False),  # sha256 of the request it answered
    Column("created_at", Float, nullable=False),
)

# Every running worker refreshes its row; /healthz and the CLI tell live from gone.
workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),  # host:pid, as in messages.lease_owner
    Column("started_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
)

# Per connection, shared by every worker and node: pause switch, circuit breaker, health.
connection_state = Table(
    "connection_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("paused", Boolean, nullable=False, default=False),
    Column("health", String(16), nullable=False, default="up"),  # up | degraded | down
    Column("failures", Integer, nullable=False, default=0),  # consecutive, connection-level
    Column("since", Float, nullable=False),  # when `health` last changed
    Column("open_until", Float),  # circuit open (skipped) until then; then probed again
    Column("last_error", Text),
    Column("last_error_at", Float),
    Column("last_success_at", Float),
    # Skipped until then at the provider's request (Retry-After; routing.health). 0012.
    Column("held_until", Float),
)

# One row per message handed to a rate-limited connection: the sliding windows count these.
send_log = Table(
    "send_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_send_log", "connection", "at"),
)

# Sessions open on a connection with a `sessions` limit, leased like messages are.
session_leases = Table(
    "session_leases",
    metadata,
    Column("holder", String(96), primary_key=True),
    Column("connection", String(64), nullable=False),
    Column("until", Float, nullable=False),
    Index("ix_session_leases", "connection", "until"),
)

# Things worth telling someone about (alerts read these): fallback used, connection down...
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("message_id", String(32)),
    Column("connection", String(64)),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_events_at", "at"),
    # A message's events, for its page (migration 0008); most events concern no message.
    partial_index("ix_events_message", "message_id", where="message_id IS NOT NULL"),
)

# Instance-wide switches (e.g. the whole queue paused), shared by every node.
control = Table(
    "control",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# OAuth 2.0 grants, one per connection (postroom.oauth): tokens are Fernet ciphertext.
oauth_grants = Table(
    "oauth_grants",
    metadata,
    Column("connection", String(64), primary_key=True),
    Column("provider", String(32), nullable=False),
    Column("client_id", String(255), nullable=False),
    # authorization_code | device_code | client_credentials | service_account
    Column("grant_type", String(32), nullable=False),
    Column("account", String(320)),  # who granted (as the provider named them), if known
    Column("scopes", Text, nullable=False),  # granted, space separated
    Column("access_token", Text),
    Column("refresh_token", Text),
    Column("expires_at", Float),  # of the access token
    Column("issued_at", Float),  # of the access token
    Column("refresh_expires_at", Float),  # when the provider said the refresh token dies
    Column("granted_at", Float, nullable=False),  # the user's consent (login)
    Column("last_refresh_at", Float),
    Column("last_used_at", Float),  # a token was last handed to a transport (coarse)
    Column("refreshes", Integer, nullable=False, default=0),
    Column("generation", Integer, nullable=False, default=0),  # +1 at every new access token
    Column("state", String(16), nullable=False, default="ok"),  # ok | dead
    Column("last_error", Text),
    Column("last_error_code", String(64)),
    Column("last_error_at", Float),
)

# Authorizations started (/oauth/start) and not finished yet: state -> PKCE verifier.
oauth_pending = Table(
    "oauth_pending",
    metadata,
    Column("state", String(64), primary_key=True),
    Column("connection", String(64), nullable=False),
    Column("verifier", Text, nullable=False),  # Fernet ciphertext
    Column("redirect_uri", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_oauth_pending_created", "created_at"),
)

# -- config in the database (issue 13, postroom.store.dbconfig) --------------------------------
# Connections, routes, policy and retention made in the web admin (or imported). One row per
# connection (name = its name); the route list, the policy and the retention keys one row each
# (name ""). Never a secret: those go to `secrets`. Every change bumps the `control` row
# "config.generation" in the same transaction, which every process polls to reload.
config_entries = Table(
    "config_entries",
    metadata,
    Column("kind", String(16), primary_key=True),  # postroom.store.dbconfig.Kind
    Column("name", String(64), primary_key=True),
    Column("body", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(160), nullable=False),  # audit.Actor.label
)

# -- the email log's rollups (postroom.store.log, migration 0008) ---------------------------
# Finished messages per hour of creation, status, connection that last tried them and app,
# kept by triggers on `messages` (every writer, no code of theirs involved): the dashboard
# sums a few hundred of these rows instead of counting the table. Waiting messages are not
# counted here: they change state at every try, and the queue index counts them cheaply.
ROLLUP_STATUSES = (SENT, PARTIAL, FAILED, SUPPRESSED)  # SUPPRESSED: migration 0014
log_rollups = Table(
    "log_rollups",
    metadata,
    Column("hour", Float, primary_key=True),  # the creation hour's start, epoch seconds
    Column("status", String(16), primary_key=True),
    Column("connection", String(64), primary_key=True),  # messages.via, '' for none
    Column("app", String(64), primary_key=True),  # '' for none
    Column("count", Integer, nullable=False),
)

# Messages not in the text index yet (postroom.store.log.Log.index_pending, migration 0008),
# PostgreSQL only since migration 0017 (SQLite: a rowid mark, postroom.store.pending): an
# insert trigger adds the ids, the indexer takes batches of them after the commit, so the
# enqueue pays for one narrow row instead of the index. Searches read these rows directly.
log_pending = Table(
    "log_pending",
    metadata,
    # messages.id. On SQLite the table's rowid is the arrival order the indexer follows:
    # FTS5 appends rowids in order cheaply, rowids from all over its range cost it merges.
    Column("id", String(32), primary_key=True),
)

# Every address of each indexed message, lower-cased (postroom.store.addresses, migr. 0011):
# a search for a whole address is one B-tree lookup here instead of a trigram search whose
# trigrams ("exa", ".co") are in every row. Written by the indexer with the text index (not
# by the enqueue); role "r" = envelope recipients and To, "s" = envelope sender and From,
# "p" = a marker (address "") for a message whose addresses changed and wait to be re-read.
log_addresses = Table(
    "log_addresses",
    metadata,
    Column("role", String(1), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("message_id", String(32), primary_key=True),
    # The message's created_at: a page of one address reads its newest rows in index order.
    Column("created_at", Float, nullable=False, server_default="0"),
    Index("ix_log_addresses_message", "message_id"),  # a deleted message's rows
    Index("ix_log_addresses_newest", "role", "address", "created_at"),
    sqlite_with_rowid=False,  # the key is the row: one B-tree, not a table and an index
)

# -- the web admin's accounts, sessions, API tokens and the audit log (migration 0009) ------

# Admin accounts (postroom.admin.accounts). Failures and lockout live here, not in a
# process, so every node sees them.
admin_accounts = Table(
    "admin_accounts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", String(255), nullable=False),  # argon2id
    Column("role", String(16), nullable=False),  # audit.Role
    Column("created_at", Float, nullable=False),
    Column("last_login_at", Float),
    Column("password_changed_at", Float, nullable=False),  # sessions from before it end
    Column("totp_secret", Text),  # Fernet ciphertext; NULL: no second factor
    Column("totp_last", Integer),  # the last TOTP time step used: a code works once
    Column("failed_logins", Integer, nullable=False, default=0, server_default="0"),
    Column("locked_until", Float),
)

# Logged-in sessions (postroom.admin.sessions): only sha256 of the cookie's token is kept.
admin_sessions = Table(
    "admin_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("account", String(64),
           ForeignKey("admin_accounts.name", ondelete="CASCADE"), nullable=False),
    Column("role", String(16), nullable=False),  # at login; lookup reads the account's
    Column("csrf", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # password | sso
    Column("ip", String(64)),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_admin_sessions_account", "account"),
    Index("ix_admin_sessions_expires", "expires_at"),
)

# Admin API tokens (postroom.admin.tokens): prt_<id>_<secret>, the secret kept as an HMAC.
admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("account", String(64),
           ForeignKey("admin_accounts.name", ondelete="CASCADE"), nullable=False),
    Column("label", String(100), nullable=False),
    Column("token_hash", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Index("ix_admin_tokens_account", "account"),
)

# Who did what, when, to which object (postroom.audit); detail is JSON, secrets masked.
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(160), nullable=False),  # "admin:alice", "cli:root", "token:bob"
    Column("action", String(48), nullable=False),  # audit.Action
    Column("object", String(200), nullable=False, default=""),
    Column("detail", Text, nullable=False, default="{}"),
    Column("ip", String(64)),
    Index("ix_audit_at", "at"),
)

# -- delivery events (postroom.webhooks.intake, migration 0013) -------------------------------
# What became of a message after it left: a provider's webhook events and the DSNs that came
# back to the bounce address, in the closed vocabulary of postroom.webhooks.Kind, with the raw
# payload (JSON text, bounded). ``event_key``: the provider's event id, else the sha256 of the
# event; unique per connection, so a replayed or re-sent event is recorded once. Attached to
# the message by attempts.provider_id (or its Message-ID); NULL: mail sent some other way.
delivery_events = Table(
    "delivery_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(64), nullable=False),
    Column("event_key", String(64), nullable=False),
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="CASCADE")),
    Column("provider_id", String(255)),
    Column("recipient", String(320)),
    Column("kind", String(16), nullable=False),  # webhooks.Kind
    Column("permanent", Boolean),  # bounces: hard (true) or soft, where the provider says
    Column("at", Float, nullable=False),  # when it happened (the provider's clock)
    Column("received_at", Float, nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Column("raw", Text, nullable=False, default=""),
    Index("ux_delivery_events_key", "connection", "event_key", unique=True),
    partial_index("ix_delivery_events_message", "message_id", where="message_id IS NOT NULL"),
    # The log's event filter: messages that bounced or complained, newest first.
    Index("ix_delivery_events_kind", "kind", "received_at"),
)

# -- the suppression list (postroom.suppression, migration 0014) ------------------------------
# Addresses no mail is sent to: hard bounces, complaints, unsubscribes (from delivery events),
# or added by hand. ``address``: lower-cased, A-label domain; ``scope``: '*' (every sender) or
# a sender domain (A-label). The primary key is the (address, scope) index the delivery-time
# check reads: address IN (the message's recipients) AND scope IN ('*', the sender's domain).
suppressions = Table(
    "suppressions",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("scope", String(255), primary_key=True),
    Column("reason", String(500), nullable=False),
    Column("source", String(16), nullable=False),  # suppression.Source
    Column("created_at", Float, nullable=False),
    Column("message_id", String(32)),  # the message whose bounce or complaint added it
    Column("detail", Text, nullable=False, default=""),
    Index("ix_suppressions_created", "created_at"),
)

# -- the alerts' outbox (postroom.alerts.outbox, migration 0015) -------------------------------
# One row per alert and channel, retried with backoff like mail. ``channel``: the rule's name
# and the URL's position ("ops#1"), never the URL (Apprise URLs carry tokens). The unique key
# makes writing the same alert twice (two nodes, a restart mid-tick) a no-op.
alert_outbox = Table(
    "alert_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_key", String(255), nullable=False),  # alerts.Alert.key
    Column("channel", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("status", String(16), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),  # due (pending), or a sender's claim until
    Column("sent_at", Float),
    Column("last_error", Text, nullable=False, default=""),
    Column("payload", Text, nullable=False),  # the alert as JSON (alerts.Alert.as_dict)
    Index("ux_alert_outbox_key", "alert_key", "channel", unique=True),
    Index("ix_alert_outbox_due", "status", "next_at"),
    Index("ix_alert_outbox_created", "created_at"),
)

# -- Web Push subscriptions (postroom.alerts.subscriptions, migration 0016) --------------------
# One row per browser that asked the web admin for alerts, owned by an admin account. The
# endpoint is the push service's URL for that browser (unique: one browser, one owner, the
# account that subscribed it last); ``secret`` its p256dh and auth keys (Fernet ciphertext).
# ``sent_keys``: JSON list of the last alert keys it took, so a retried alert skips it.
webpush_subscriptions = Table(
    "webpush_subscriptions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(64),
           ForeignKey("admin_accounts.name", ondelete="CASCADE"), nullable=False),
    Column("endpoint", String(1024), nullable=False),
    Column("secret", Text, nullable=False),
    Column("label", String(120), nullable=False),  # the browser, from its User-Agent
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
    Column("sent_keys", Text, nullable=False, default="[]"),
    Index("ux_webpush_subscriptions_endpoint", "endpoint", unique=True),
    Index("ix_webpush_subscriptions_account", "account"),
)
