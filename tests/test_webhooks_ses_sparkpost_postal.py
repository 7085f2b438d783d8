"""Delivery events of Amazon SES and Scaleway TEM (both through SNS-style deliveries),
and what the shared webhook suite (tests/test_provider_webhooks.py) leaves out for SparkPost
and Postal: payloads from each provider's documentation, signed with the real algorithms and
test keys (SNS: an RSA certificate served over HTTPS by a local server with a private CA,
SignatureVersion 1 and 2, for Scaleway issued by a test CA given as the trust chain; Postal:
RSA SHA1 alone, PEM keys), accepted, and refused when forged, tampered, stale, of another
topic or another CA. SES and Scaleway are not in the shared suite: their signing certificate
must be fetched from a running HTTPS host, which its static cases cannot name."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from diag_helpers import make_ca
from provider_cases import postal as postal_case
from provider_cases import sparkpost as sparkpost_case
from provider_fake import Answer, FakeProvider, ProviderCase, Sent

from postroom.exceptions import EventError, EventRefused
from postroom.queue.sql import Queue
from postroom.transports.postal import PostalSettings, PostalWebhook
from postroom.transports.scaleway import ScalewaySettings, ScalewayWebhook
from postroom.transports.ses import SesSettings, SesWebhook, sns_hosts
from postroom.transports.sparkpost import SparkPostSettings, SparkPostWebhook
from postroom.webhooks import Kind, WebhookRequest, sns
from postroom.webhooks.base import WebhookConfig

TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"
SES_ID = "0102018c1b2c3d4e-5f607182-93a4-4b5c-8d7e-8f9010111213-000000"


def request(body: bytes, headers: dict[str, str] | None = None) -> WebhookRequest:
    return WebhookRequest("POST", "/webhooks/x", {k.lower(): v for k, v in
                                                  (headers or {}).items()}, body)


# -- SparkPost (its documented batch: provider_cases.sparkpost, the shared webhook suite) -----
def test_sparkpost_ping_and_bodies_of_no_known_shape() -> None:
    cfg = WebhookConfig(SparkPostSettings(name="sp", transport="sparkpost"), "u:p")
    hook = SparkPostWebhook()
    # The test batch SparkPost sends when a webhook is created carries no event.
    assert hook.parse(request(b'[{"msys": {}}]'), cfg) == []
    for bad in (b'{"msys": {}}', b"[1]", b'[{"msys": []}]'):
        with pytest.raises(EventError):
            hook.parse(request(bad), cfg)
    [bounce] = hook.parse(request(json.dumps(sparkpost_case.BATCH[1:2]).encode()), cfg)
    assert bounce.detail.startswith("550 5.1.1") and bounce.at == 1460989508.0
    assert bounce.event_id == "92356927693813857" and bounce.raw["bounce_class"] == "10"


# -- Postal (the shared webhook suite signs with SHA256 and SHA1 headers) -----------------------
def postal_config(key: str | None) -> WebhookConfig:
    return WebhookConfig(PostalSettings(name="postal", transport="postal",
                                        api_base="https://postal.example.com"), key)


def test_postal_older_sha1_signatures_and_key_formats() -> None:
    key = postal_case.SIGNING_KEY
    body = json.dumps(postal_case.SENT).encode()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    hook = PostalWebhook()
    for shown in (postal_case.public_key(key), pem.decode()):
        hook.verify(request(body, postal_case.signatures(key, body, sha1_only=True)),
                    postal_config(shown))
    good = postal_case.public_key(key)
    with pytest.raises(EventRefused):  # a SHA256 header that does not match is not skipped
        hook.verify(request(body, {**postal_case.signatures(key, body),
                                   "X-Postal-Signature-256": "bm9wZQ=="}), postal_config(good))
    for bad_key in ("not a key", base64.b64encode(b"junk").decode()):
        with pytest.raises(EventRefused) as info:
            hook.verify(request(body, postal_case.signatures(key, body)), postal_config(bad_key))
        assert info.value.code == "event.no_key"


def test_postal_event_types() -> None:
    hook, cfg = PostalWebhook(), postal_config(postal_case.public_key(postal_case.SIGNING_KEY))
    message = postal_case.MESSAGE
    cases = [
        ("MessageDelayed", {"message": message, "status": "SoftFail",
                            "details": "451 try later"}, Kind.DEFERRED, None),
        ("MessageDeliveryFailed", {"message": message, "status": "HardFail",
                                   "details": "550 5.1.1 no such user"}, Kind.BOUNCED, True),
        ("MessageHeld", {"message": message, "status": "Held", "details": "limit"},
         Kind.DEFERRED, None),
        ("MessageBounced", {"original_message": message, "bounce": {
            "id": 12347, "token": "bounce123", "direction": "incoming",
            "message_id": "5817a64332f44_bounce@example.org", "to": "bounces@example.com",
            "from": "postmaster@example.org", "subject": "Delivery Error",
            "timestamp": 1477945179.0}}, Kind.BOUNCED, None),
        ("MessageLinkClicked", {"url": "https://example.com/orders", "token": "VJzsFA0S",
                                "ip_address": "127.0.0.1", "user_agent": "Mozilla/5.0",
                                "message": message}, Kind.CLICKED, None),
        ("MessageLoaded", {"ip_address": "127.0.0.1", "user_agent": "Mozilla/5.0",
                           "message": message}, Kind.OPENED, None),
        ("DomainDNSError", {"domain": "example.com", "uuid": "820b47a4"}, Kind.UNKNOWN, None),
    ]
    for n, (name, payload, kind, permanent) in enumerate(cases):
        body = json.dumps({"event": name, "timestamp": 1477945177.5, "payload": payload,
                           "uuid": f"evt-{n}"}).encode()
        hook.verify(request(body, postal_case.signatures(postal_case.SIGNING_KEY, body)), cfg)
        [ev] = hook.parse(request(body), cfg)
        assert (ev.kind, ev.permanent, ev.event_id) == (kind, permanent, f"evt-{n}"), name
        if kind is not Kind.UNKNOWN:
            assert ev.provider_id == message["message_id"]
            assert ev.message_id_header == f"<{message['message_id']}>"
            assert ev.recipient == "bob@example.org"
    with pytest.raises(EventError):
        hook.parse(request(b'{"event": "MessageSent"}'), cfg)


# -- Amazon SES through SNS -----------------------------------------------------------------------
CERT_PATH = "/SimpleNotificationService-0123456789abcdef.pem"


class SnsHost:
    """A local HTTPS stand-in for the provider's SNS host (tests/provider_fake.py's server,
    with its private CA): serves the signing certificate at CERT_PATH and records visits to
    the SubscribeURL (/confirm)."""

    def __init__(self, folder: Path, issuer: Any = None) -> None:
        """``issuer``: a diag_helpers.CA that issues the signing certificate (Scaleway's
        way); without one it is self-signed (what AWS's host serves is trusted by TLS)."""
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns signing")])
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer.cert.subject if issuer else name)
                   .public_key(self.key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=30)))
        self.cert_pem = builder.sign(issuer.key if issuer else self.key, hashes.SHA256()
                                     ).public_bytes(serialization.Encoding.PEM)
        case = ProviderCase(
            kind="sns", settings={}, send=("GET", CERT_PATH), authorised=lambda rec: True,
            read=lambda rec: Sent(from_="", to=[]), success=Answer(200, self.cert_pem),
            provider_id="", bad_key=Answer(403, ""), rate_limited=Answer(429, ""),
            unavailable=Answer(503, ""), check=("GET", "/confirm"),
            check_ok=Answer(200, "<ConfirmSubscriptionResponse/>"))
        self.server = FakeProvider(case, folder)
        self.ca_file = self.server.ca_file
        self.host = ""

    @property
    def visits(self) -> list[str]:
        return [r.path + ("?" + urlencode(r.query) if r.query else "")
                for r in self.server.requests]

    @contextlib.contextmanager
    def running(self) -> Iterator[SnsHost]:
        with self.server.running():
            self.host = self.server.url.removeprefix("https://")
            yield self

    def signed(self, message: dict[str, Any], *, version: str = "1",
               at: float | None = None, topic: str = TOPIC) -> dict[str, Any]:
        """``message`` (Type and its fields) completed and signed as SNS does."""
        stamp = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC)
        data = {"MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324", "TopicArn": topic,
                "Timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "SignatureVersion": version,
                "SigningCertURL": f"https://{self.host}{CERT_PATH}", **message}
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        sig = self.key.sign(sns.string_to_sign(data), padding.PKCS1v15(), digest)
        data["Signature"] = base64.b64encode(sig).decode()
        return data


@pytest.fixture
def sns_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SnsHost]:
    monkeypatch.setattr(sns, "FETCH_INTERVAL", 0.0)
    with SnsHost(tmp_path / "sns").running() as host:
        yield host


def ses_config(host: SnsHost, topics: list[str] | None = None) -> WebhookConfig:
    settings = SesSettings(name="ses", transport="ses", access_key_id="AKIAIOSFODNN7EXAMPLE",
                           region="eu-west-1", ca_file=host.ca_file,
                           sns_topic_arns=[TOPIC] if topics is None else topics,
                           sns_cert_hosts=[host.host])
    return WebhookConfig(settings, None)


def notification(ses: dict[str, Any]) -> dict[str, Any]:
    return {"Type": "Notification", "Message": json.dumps(ses)}


# From "Amazon SNS notification contents for Amazon SES" (examples, addresses changed).
SES_MAIL = {"timestamp": "2026-12-07T08:00:00.000Z", "source": "shop@example.com",
            "sourceArn": "arn:aws:ses:eu-west-1:123456789012:identity/example.com",
            "sendingAccountId": "123456789012", "messageId": SES_ID,
            "destination": ["dead@example.org", "bob@example.org"],
            "commonHeaders": {"from": ["Shop <shop@example.com>"], "to": ["dead@example.org"],
                              "messageId": "<18eee9fc04122b1c@example.com>",
                              "subject": "Your order"}}
SES_BOUNCE = {"notificationType": "Bounce", "mail": SES_MAIL, "bounce": {
    "bounceType": "Permanent", "bounceSubType": "General",
    "bouncedRecipients": [{"emailAddress": "dead@example.org", "action": "failed",
                           "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user "
                           "unknown"}],
    "timestamp": "2026-12-07T08:00:05.000Z", "feedbackId": "0102-bounce-1",
    "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com"}}
SES_COMPLAINT = {"notificationType": "Complaint", "mail": SES_MAIL, "complaint": {
    "complainedRecipients": [{"emailAddress": "bob@example.org"}],
    "timestamp": "2026-12-07T09:00:00.000Z", "feedbackId": "0102-complaint-1",
    "complaintFeedbackType": "abuse"}}
SES_DELIVERY = {"eventType": "Delivery", "mail": SES_MAIL, "delivery": {
    "timestamp": "2026-12-07T08:00:02.000Z", "processingTimeMillis": 546,
    "recipients": ["bob@example.org"], "smtpResponse": "250 ok: Message 64111812 accepted",
    "reportingMTA": "a8-70.smtp-out.amazonses.com"}}
SES_DELAY = {"eventType": "DeliveryDelay", "mail": SES_MAIL, "deliveryDelay": {
    "timestamp": "2026-12-07T08:10:00.000Z", "delayType": "TransientCommunicationFailure",
    "expirationTime": "2026-12-08T08:00:00.000Z",
    "delayedRecipients": [{"emailAddress": "bob@example.org", "status": "4.4.1",
                           "diagnosticCode": "smtp; 421 4.4.1 timeout"}]}}


def test_ses_events_through_sns_signed_v1_and_v2(sns_host: SnsHost) -> None:
    hook, cfg = SesWebhook(), ses_config(sns_host)
    for version in ("1", "2"):
        body = json.dumps(sns_host.signed(notification(SES_BOUNCE), version=version)).encode()
        hook.verify(request(body), cfg)
    [bounce] = hook.parse(request(body), cfg)
    assert (bounce.kind, bounce.recipient, bounce.permanent) == (Kind.BOUNCED,
                                                                "dead@example.org", True)
    assert bounce.provider_id == SES_ID
    assert bounce.message_id_header == "<18eee9fc04122b1c@example.com>"
    assert "550 5.1.1 user unknown" in bounce.detail
    assert bounce.event_id and bounce.event_id.startswith("22b80b92")
    expected = [(SES_COMPLAINT, Kind.COMPLAINED), (SES_DELIVERY, Kind.DELIVERED),
                (SES_DELAY, Kind.DEFERRED)]
    for ses, kind in expected:
        body = json.dumps(sns_host.signed(notification(ses))).encode()
        hook.verify(request(body), cfg)
        [ev] = hook.parse(request(body), cfg)
        assert (ev.kind, ev.recipient, ev.provider_id) == (kind, "bob@example.org", SES_ID)
    # The certificate was fetched once and is cached.
    assert [v for v in sns_host.visits if v.endswith(".pem")] == [CERT_PATH]
    # SES's test notification after a topic is set up carries no events.
    body = json.dumps(sns_host.signed(notification(
        {"notificationType": "AmazonSnsSubscriptionSucceeded",
         "message": "You have successfully subscribed"}))).encode()
    assert hook.parse(request(body), cfg) == []


def test_sns_refuses_forged_stale_foreign_and_off_host(sns_host: SnsHost) -> None:
    hook, cfg = SesWebhook(), ses_config(sns_host)
    good = sns_host.signed(notification(SES_BOUNCE))
    tampered = {**good, "Message": good["Message"].replace("Permanent", "Transient")}
    stale = sns_host.signed(notification(SES_BOUNCE), at=time.time() - 2 * sns.WINDOW)
    foreign = sns_host.signed(notification(SES_BOUNCE),
                              topic="arn:aws:sns:eu-west-1:999999999999:someone-else")
    off_host = {**good, "SigningCertURL": "https://attacker.example/cert.pem"}
    plain_http = {**good, "SigningCertURL": good["SigningCertURL"].replace("https", "http")}
    for data in (tampered, stale, foreign, off_host, plain_http,
                 {**good, "SignatureVersion": "3"}, {**good, "Signature": "bm9wZQ=="},
                 {k: v for k, v in good.items() if k != "Signature"}):
        with pytest.raises(EventRefused):
            hook.verify(request(json.dumps(data).encode()), cfg)
    with pytest.raises(EventRefused):  # not SNS at all
        hook.verify(request(b'{"hello": 1}'), cfg)
    with pytest.raises(EventRefused):  # the connection accepts no topic yet
        hook.verify(request(json.dumps(good).encode()), ses_config(sns_host, topics=[]))
    # Only the AWS host of the connection's region is allowed by default.
    hosts = sns_hosts(cast(SesSettings, cfg.connection))
    assert sns.allowed("https://sns.eu-west-1.amazonaws.com/x.pem", hosts)
    assert not sns.allowed("https://sns.us-east-1.amazonaws.com/x.pem", hosts)
    assert not sns.allowed("https://user@sns.eu-west-1.amazonaws.com/x.pem", hosts)


def test_sns_subscription_is_confirmed(sns_host: SnsHost) -> None:
    import asyncio

    hook, cfg = SesWebhook(), ses_config(sns_host)
    url = f"https://{sns_host.host}/confirm?Action=ConfirmSubscription&Token=2336"
    body = json.dumps(sns_host.signed({
        "Type": "SubscriptionConfirmation", "Token": "2336412f37fb687f5d51e6e2425f004aed",
        "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
        "SubscribeURL": url}, version="2")).encode()
    hook.verify(request(body), cfg)
    assert asyncio.run(hook.answer(request(body), cfg)) == (200, b"subscription confirmed")
    assert any("Action=ConfirmSubscription" in v for v in sns_host.visits)
    # A Notification is not a handshake: its events are parsed.
    note = json.dumps(sns_host.signed(notification(SES_DELIVERY))).encode()
    assert asyncio.run(hook.answer(request(note), cfg)) is None
    # A SubscribeURL elsewhere than the SNS host is not visited.
    elsewhere = json.dumps(sns_host.signed({
        "Type": "SubscriptionConfirmation", "Token": "t", "Message": "m",
        "SubscribeURL": "https://attacker.example/confirm"})).encode()
    with pytest.raises(EventError):
        asyncio.run(hook.answer(request(elsewhere), cfg))


# -- Scaleway TEM through Topics and Events (SNS-style, certificate issued by Scaleway's CA) ----
SCW_TOPIC = "arn:scw:sns:fr-par:project-b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d:tem-events"
TEM_DELIVERED = {
    "id": "5d0c7c36-7f2c-4e1a-9c58-1b0d1f0e2a11", "type": "email_delivered",
    "organization_id": "1f2e3d4c-0000-4000-8000-000000000001",
    "project_id": "b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d",
    "domain_id": "d0d0d0d0-0000-4000-8000-000000000001", "domain_name": "example.com",
    "created_at": "2026-12-07T08:00:03Z", "email_sent_at": "2026-12-07T08:00:02Z",
    "email_id": "0d5b1d0c-0000-4000-8000-000000000001", "email_from": "shop@example.com",
    "email_to": "bob@example.org",
    "email_headers": [{"key": "Subject", "value": "Your order 1234"},
                      {"key": "Message-ID", "value": "<18eee9fc04122b1c@example.com>"}],
    "email_response_code": 250, "email_response_message": "2.0.0 Ok: queued as 4Kx1"}


@pytest.fixture
def scaleway_ca(tmp_path: Path) -> Any:
    return make_ca(tmp_path / "scw-ca", "Scaleway SNS Test CA")


@pytest.fixture
def scw_host(tmp_path: Path, scaleway_ca: Any,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[SnsHost]:
    monkeypatch.setattr(sns, "FETCH_INTERVAL", 0.0)
    with SnsHost(tmp_path / "scw", issuer=scaleway_ca).running() as host:
        yield host


def scw_config(host: SnsHost, chain: Path | None) -> WebhookConfig:
    settings = ScalewaySettings(
        name="tem", transport="scaleway", project_id="b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d",
        ca_file=host.ca_file, sns_topic_arns=[SCW_TOPIC], sns_cert_hosts=[host.host],
        sns_trust_chain_file=chain)
    return WebhookConfig(settings, None)


def test_scaleway_events_need_a_certificate_from_scalewaysca(scw_host: SnsHost,
                                                             scaleway_ca: Any,
                                                             tmp_path: Path) -> None:
    import asyncio

    hook, cfg = ScalewayWebhook(), scw_config(scw_host, scaleway_ca.path)
    body = json.dumps(scw_host.signed(notification(TEM_DELIVERED), topic=SCW_TOPIC)).encode()
    hook.verify(request(body), cfg)
    [ev] = hook.parse(request(body), cfg)
    assert (ev.kind, ev.recipient, ev.provider_id) == (
        Kind.DELIVERED, "bob@example.org", "18eee9fc04122b1c@example.com")
    assert ev.message_id_header == "<18eee9fc04122b1c@example.com>"
    assert ev.detail == "250 2.0.0 Ok: queued as 4Kx1" and ev.event_id == TEM_DELIVERED["id"]
    bounced = {**TEM_DELIVERED, "type": "email_mailbox_not_found", "id": "e2",
               "email_response_code": 550, "email_response_message": "5.1.1 unknown"}
    [ev] = hook.parse(request(json.dumps(notification(bounced)).encode()), cfg)
    assert (ev.kind, ev.permanent) == (Kind.BOUNCED, True)
    # Another CA's trust chain: the same certificate is not trusted (cached or not).
    other = make_ca(tmp_path / "other-ca", "Someone Else's CA")
    with pytest.raises(EventRefused):
        hook.verify(request(body), scw_config(scw_host, other.path))
    with pytest.raises(EventRefused) as info:  # no trust chain configured
        hook.verify(request(body), scw_config(scw_host, None))
    assert info.value.code == "event.no_key"
    # The subscription handshake: the signed SubscribeURL is visited.
    url = f"https://{scw_host.host}/confirm?token=abc"
    confirm = json.dumps(scw_host.signed({
        "Type": "SubscriptionConfirmation", "Token": "abc", "Message": "subscribe",
        "SubscribeURL": url}, topic=SCW_TOPIC)).encode()
    hook.verify(request(confirm), cfg)
    assert asyncio.run(hook.answer(request(confirm), cfg)) == (200, b"subscription confirmed")
    assert "/confirm?token=abc" in scw_host.visits


def test_a_self_signed_certificate_is_not_scaleways(sns_host: SnsHost, tmp_path: Path) -> None:
    chain = make_ca(tmp_path / "scw-ca", "Scaleway SNS Test CA").path
    body = json.dumps(sns_host.signed(notification(TEM_DELIVERED), topic=SCW_TOPIC)).encode()
    with pytest.raises(EventRefused):
        ScalewayWebhook().verify(request(body), scw_config(sns_host, chain))


def test_ses_events_posted_to_serve_attach_to_the_message_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a message sent through the SES fake by the real queue and worker, then
    its SNS-delivered bounce posted to a real `postroom serve` (the certificate served by
    the same fake host), attached to it by SES's message id; the replay is a duplicate."""
    import httpx
    from provider_cases import ses as ses_case
    from serve_proc import free_port, serve_in_process
    from test_provider_contract import _toml

    from postroom import Mailer
    from postroom.store.db import make_engine
    from postroom.webhooks.intake import EventLog

    monkeypatch.setattr(sns, "FETCH_INTERVAL", 0.0)
    signer = SnsHost(tmp_path / "signer")
    http_port = free_port()
    with FakeProvider(ses_case.CASE, tmp_path / "ses").running() as fake:
        fake.script(("GET", CERT_PATH), Answer(200, signer.cert_pem))
        signer.host = fake.url.removeprefix("https://")
        settings = {**ses_case.CASE.settings, "sns_topic_arns": [TOPIC],
                    "sns_cert_hosts": [signer.host]}
        cfg = tmp_path / "postroom.toml"
        cfg.write_text(
            f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\nworker = false\n'
            f'smtp_listen = "127.0.0.1:{free_port()}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
            f'\n[[connections]]\nname = "ses"\ntransport = "ses"\napi_base = "{fake.url}"\n'
            f'ca_file = "{fake.ca_file}"\n' +
            "".join(f"{k} = {_toml(v) if not isinstance(v, list) else json.dumps(v)}\n"
                    for k, v in settings.items()))
        with Mailer(config=cfg) as m:
            msg_id = m.send(from_="shop@example.com", to="dead@example.org", subject="hooked",
                            text="hello")
            assert m.deliver_due() == 1
        bounce = {**SES_BOUNCE, "mail": {**SES_MAIL, "messageId": ses_case.MESSAGE_ID}}
        body = json.dumps(signer.signed(notification(bounce))).encode()

        def post_twice() -> tuple[httpx.Response, httpx.Response]:
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=20) as c:
                return c.post("/webhooks/ses", content=body), c.post("/webhooks/ses",
                                                                     content=body)

        first, again = serve_in_process(cfg, post_twice)
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 1, "duplicates": 0, "attached": 1}
    assert again.json() == {"accepted": 0, "duplicates": 1, "attached": 0}
    log = EventLog(Queue(make_engine(f"sqlite:///{tmp_path / 'data' / 'postroom.db'}")))
    [event] = log.for_message(msg_id)
    assert (event["kind"], event["recipient"], event["permanent"]) == (
        "bounced", "dead@example.org", True)
