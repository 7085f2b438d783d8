"""The webhook contract every HTTPS API provider with delivery events passes (issue 14 part
3): ONE suite, parametrised over ``provider_cases.WEBHOOKS`` (tests/provider_hooks.py).

For each provider: a payload from its documentation, signed with the real algorithm and a
test key, is accepted and becomes the documented events (the provider's message id as the
sending side keeps it on the attempt, the recipient, hard or soft); it is refused unsigned,
signed with another key, tampered with, and (where the signature covers a time) replayed
later; a connection without a webhook key refuses everything; and the same events recorded
twice are kept once (the intake's duplicate check, which is what stops a replay of a
basic-auth provider's request). End to end: a message sent through each provider's fake
by the real queue and worker, then its events posted to a real `postroom serve`, are
attached to it by the provider's id.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from provider_cases import CASES, WEBHOOKS
from provider_fake import FakeProvider
from provider_hooks import HookCase
from queue_helpers import run
from serve_proc import free_port, serve_in_process

from postroom import transports
from postroom.exceptions import EventError, EventRefused
from postroom.queue.sql import Queue
from postroom.webhooks import WebhookRequest
from postroom.webhooks.base import Webhook, WebhookConfig
from postroom.webhooks.intake import EventLog


@pytest.fixture(params=WEBHOOKS, ids=str)
def hook(request: pytest.FixtureRequest) -> HookCase:
    c: HookCase = request.param
    return c


def webhook(case: HookCase) -> Webhook:
    cls = transports.transport_class(case.kind).webhook
    assert cls is not None, f"{case.kind} names no webhook class"
    return cls()


def config(case: HookCase, key: str | None) -> WebhookConfig:
    model = transports.settings_model(case.kind, "test")
    # An api_base as the sending side has one (a self-hosted provider requires it).
    conn = model.model_validate({"name": "hooks", "transport": case.kind,
                                 "api_base": "https://provider.test", **case.settings})
    return WebhookConfig(conn, key)


def request(case: HookCase, body: bytes, headers: dict[str, str]) -> WebhookRequest:
    merged = {**case.headers, **headers}
    return WebhookRequest("POST", "/webhooks/hooks", {k.lower(): v for k, v in merged.items()},
                          body, remote="127.0.0.1")


def signed(case: HookCase, at: float | None = None) -> WebhookRequest:
    body, headers = case.sign(case.body, time.time() if at is None else at)
    return request(case, body, headers)


def refused(case: HookCase, req: WebhookRequest, key: str | None = None) -> str:
    with pytest.raises(EventRefused) as info:
        webhook(case).verify(req, config(case, case.key if key is None else key))
    return info.value.code


def test_a_signed_documented_payload_becomes_its_events(hook: HookCase) -> None:
    req = signed(hook)
    hooked = webhook(hook)
    hooked.verify(req, config(hook, hook.key))
    events = hooked.parse(req, config(hook, hook.key))
    got = [(e.kind, e.provider_id, e.recipient, e.permanent) for e in events]
    want = [(x.kind, x.provider_id, x.recipient, x.permanent) for x in hook.events]
    assert got == want
    assert all(e.raw and e.at > 0 for e in events)  # the raw payload kept, the time read


def test_unsigned_or_signed_with_another_key_is_refused(hook: HookCase) -> None:
    assert refused(hook, request(hook, hook.body, {})) in ("event.unsigned",
                                                           "event.bad_signature")
    assert refused(hook, signed(hook), key=hook.wrong_key) == "event.bad_signature"


# Only providers that sign the body (basic auth signs nothing: replays are duplicates).
@pytest.mark.parametrize("hook", [h for h in WEBHOOKS if h.tamper is not None], ids=str)
def test_a_tampered_request_is_refused(hook: HookCase) -> None:
    assert hook.tamper is not None
    req = signed(hook)
    forged = WebhookRequest(req.method, req.path, req.headers, hook.tamper(req.body))
    assert forged.body != req.body
    assert refused(hook, forged) == "event.bad_signature"


# Only signatures that cover a time (the others' replays are duplicates, by event id).
@pytest.mark.parametrize("hook", [h for h in WEBHOOKS if h.timestamped], ids=str)
def test_a_replay_outside_the_window_is_refused(hook: HookCase) -> None:
    assert refused(hook, signed(hook, at=time.time() - 3600)) == "event.stale"
    assert refused(hook, signed(hook, at=time.time() + 3600)) == "event.stale"


def test_a_body_that_is_not_json_is_refused_or_not_understood(hook: HookCase) -> None:
    """Never another exception (the door answers 401 or 400 to these, nothing else)."""
    _, headers = hook.sign(hook.body, time.time())
    req = request(hook, b"{not json", headers)
    hooked = webhook(hook)
    try:
        hooked.verify(req, config(hook, hook.key))
    except EventRefused:
        return
    with pytest.raises(EventError):
        hooked.parse(req, config(hook, hook.key))


def test_no_key_configured_refuses_everything(hook: HookCase) -> None:
    with pytest.raises(EventRefused) as info:
        webhook(hook).verify(signed(hook), config(hook, None))
    assert info.value.code == "event.no_key"


@pytest.mark.sqlite_only  # the intake itself runs on both in test_webhooks.py
def test_the_same_events_twice_are_recorded_once(hook: HookCase, queue: Queue) -> None:
    req = signed(hook)
    events = webhook(hook).parse(req, config(hook, hook.key))
    log = EventLog(queue)

    async def twice() -> tuple[Any, Any]:
        return await log.record("hooks", events), await log.record("hooks", events)

    first, again = run(queue, twice)
    assert len(first.new) == len(events) and (len(again.new), again.duplicates) == (
        0, len(events))


def test_events_posted_to_serve_attach_to_the_message_sent(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from postroom import Mailer

    cases = {c.kind: c for c in CASES}
    http_port = free_port()
    cfg = tmp_path / "postroom.toml"
    with contextlib.ExitStack() as stack:
        text = (f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\nworker = false\n'
                f'smtp_listen = "127.0.0.1:{free_port()}"\n'
                f'http_listen = "127.0.0.1:{http_port}"\n')
        for i, hook in enumerate(WEBHOOKS):
            fake = stack.enter_context(FakeProvider(cases[hook.kind],
                                                    tmp_path / hook.kind).running())
            env_name = f"POSTROOM_TEST_HOOK_{hook.kind.upper()}"
            monkeypatch.setenv(env_name, hook.key)
            # Every other connection names its key inline: both ways reach the door.
            key = (f'webhook_key_env = "{env_name}"' if i % 2 else
                   f"webhook_key = {json.dumps(hook.key)}")
            text += (f'\n[[connections]]\nname = "{hook.kind}"\ntransport = "{hook.kind}"\n'
                     f'api_base = "{fake.url}"\nca_file = "{fake.ca_file}"\n{key}\n' +
                     # JSON strings and booleans are TOML ones too.
                     "".join(f"{k} = {json.dumps(v)}\n" for k, v in hook.settings.items()))
        cfg.write_text(text)
        with Mailer(config=cfg) as m:
            sent = {h.kind: m.send(from_="shop@example.com", to="bob@example.org",
                                   subject="hooked", text="hello", connection=h.kind)
                    for h in WEBHOOKS}
            assert m.deliver_due() == len(sent)

        def post_twice() -> dict[str, tuple[httpx.Response, httpx.Response]]:
            out = {}
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=20) as c:
                for hook in WEBHOOKS:
                    body, headers = hook.sign(hook.body, time.time())
                    url = f"/webhooks/{hook.kind}"
                    out[hook.kind] = (c.post(url, content=body, headers=headers),
                                      c.post(url, content=body, headers=headers))
            return out

        got = serve_in_process(cfg, post_twice)
    from postroom.store.db import make_engine

    log = EventLog(Queue(make_engine(f"sqlite:///{tmp_path / 'data' / 'postroom.db'}")))
    for hook in WEBHOOKS:
        first, again = got[hook.kind]
        assert first.status_code == 200, (hook.kind, first.text)
        n = len(hook.events)
        assert first.json()["accepted"] == n and first.json()["attached"] >= 1, hook.kind
        assert again.json() == {"accepted": 0, "duplicates": n, "attached": 0}, hook.kind
        pid = cases[hook.kind].provider_id
        mine = [str(x.kind) for x in hook.events if x.provider_id == pid]
        assert [e["kind"] for e in log.for_message(sent[hook.kind])] == mine, hook.kind
