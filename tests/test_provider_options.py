"""What one provider's settings and limits change, beyond the shared contract
(tests/test_provider_contract.py): regions pick the documented API host, sandbox / test
modes reach the request, each API's own limits (tags, recipients, Reply-To, size) are
refused before any request naming what, and check() reads what the provider says about the
key or domain. Requests go to the providers' local HTTPS fakes (tests/provider_fake.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_cases import mailgun, mailjet, resend, sendgrid
from provider_fake import Answer, FakeProvider, ProviderCase, form_data
from test_provider_contract import checked, deliver, refused, simple

from postroom import transports
from postroom.envelope import Envelope
from postroom.exceptions import AuthError, UnsupportedFeature
from postroom.message import Draft, build
from postroom.transports._http import HttpTransport
from postroom.transports.base import Transport, TransportContext


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[dict[str, FakeProvider]]:
    with contextlib.ExitStack() as stack:
        yield {c.kind: stack.enter_context(FakeProvider(c, tmp_path / c.kind).running())
               for c in (sendgrid.CASE, mailgun.CASE, mailjet.CASE, resend.CASE)}


def make(case: ProviderCase, fake: FakeProvider | None = None, **overrides: Any) -> Transport:
    entry = {"name": "api", "transport": case.kind, **case.settings, **overrides}
    if fake is not None:
        entry.update(api_base=fake.url, ca_file=fake.ca_file)
    model = transports.settings_model(case.kind, "test")
    return transports.create(model.model_validate(entry),
                             TransportContext(ehlo_name="postroom.test"))


def base_url(t: Transport) -> str:
    assert isinstance(t, HttpTransport)
    asyncio.run(t.aclose())
    return t.base


@pytest.mark.parametrize(("case", "region", "url"), [
    (sendgrid.CASE, "global", "https://api.sendgrid.com"),
    (sendgrid.CASE, "eu", "https://api.eu.sendgrid.com"),
    (mailgun.CASE, "us", "https://api.mailgun.net"),
    (mailgun.CASE, "eu", "https://api.eu.mailgun.net"),
    (mailjet.CASE, "eu", "https://api.mailjet.com"),
    (mailjet.CASE, "us", "https://api.us.mailjet.com"),
], ids=str)
def test_the_region_picks_the_documented_api_host(case: ProviderCase, region: str,
                                                  url: str) -> None:
    assert base_url(make(case, region=region)) == url


def test_bad_settings_are_refused_with_the_key_named() -> None:
    model = transports.settings_model("mailgun", "test")
    with pytest.raises(ValueError, match="domain"):
        model.model_validate({"name": "a", "transport": "mailgun", "api_key": "k"})
    with pytest.raises(ValueError, match="not a domain name"):
        model.model_validate({"name": "a", "transport": "mailgun", "api_key": "k",
                              "domain": "mg.example.com/../v4"})
    with pytest.raises(ValueError, match="region"):
        model.model_validate({"name": "a", "transport": "mailgun", "api_key": "k",
                              "domain": "mg.example.com", "region": "asia"})
    with pytest.raises(ValueError, match="api_key_public"):
        transports.settings_model("mailjet", "test").model_validate(
            {"name": "a", "transport": "mailjet", "api_key": "k"})


def test_sandbox_and_test_modes_reach_the_request(fakes: dict[str, FakeProvider]) -> None:
    deliver(make(sendgrid.CASE, fakes["sendgrid"], sandbox=True), simple())
    [rec] = fakes["sendgrid"].sent()
    assert rec.json()["mail_settings"] == {"sandbox_mode": {"enable": True}}
    deliver(make(mailjet.CASE, fakes["mailjet"], sandbox=True), simple())
    [rec] = fakes["mailjet"].sent()
    assert rec.json()["SandboxMode"] is True
    deliver(make(mailgun.CASE, fakes["mailgun"], test_mode=True), simple())
    [rec] = fakes["mailgun"].sent()
    assert form_data(rec)[0]["o:testmode"] == ["yes"]


def tagged(n: int) -> Envelope:
    return build(Draft(from_="shop@example.com", to=["bob@example.org"], subject="s",
                       text="t"), tags=[f"t{i}" for i in range(n)])


@pytest.mark.parametrize(("case", "env", "words"), [
    (sendgrid.CASE, tagged(11), "at most 10 categories"),
    (mailgun.CASE, tagged(4), "at most 3 tags"),
    (resend.CASE, build(Draft(from_="shop@example.com", to=["bob@example.org"], subject="s",
                              text="t"), tags=["orders.eu"]), "'orders.eu'"),
    (resend.CASE, build(Draft(from_="shop@example.com", to=["bob@example.org"], subject="s",
                              text="t"), tags=["order"], metadata={"order": "1"}),
     "both a tag and a metadata key"),
    (mailjet.CASE, build(Draft(from_="shop@example.com", to=[f"u{i}@example.org"
                                                              for i in range(51)],
                               subject="s", text="t")), "at most 50 recipients"),
    (resend.CASE, build(Draft(from_="shop@example.com", to=["bob@example.org"], subject="s",
                              text="x" * (41 * 1024 * 1024))), "takes at most"),
    (sendgrid.CASE, build(Draft(from_="shop@example.com", bcc=["bob@example.org"],
                                subject="s", text="t")), "needs at least one To address"),
], ids=["sendgrid-tags", "mailgun-tags", "resend-tag-chars", "resend-tag-twice",
        "mailjet-recipients", "resend-size", "sendgrid-no-to"])
def test_what_an_api_cannot_take_is_refused_before_any_request(
        case: ProviderCase, env: Envelope, words: str,
        fakes: dict[str, FakeProvider]) -> None:
    got = refused(make(case, fakes[case.kind]), env)
    assert isinstance(got, UnsupportedFeature) and got.permanent and words in got.message
    assert not fakes[case.kind].requests


def test_check_reads_what_the_provider_says(fakes: dict[str, FakeProvider]) -> None:
    fakes["sendgrid"].script(sendgrid.CASE.check or ("", ""),
                             Answer(200, {"scopes": ["alerts.read"]}))
    with pytest.raises(AuthError, match=r"mail\.send") as info:
        checked(make(sendgrid.CASE, fakes["sendgrid"]))
    assert info.value.code == "auth.api_key_forbidden"
    fakes["resend"].script(("GET", "/domains"), resend.error(
        401, "restricted_api_key", "This API key is restricted to only send emails"))
    assert "sending only" in checked(make(resend.CASE, fakes["resend"]))
    fakes["mailgun"].script(mailgun.CASE.check or ("", ""), Answer(200, {"domain": {
        "name": mailgun.DOMAIN, "state": "unverified"}}))
    said = checked(make(mailgun.CASE, fakes["mailgun"]))
    assert "works" in said and "the domain is unverified" in said
