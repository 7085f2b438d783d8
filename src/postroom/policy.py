"""The message policy (what Post SMTP calls its Message tab): envelope sender override, From
override (always, or only when the message has none), forced To/Cc/Bcc recipients and added
header fields, globally (``[policy]``) and per connection (``policy`` in a
``[[connections]]`` entry).

Applied by the worker to each delivery attempt, always from the message as it was stored:
the stored message never changes, so a retry or a fallback to another connection computes
its copy afresh and nothing can be added twice. (A fallback gets *its* connection's policy.)

Merge rule (:func:`merge`), a connection's ``policy`` over the global one:

- ``envelope_sender``, ``from``, ``from_mode``: the connection's value when it sets the key
  (``""`` turns a global value off for that connection);
- ``to``, ``cc``, ``bcc``: the global addresses, then the connection's (duplicates dropped);
- ``headers``: both, the connection's value winning for the same name;
- ``inherit = false`` in a connection's policy ignores the global one altogether.

Added header fields replace any field of the same name in the message (a field such as
Reply-To may appear only once). Forced To/Cc addresses are appended to the message's To/Cc
field (or make one); forced Bcc addresses are only added to the envelope.

Forced recipients and the log (:func:`record`, :func:`copies_due`, :func:`give_up`): their
results are part of the attempt's per-recipient results and are kept in the message's
recipient status marked ``"forced": "to"|"cc"|"bcc"`` with the connection whose policy
added them (``"via"``) and their number of tries, but the message's status is decided by its
own recipients only. Once accepted (or refused for good) a forced recipient is not sent
again. While the message's own recipients are still being tried, a forced recipient with a
temporary failure rides along with those tries; once they are finished and someone got the
message, it is retried on its own (:meth:`MessagePolicy.copy`: the same stored message, only
that recipient in RCPT TO, on the connection that added it) with the normal backoff until it
is delivered or the message's lifetime ends, because an archive that silently misses
messages is worse than none. So a forced copy is never duplicated to anyone else, and it
never makes a delivered message look partial or failed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from postroom import headers as h
from postroom.envelope import Envelope
from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from postroom.settings import ConnectionPolicy, PolicySettings, Settings
    from postroom.transports.base import RecipientResult

# Fields the policy may not add: addresses have their own keys, and the MIME structure,
# Message-ID and Date belong to the message.
_NOT_ADDABLE = {
    "from": "use the policy's `from` key", "to": "use the policy's `to` key",
    "cc": "use the policy's `cc` key", "bcc": "use the policy's `bcc` key (never a header)",
    "content-type": "it is part of the MIME structure",
    "content-transfer-encoding": "it is part of the MIME structure",
    "mime-version": "it is part of the MIME structure",
    "message-id": "every message has its own", "date": "every message has its own",
}
_ADDR = re.compile(rb"[^\s<>,;:\"()@]+@[^\s<>,;:\"()@]+")
NOT_COPIED = ("not sent: every recipient of the message itself failed, so there is no "
              "delivered message to copy")


# -- validation (called by the settings models) ------------------------------------------------
def mailbox(value: str, what: str) -> h.Mailbox:
    """One "Name <addr>" or "addr" from the configuration, validated; ValueError if not."""
    from postroom.idn import check_address

    try:
        h.check_value(what, value)
        parts = h.split_addresses(value)
        if len(parts) != 1:
            raise MessageError(f"{what}: give one address per entry, got {value!r}")
        name, addr = h.parse_mailbox(parts[0])
        check_address(addr, what)
        h.mailbox_pieces(name, addr)  # a display name that cannot be encoded fails here
    except MessageError as err:
        raise ValueError(err.message) from None
    return name, addr


def check_headers(headers: Mapping[str, str]) -> None:
    """Policy header fields: valid names and one-line values, none we must not add."""
    from postroom.message import extra_field

    try:
        for name, value in headers.items():
            h.check_name(name)
            h.check_value(f"header {name}", value)
            why = _NOT_ADDABLE.get(name.lower())
            if why:
                raise MessageError(f"header {name} cannot be added by the policy: {why}")
            extra_field(name, value)
    except MessageError as err:
        raise ValueError(err.message) from None


# -- the merged, ready-to-apply policy ---------------------------------------------------------
@dataclass(frozen=True)
class Applied:
    """One attempt's copy: the envelope to send and the forced recipients added to it."""

    envelope: Envelope
    forced: dict[str, str]  # address -> "to" | "cc" | "bcc"


@dataclass(frozen=True)
class MessagePolicy:
    envelope_sender: str = ""
    from_: str = ""
    from_mode: str = "always"  # "always" | "if_missing"
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    # [bounces] (postroom.bounces): the message's signed VERP return path, over any
    # envelope_sender, so that delivery reports come back to Postroom's listener.
    return_path: Callable[[str], str] | None = field(default=None, compare=False)
    # Computed once: the header fields as bytes and the forced envelope recipients.
    _fields: dict[bytes, bytes] = field(init=False, repr=False, compare=False)
    _add: dict[bytes, list[h.Mailbox]] = field(init=False, repr=False, compare=False)
    _forced: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from postroom.message import extra_field

        fields: dict[bytes, bytes] = {}
        if self.from_:
            fields[b"from"] = h.address_field("From", [mailbox(self.from_, "from")]).encode()
        for name, value in self.headers:
            fields[name.lower().encode()] = extra_field(name, value).encode()
        add = {b"to": [mailbox(a, "to") for a in self.to],
               b"cc": [mailbox(a, "cc") for a in self.cc]}
        forced: dict[str, str] = {}
        for kind, addrs in (("to", self.to), ("cc", self.cc), ("bcc", self.bcc)):
            for a in addrs:
                forced.setdefault(mailbox(a, kind)[1], kind)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_add", {k: v for k, v in add.items() if v})
        object.__setattr__(self, "_forced", tuple(forced.items()))

    @property
    def empty(self) -> bool:
        return not (self.envelope_sender or self.return_path or self._fields or self._forced)

    def _sender(self, env: Envelope) -> str:
        if self.return_path is not None and env.id:
            return self.return_path(env.id)
        return self.envelope_sender or env.sender

    def apply(self, env: Envelope,
              status: Mapping[str, Mapping[str, Any]] | None = None) -> Applied:
        """The copy of ``env`` (as stored) to send in this attempt. ``status`` is the
        message's recipient status: forced recipients already accepted or refused for good,
        and the message's own recipients, are not added again."""
        known = {k.lower(): v for k, v in (status or {}).items()}
        known.update({r.lower(): {"state": "own"} for r in env.recipients})
        forced: dict[str, str] = {}
        for addr, kind in self._forced:
            st = known.get(addr.lower())
            if st is None or (st.get("forced") and st.get("state") == "pending"):
                forced[addr] = kind
        raw = self._rewrite(env.raw) if (self._fields or self._add) else env.raw
        out = replace(env, sender=self._sender(env),
                      recipients=[*env.recipients, *forced], raw=raw)
        return Applied(out, forced)

    def copy(self, env: Envelope, forced: Mapping[str, str]) -> Applied:
        """A forced copy retried on its own: the message as every other recipient got it
        (same header fields added), with only the ``forced`` recipients in the envelope."""
        raw = self._rewrite(env.raw) if (self._fields or self._add) else env.raw
        out = replace(env, sender=self._sender(env), recipients=list(forced), raw=raw)
        return Applied(out, dict(forced))

    def _rewrite(self, raw: bytes) -> bytes:
        end = raw.find(b"\r\n\r\n")
        if end < 0:  # no body: the whole message is its header
            head = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
            rest = b"\r\n"
        else:
            head, rest = raw[: end + 2], raw[end + 2 :]
        fields = h.split_fields(head)
        names = [f.split(b":", 1)[0].strip().lower() for f in fields]
        replaced = set(self._fields)
        if self.from_mode == "if_missing" and b"from" in names:
            replaced.discard(b"from")
        keep = [(n, f) for n, f in zip(names, fields, strict=True) if n not in replaced]
        for kind, mailboxes in self._add.items():
            at = next((i for i, (n, _) in enumerate(keep) if n == kind), None)
            if at is None:
                keep.append((kind, h.address_field(kind.decode().title(), mailboxes).encode()))
                continue
            present = {m.lower() for m in _ADDR.findall(keep[at][1])}
            new = [m for m in mailboxes if m[1].lower().encode() not in present]
            if new:
                # the new mailboxes as a folded list, without "To:" in front
                more = h.address_field("X", new).encode()[3:]
                keep[at] = (kind, keep[at][1][:-2] + b",\r\n " + more)
        out = [f for _, f in keep]
        out.extend(v for k, v in self._fields.items() if k in replaced)
        return b"".join(out) + rest


def merge(glob: PolicySettings | None, conn: ConnectionPolicy | None) -> MessagePolicy:
    """The policy for one connection: its own ``policy`` over the global one (module doc)."""
    from postroom.settings import PolicySettings

    base = glob if glob is not None and (conn is None or conn.inherit) else PolicySettings()
    own = conn.model_fields_set if conn is not None else set()

    def pick(key: str) -> Any:
        return getattr(conn if conn is not None and key in own else base, key)

    def union(key: str) -> tuple[str, ...]:
        items = [*getattr(base, key), *(getattr(conn, key) if conn is not None else [])]
        seen: dict[str, str] = {}
        for item in items:
            seen.setdefault(h.parse_mailbox(item)[1].lower(), item)
        return tuple(seen.values())

    hdrs = {k.lower(): (k, v) for k, v in base.headers.items()}
    if conn is not None:
        hdrs.update({k.lower(): (k, v) for k, v in conn.headers.items()})
    return MessagePolicy(
        envelope_sender=pick("envelope_sender"), from_=pick("from_"),
        from_mode=pick("from_mode"), to=union("to"), cc=union("cc"), bcc=union("bcc"),
        headers=tuple(hdrs.values()),
    )


def for_settings(settings: Settings) -> dict[str, MessagePolicy]:
    """The merged policy of every connection that has one (others send messages as they are);
    the connections named in [bounces] send with a signed return path (postroom.bounces)."""
    out: dict[str, MessagePolicy] = {}
    verp = _return_paths(settings)
    for conn in settings.connections:
        merged = merge(settings.policy, conn.policy)
        if verp is not None and conn.name in verp[0]:
            merged = replace(merged, return_path=verp[1])
        if not merged.empty:
            out[conn.name] = merged
    return out


def _return_paths(settings: Settings) -> tuple[set[str], Callable[[str], str]] | None:
    """The connections that send with a VERP return path, and the function making it; None
    without a [bounces] address (postroom.bounces not loaded)."""
    if not any(name == "bounces" for name, _ in settings.features):
        return None
    from postroom.bounces import Verp, configured

    section = configured(settings)
    if section is None or not section.connections:
        return None
    return set(section.connections), Verp.of(settings, section).address


# -- forced recipients in the log --------------------------------------------------------------
def record(status: dict[str, dict[str, Any]], forced: Mapping[str, str],
           results: Mapping[str, RecipientResult],
           rows: dict[str, dict[str, Any]] | None = None, via: str = "") -> None:
    """Keep this attempt's results for the forced recipients in the recipient status (with
    ``via``, the connection whose policy added them and that retries them), and mark them
    in the attempt row's recipients (``rows``)."""
    for addr, kind in forced.items():
        res = results.get(addr)
        if res is None:
            continue
        state = "sent" if res.ok else "failed" if res.permanent else "pending"
        tries = int(status.get(addr, {}).get("tries") or 0) + 1
        status[addr] = {"state": state, "code": res.code, "reply": res.reply[:500],
                        "forced": kind, "via": via, "tries": tries}
        if rows is not None and addr in rows:
            rows[addr]["forced"] = kind


def copies_due(status: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """The forced recipients still to send, by the connection that retries them:
    ``{via: {address: kind}}``."""
    out: dict[str, dict[str, str]] = {}
    for addr, entry in status.items():
        if entry.get("forced") and entry.get("state") == "pending":
            out.setdefault(str(entry.get("via") or ""), {})[addr] = str(entry["forced"])
    return out


def give_up(status: dict[str, dict[str, Any]], why: str) -> None:
    """Fail the forced recipients still pending, saying why and what the server last said."""
    for entry in status.values():
        if entry.get("forced") and entry.get("state") == "pending":
            entry["state"] = "failed"
            entry["reply"] = f"{why}; last reply: {entry.get('code') or ''} " \
                f"{entry.get('reply') or ''}".rstrip()[:500]


def own_results(results: Mapping[str, RecipientResult],
                forced: Sequence[str] | Mapping[str, str]) -> dict[str, RecipientResult]:
    """The results of the message's own recipients (what decides its status)."""
    return {r: res for r, res in results.items() if r not in forced}
