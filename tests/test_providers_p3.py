"""What the shared contract suites (test_provider_contract.py, test_provider_webhooks.py)
leave out of Brevo, Mandrill, SMTP2GO and Elastic Email: per-recipient refusals in a 200,
the second webhook authentication scheme, a restricted key's check(), fields a message may
not set itself. Each against the provider's local HTTPS fake (tests/provider_fake.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_cases import brevo, elasticemail, mandrill, smtp2go
from provider_fake import Answer, FakeProvider, ProviderCase

from postroom import transports
from postroom.exceptions import EventRefused, UnsupportedFeature
from postroom.message import Draft, build
from postroom.transports.base import DeliveryResult, Transport, TransportContext
from postroom.transports.smtp2go import Smtp2goTransport
from postroom.webhooks import Kind, WebhookRequest
from postroom.webhooks.base import WebhookConfig


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[dict[str, FakeProvider]]:
    with contextlib.ExitStack() as stack:
        yield {case.kind: stack.enter_context(FakeProvider(case, tmp_path / case.kind).running())
               for case in (mandrill.CASE, smtp2go.CASE, elasticemail.CASE)}


def transport(case: ProviderCase, fake: FakeProvider, **overrides: Any) -> Transport:
    entry = {"name": "api", "transport": case.kind, "api_base": fake.url,
             "ca_file": fake.ca_file, **case.settings, **overrides}
    conn = transports.settings_model(case.kind, "test").model_validate(entry)
    return transports.create(conn, TransportContext(ehlo_name="postroom.test"))


def run(t: Transport, env: Any = None) -> Any:
    async def go() -> Any:
        try:
            return await (t.send(env) if env is not None else t.check())
        finally:
            await t.aclose()
    return asyncio.run(go())


def two() -> Any:
    return build(Draft(from_="shop@example.com", to=["bob@example.org", "carol@example.org"],
                       subject="hi", text="hello"), tags=["orders"])


def test_mandrill_reports_each_refused_recipient(fakes: dict[str, FakeProvider]) -> None:
    fake = fakes["mandrill"]
    fake.script(mandrill.CASE.send, Answer(200, [
        {"email": "bob@example.org", "status": "sent", "_id": "id-bob"},
        {"email": "carol@example.org", "status": "rejected", "reject_reason": "hard-bounce",
         "_id": "id-carol"}]))
    result: DeliveryResult = run(transport(mandrill.CASE, fake), two())
    assert result.provider_id == "id-bob"
    assert result.recipients["bob@example.org"].ok
    refused = result.recipients["carol@example.org"]
    assert refused.permanent and "hard-bounce" in refused.reply


def test_mandrill_soft_bounce_rejection_is_retried_later(
        fakes: dict[str, FakeProvider]) -> None:
    fake = fakes["mandrill"]
    fake.script(mandrill.CASE.send, Answer(200, [
        {"email": "bob@example.org", "status": "rejected", "reject_reason": "soft-bounce",
         "_id": "id-bob"},
        {"email": "carol@example.org", "status": "queued", "_id": "id-carol"}]))
    result: DeliveryResult = run(transport(mandrill.CASE, fake), two())
    bob = result.recipients["bob@example.org"]
    assert not bob.ok and not bob.permanent


def test_mandrill_refuses_a_message_that_sets_its_own_tag_field(
        fakes: dict[str, FakeProvider]) -> None:
    env = build(Draft(from_="shop@example.com", to=["bob@example.org"], subject="hi",
                      text="hello", headers={"X-MC-Tags": "theirs"}), tags=["orders"])
    with pytest.raises(UnsupportedFeature) as info:
        run(transport(mandrill.CASE, fakes["mandrill"]), env)
    assert "X-MC-Tags" in info.value.message and not fakes["mandrill"].requests


def test_smtp2go_reports_each_failed_recipient(fakes: dict[str, FakeProvider]) -> None:
    fake = fakes["smtp2go"]
    fake.script(smtp2go.CASE.send, Answer(200, {"request_id": smtp2go.REQUEST_ID, "data": {
        "succeeded": 1, "failed": 1, "email_id": "1er8bV-6Tw0Mi-7h",
        "failures": ["carol@example.org"]}}))
    result: DeliveryResult = run(transport(smtp2go.CASE, fake), two())
    assert result.recipients["bob@example.org"].ok
    assert result.recipients["carol@example.org"].permanent


def test_smtp2go_region_picks_its_host() -> None:
    conn = transports.settings_model("smtp2go", "test").model_validate(
        {"name": "api", "transport": "smtp2go", "api_key": "k", "region": "au"})
    t = transports.create(conn, TransportContext(ehlo_name="postroom.test"))
    assert isinstance(t, Smtp2goTransport) and t.base == "https://au-api.smtp2go.com/v3"
    asyncio.run(t.aclose())


def test_elasticemail_check_passes_with_a_send_only_key(
        fakes: dict[str, FakeProvider]) -> None:
    fake = fakes["elasticemail"]
    assert elasticemail.CASE.check is not None
    fake.script(elasticemail.CASE.check, Answer(403, {"Error": "Access Denied."}))
    said = run(transport(elasticemail.CASE, fake))
    assert "works" in said and "may not read statistics" in said and not fake.sent()


# -- webhooks: the other authentication scheme, Mandrill's URL ---------------------------------
def _config(kind: str, key: str | None, **settings: Any) -> WebhookConfig:
    model = transports.settings_model(kind, "test")
    return WebhookConfig(model.model_validate({"name": "hooks", "transport": kind,
                                               "api_key": "k", **settings}), key)


def _request(body: bytes, **headers: str) -> WebhookRequest:
    return WebhookRequest("POST", "/webhooks/hooks", {k.lower(): v for k, v in headers.items()},
                          body, remote="127.0.0.1")


def _webhook(kind: str) -> Any:
    cls = transports.transport_class(kind).webhook
    assert cls is not None
    return cls()


def test_brevo_webhook_with_basic_auth() -> None:
    pair = "postroom:brevo-pass"
    body = json.dumps(brevo.EVENTS[1]).encode()
    good = _request(body, Authorization="Basic " + base64.b64encode(pair.encode()).decode())
    hook = _webhook("brevo")
    hook.verify(good, _config("brevo", pair))
    [event] = hook.parse(good, _config("brevo", pair))
    assert (event.kind, event.permanent, event.provider_id) == (
        Kind.BOUNCED, True, brevo.MESSAGE_ID)
    bearer = _request(body, Authorization=f"Bearer {pair}")  # the wrong scheme
    with pytest.raises(EventRefused):
        hook.verify(bearer, _config("brevo", pair))


def test_smtp2go_webhook_with_bearer_and_a_form_body() -> None:
    body = b"event=bounce&bounce=soft&rcpt=bob%40example.org&email_id=1er8bV-6Tw0Mi-7h"
    req = _request(body, Authorization="Bearer tok-123",
                   **{"Content-Type": "application/x-www-form-urlencoded"})
    hook = _webhook("smtp2go")
    config = _config("smtp2go", "tok-123", webhook_auth="bearer")
    hook.verify(req, config)
    [event] = hook.parse(req, config)
    assert (event.kind, event.permanent, event.recipient) == (
        Kind.BOUNCED, False, "bob@example.org")
    with pytest.raises(EventRefused):
        hook.verify(req, _config("smtp2go", "tok-999", webhook_auth="bearer"))


def test_mandrill_webhook_needs_its_url() -> None:
    body, headers = mandrill.WEBHOOK.sign(mandrill.WEBHOOK.body, 0)
    req = _request(body, **headers)
    with pytest.raises(EventRefused) as info:
        _webhook("mandrill").verify(req, _config("mandrill", mandrill.HOOK_KEY))
    assert info.value.code == "event.no_url"
    # Signed for another URL (a proxy rewrote it): refused.
    other = _config("mandrill", mandrill.HOOK_KEY,
                    webhook_url="https://other.example.com/webhooks/hooks")
    with pytest.raises(EventRefused):
        _webhook("mandrill").verify(req, other)
