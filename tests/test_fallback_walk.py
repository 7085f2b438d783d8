"""The fallback walk's one decision function (postroom.routing.walk.next_step), as a table:
given a leg's chain, its connections' states and the tries so far, what comes next. The
worker's behaviour around it (attempt rows, health, events) is tests/test_routing.py's."""

from __future__ import annotations

from typing import Any

import pytest

from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    TimeoutError_,
)
from postroom.routing.walk import Act, Attempt, Limited, Step, Usable, next_step
from postroom.transports.base import RecipientResult

NOW = 1_800_000_000.0
PAUSED = Usable("paused", NOW + 15)
DOWN = Usable("circuit open after 5 failures: refused", NOW + 60)
HELD = Usable("held until 08:00:00 UTC at the provider's request (Retry-After)", NOW + 600)


def ok(name: str, hop: int) -> Attempt:
    return Attempt(name, hop, NOW, NOW, results={"bob@example.test": RecipientResult(250, "ok")})


def bad(name: str, hop: int, err: DeliveryError) -> Attempt:
    return Attempt(name, hop, NOW, NOW, err)


def refused() -> ConnectError:
    return ConnectError("127.0.0.1:1 refused the connection", code="connect.refused")


def busy(seconds: float) -> DeliveryError:
    """A provider's 429 with Retry-After, as transports/_http.py classifies it."""
    return DeliveryError("HTTP 429: slow down", code="http.rate_limited", reply_code=429,
                         retry_after=seconds)


def maybe_sent() -> TimeoutError_:
    err = TimeoutError_("no reply to the end of the data", code="timeout")
    err.after_data = True
    return err


def too_big() -> DataRejected:
    return DataRejected("552 5.3.4 too big", code="data.too_big", permanent=True)


def auth() -> AuthError:
    return AuthError("535 5.7.8 bad credentials", code="auth.rejected", permanent=True)


AB = ("a", "b")
ABC = ("a", "b", "c")
CASES: list[tuple[str, tuple[str, ...], dict[str, Usable], list[Any], dict[str, Any]]] = [
    ("no route", (), {}, [],
     dict(act=Act.WAIT, until=None, reason="no route matches; add a default [[routes]] "
          "entry or a [[connections]] entry")),
    ("primary first", AB, {}, [], dict(act=Act.TRY, connection="a", hop=0, fallback=False)),
    ("a connection without state is tried", AB, {"b": PAUSED}, [],
     dict(act=Act.TRY, connection="a")),
    ("paused primary: the fallback now", AB, {"a": PAUSED}, [],
     dict(act=Act.TRY, connection="b", hop=1, skipped=(("a", "paused"),), fallback=False)),
    ("held primary: the fallback now", AB, {"a": HELD}, [],
     dict(act=Act.TRY, connection="b", hop=1, skipped=(("a", HELD.blocked),))),
    ("delivered", AB, {}, [ok("a", 0)], dict(act=Act.DONE, connection="a", fell_back=())),
    ("refused: next connection", AB, {}, [bad("a", 0, refused())],
     dict(act=Act.TRY, connection="b", hop=1, fell_back=("a",), fallback=True)),
    ("429: next connection", AB, {}, [bad("a", 0, busy(30))],
     dict(act=Act.TRY, connection="b", hop=1, fallback=True)),
    ("bad credentials: next connection", ABC, {}, [bad("a", 0, refused()), bad("b", 1, auth())],
     dict(act=Act.TRY, connection="c", hop=2, fell_back=("a", "b"), fallback=True)),
    ("delivered by the fallback", AB, {}, [bad("a", 0, refused()), ok("b", 1)],
     dict(act=Act.DONE, connection="b", hop=1, fell_back=("a",), skipped=())),
    ("delivered around a paused one", ABC, {"a": PAUSED}, [bad("b", 1, refused()), ok("c", 2)],
     dict(act=Act.DONE, connection="c", fell_back=("b",), skipped=(("a", "paused"),))),
    ("message refused: no other connection", AB, {}, [bad("a", 0, too_big())],
     dict(act=Act.FAIL, connection="a", until=None)),
    ("maybe delivered: the same connection later", AB, {}, [bad("a", 0, maybe_sent())],
     dict(act=Act.UNKNOWN, connection="a")),
    ("end of the chain", AB, {}, [bad("a", 0, refused()), bad("b", 1, auth())],
     dict(act=Act.FAIL, connection="b", until=None, fell_back=("a",))),
    ("everything skipped: wait for the first back", ABC, {"a": HELD, "b": DOWN, "c": PAUSED},
     [], dict(act=Act.WAIT, until=NOW + 15, fallback=False,
              skipped=(("a", HELD.blocked), ("b", DOWN.blocked), ("c", "paused")))),
    ("failed, the rest skipped: wait", ABC, {"b": DOWN, "c": HELD}, [bad("a", 0, refused())],
     dict(act=Act.WAIT, until=NOW + 60, fallback=True, fell_back=("a",))),
    ("over our own limit: wait, no fallback", AB, {}, [Limited("a", 0, NOW + 10)],
     dict(act=Act.WAIT, connection="a", until=NOW + 10,
          reason="connection a reached its rate or session limit; waiting in the queue")),
    ("fell back, then over a limit: wait", AB, {}, [bad("a", 0, refused()),
                                                    Limited("b", 1, NOW + 10)],
     dict(act=Act.WAIT, until=NOW + 10, fallback=False)),
    ("429 on the only connection: not before the hold ends", ("a",), {},
     [bad("a", 0, busy(120))], dict(act=Act.FAIL, until=NOW + 120)),
    ("429, then a fallback that is usable: the backoff decides", AB, {},
     [bad("a", 0, busy(120)), bad("b", 1, refused())], dict(act=Act.FAIL, until=None)),
    ("429 on both: the first hold to end", AB, {},
     [bad("a", 0, busy(120)), bad("b", 1, busy(45))], dict(act=Act.FAIL, until=NOW + 45)),
    ("held primary skipped, 429 on the fallback", AB, {"a": HELD},
     [bad("b", 1, busy(1200))], dict(act=Act.FAIL, until=NOW + 600,
                                     skipped=(("a", HELD.blocked),))),
    ("paused primary, 429 on the fallback: look again soon", AB, {"a": PAUSED},
     [bad("b", 1, busy(1200))], dict(act=Act.FAIL, until=NOW + 15)),
]


@pytest.mark.parametrize(("chain", "views", "tried", "want"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_next_step(chain: tuple[str, ...], views: dict[str, Usable], tried: list[Any],
                   want: dict[str, Any]) -> None:
    step = next_step(chain, views, tried, NOW)
    assert isinstance(step, Step)
    assert {k: getattr(step, k) for k in want} == want


def test_walk_pure_and_in_order() -> None:
    """Following the steps visits the chain in order, each connection once, and never
    goes past a step that is not "try"; the inputs are left as they were."""
    views = {"b": PAUSED}
    tried: list[Attempt | Limited] = []
    seen = []
    while (step := next_step(ABC, views, tried, NOW)).act is Act.TRY:
        seen.append(step.connection)
        tried.append(bad(step.connection, step.hop, refused()))
    assert seen == ["a", "c"]
    assert step.act is Act.FAIL and step.connection == "c"
    assert views == {"b": PAUSED} and len(tried) == 2
    assert next_step(ABC, views, tried, NOW) == step


def test_attempt_row() -> None:
    """The attempt record's row: the error's reply wins, the provider id is kept."""
    att = Attempt("a", 0, NOW, NOW + 0.25, provider_id="0a1b-2c3d", reply_code=250,
                  reply_text="queued", transcript="> POST /email\n< 200")
    assert att.row() == {
        "connection": "a", "started_at": NOW, "ended_at": NOW + 0.25, "outcome": "",
        "reply_code": 250, "reply_text": "queued", "error_code": None, "permanent": False,
        "recipients": {}, "transcript": "> POST /email\n< 200", "provider_id": "0a1b-2c3d"}
    assert att.held_until is None
    err = busy(30)
    err.transcript = "< 429"
    failed = Attempt("a", 0, NOW, NOW + 1, err).row()
    assert (failed["reply_code"], failed["error_code"], failed["permanent"],
            failed["transcript"]) == (429, "http.rate_limited", False, "< 429")
    assert Attempt("a", 0, NOW, NOW + 1, err).held_until == NOW + 31
    assert Attempt("a", 0, NOW, NOW, too_big()).row()["permanent"] is True
    assert Attempt("a", 0, NOW, NOW, auth()).row()["permanent"] is False  # held, not failed
