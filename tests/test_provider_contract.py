"""The contract every HTTPS API provider passes (issue 14): ONE suite, parametrised over the
providers of tests/provider_cases/ (one entry each), each against its local HTTPS fake
(tests/provider_fake.py: private CA, ``api_base`` pointing at it).

For each provider: a message with text, HTML, an attachment, an inline image, Reply-To, Cc,
Bcc, a custom header and tags is sent and read back from the request; the success answer's
message id becomes ``DeliveryResult.provider_id``; each documented error becomes the right
error class, permanent flag and code (with an advice entry); a 429 and a 503 carry
``retry_after``; ``check()`` passes with the key and fails without; a message the API
cannot express is refused naming what, before any request; a missing key fails with the
secret's own error; and one message goes through the real queue and worker (the in-process
Mailer) to ``sent`` with the provider's id on its attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_cases import CASES
from provider_fake import Answer, ErrorCase, FakeProvider, ProviderCase, Sent, addresses
from test_advice import COVERED
from test_oauth_http_transports import fail as refused
from test_oauth_http_transports import send as deliver

from postroom import transports
from postroom.diagnostics.advice import advise_error
from postroom.envelope import Envelope
from postroom.exceptions import AuthError, ConnectError, Scope, UnsupportedFeature
from postroom.message import Attachment, Draft, build
from postroom.routing.chain import Next, after_failure
from postroom.transports.base import Transport, TransportContext

# The advice catalog's entries for the providers' errors are reproduced here: registered with
# tests/test_advice.py's coverage check, which imports this module.
for _case in CASES:
    for _err in _case.errors:
        COVERED.setdefault(_err.advice_id, "test_each_documented_error_is_classified")

SENDER = "shop@example.com"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> ProviderCase:
    c: ProviderCase = request.param
    return c


@pytest.fixture
def fake(case: ProviderCase, tmp_path: Path) -> Iterator[FakeProvider]:
    with FakeProvider(case, tmp_path / "fake").running() as f:
        yield f


def connection(case: ProviderCase, fake: FakeProvider, **overrides: Any) -> Any:
    entry = {"name": "api", "transport": case.kind, "api_base": fake.url,
             "ca_file": fake.ca_file, **case.settings, **overrides}
    return transports.settings_model(case.kind, "test").model_validate(entry)


def transport(case: ProviderCase, fake: FakeProvider, **overrides: Any) -> Transport:
    return transports.create(connection(case, fake, **overrides),
                             TransportContext(ehlo_name="postroom.test"))


def checked(t: Transport) -> str:
    async def go() -> str:
        try:
            return await t.check()
        finally:
            await t.aclose()
    return asyncio.run(go())


def everything(inline: bool = True) -> Envelope:
    logo = '<img src="cid:logo@shop"> ' if inline else ""
    draft = Draft(
        from_=f"Shop <{SENDER}>", to=["Bob <bob@example.org>"], cc=["carol@example.org"],
        bcc=["audit@example.net"], reply_to=["Help Desk <help@example.com>"],
        subject="Your order 1234", text="Hello Bob, your order shipped.",
        html=f"<p>Hello Bob, {logo}your order shipped.</p>",
        attachments=[Attachment("invoice.pdf", PDF, "application/pdf"),
                     *([Attachment("logo.png", PNG, "image/png", content_id="logo@shop")]
                       if inline else [])],
        headers={"X-Order": "1234"})
    return build(draft, tags=["orders", "shipping"], metadata={"order": "1234"})


def simple(to: str = "bob@example.org") -> Envelope:
    return build(Draft(from_=SENDER, to=[to], subject="hi", text="hello"))


def test_a_message_is_sent_as_the_provider_documents_it(case: ProviderCase,
                                                        fake: FakeProvider) -> None:
    inline = "inline" not in case.lacks
    if not inline:  # the API has no inline images: refused naming them, nothing sent
        got = refused(transport(case, fake), everything())
        assert isinstance(got, UnsupportedFeature) and got.permanent, got
        assert "inline" in got.message and not fake.requests
    env = everything(inline)
    result = deliver(transport(case, fake), env)
    [rec] = fake.sent()
    sent: Sent = case.read(rec)
    assert sent.from_ == SENDER
    assert (sent.to, sent.cc, sent.bcc) == (["bob@example.org"], ["carol@example.org"],
                                            ["audit@example.net"])
    assert sent.reply_to == ["help@example.com"]
    assert sent.subject == "Your order 1234"
    assert sent.text is not None and "your order shipped." in sent.text
    assert sent.html is not None and ('src="cid:logo@shop"' in sent.html) == inline
    assert sorted(sent.attachments) == sorted([
        ("invoice.pdf", "application/pdf", PDF, None),
        *([("logo.png", "image/png", PNG, "logo@shop")] if inline else [])])
    assert sent.headers["X-Order"] == "1234"
    assert "Message-ID" in sent.headers  # Postroom's id: webhooks may name the message by it
    assert set(sent.tags) == {"orders", "shipping"}
    assert sent.metadata.get("order") == "1234"
    # The result step: the provider's id, every recipient accepted.
    assert result.provider_id == case.provider_id
    assert set(result.recipients) == set(env.recipients)
    assert all(r.ok for r in result.recipients.values())
    assert case.provider_id in (result.reply_text or "")


def error_cases() -> Iterator[Any]:
    for c in CASES:
        for e in c.errors:
            yield pytest.param(c, e, id=f"{c.kind}-{e.code}-{e.answer.status}")


@pytest.mark.parametrize(("case", "err"), list(error_cases()))
def test_each_documented_error_is_classified(case: ProviderCase, err: ErrorCase,
                                             fake: FakeProvider) -> None:
    fake.script(case.send, err.answer)
    got = refused(transport(case, fake), simple())
    assert isinstance(got, err.error), got
    assert (got.code, got.permanent) == (err.code, err.permanent), got
    assert got.reply_code is not None and got.reply_text
    assert got.transcript.startswith(f"C: {case.send[0]} {fake.url}{case.send[1]}")
    # Cause and fix in the provider's words, as `postroom show` prints them.
    advice = advise_error(got)
    assert advice is not None and advice.id == err.advice_id, (got.code, advice)
    assert advice.cause and advice.fix


def test_a_refused_key_says_how_to_store_a_new_one(case: ProviderCase,
                                                   fake: FakeProvider) -> None:
    got = refused(transport(case, fake, **case.bad_settings), simple())
    assert isinstance(got, AuthError) and not got.permanent and got.scope is Scope.CONFIGURATION
    assert "postroom connection set-password api" in got.message
    assert after_failure(got) is Next.FALLBACK  # the next connection may send it meanwhile
    assert "wrong" not in got.transcript  # the key itself is never shown
    assert len(fake.sent()) == 1  # an API key refused once is not tried again


def test_429_and_503_carry_retry_after(case: ProviderCase, fake: FakeProvider) -> None:
    fake.script(case.send, case.rate_limited, case.unavailable)
    limited = refused(transport(case, fake), simple())
    assert isinstance(limited, ConnectError) and not limited.permanent
    assert limited.code == "provider.rate_limited"
    assert limited.retry_after == float(case.rate_limited.headers["Retry-After"])
    assert after_failure(limited) is Next.FALLBACK
    down = refused(transport(case, fake), simple())
    assert not down.permanent and after_failure(down) is Next.FALLBACK
    assert down.retry_after == float(case.unavailable.headers["Retry-After"])


# Only providers with a request that checks a key without sending.
@pytest.mark.parametrize("case", [c for c in CASES if c.check is not None], ids=str)
def test_check_validates_the_key_without_sending(case: ProviderCase,
                                                 fake: FakeProvider) -> None:
    said = checked(transport(case, fake))
    assert "works" in said and not fake.sent()
    with pytest.raises(AuthError) as info:
        checked(transport(case, fake, **case.bad_settings))
    assert "set-password" in info.value.message and not fake.sent()


# Only JSON APIs: raw-MIME ones can express everything.
@pytest.mark.parametrize("case", [c for c in CASES if c.unmappable is not None], ids=str)
def test_what_the_api_cannot_express_is_refused_naming_it(case: ProviderCase,
                                                          fake: FakeProvider) -> None:
    assert case.unmappable is not None
    raw, named = case.unmappable
    got = refused(transport(case, fake), Envelope(SENDER, ["bob@example.org"], raw))
    assert isinstance(got, UnsupportedFeature) and got.permanent, got
    assert named in got.message
    assert not fake.requests  # refused before any request


def test_a_missing_key_fails_with_the_secrets_own_words(case: ProviderCase,
                                                        fake: FakeProvider,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTROOM_CONTRACT_UNSET", raising=False)
    keyless = {k: None for k in case.settings if k.endswith("key")}
    got = refused(transport(case, fake, **keyless, api_key_env="POSTROOM_CONTRACT_UNSET"),
                  simple())
    assert got.code == "auth.secret_missing" and not got.permanent
    assert "environment variable POSTROOM_CONTRACT_UNSET is not set" in got.message
    assert not fake.requests


def test_through_the_queue_and_worker_to_sent(case: ProviderCase, fake: FakeProvider,
                                              tmp_path: Path) -> None:
    from postroom import Mailer
    from postroom.queue.sql import Queue
    from postroom.store.db import make_engine

    settings = "".join(f"{k} = {_toml(v)}\n" for k, v in case.settings.items())
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n\n'
                   f'[[connections]]\nname = "api"\ntransport = "{case.kind}"\n'
                   f'api_base = "{fake.url}"\nca_file = "{fake.ca_file}"\n{settings}')
    with Mailer(config=cfg) as m:
        msg_id = m.send(from_=SENDER, to="bob@example.org", subject="queued", text="hello",
                        tags=["orders"], metadata={"order": "1234"})
        assert m.deliver_due() == 1
    row = Queue(make_engine(f"sqlite:///{tmp_path / 'data' / 'postroom.db'}")).log.get(msg_id)
    assert row is not None and row["status"] == "sent", row
    [attempt] = row["attempts"]
    assert attempt["provider_id"] == case.provider_id
    [rec] = fake.sent()
    sent = case.read(rec)
    assert addresses(sent.to) == ["bob@example.org"]
    # The queue hands the message's tags and metadata to the provider, not only send() does.
    assert set(sent.tags) == {"orders"} and sent.metadata.get("order") == "1234"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_the_fake_answers_documented_bodies(case: ProviderCase) -> None:
    """The case's answers are what the suite relies on: a 429 with Retry-After, a 5xx."""
    assert case.rate_limited.status == 429 and "Retry-After" in case.rate_limited.headers
    assert case.unavailable.status >= 500
    assert isinstance(case.success, Answer) and 200 <= case.success.status < 300
