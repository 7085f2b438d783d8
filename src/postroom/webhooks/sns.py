"""Amazon SNS HTTPS deliveries: the message signature, the subscription handshake, and the
notification's own message (Amazon SES publishes its events this way; see "Verifying the
signatures of Amazon SNS messages" and "Parsing message formats" in the SNS developer guide,
https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html).

A request is accepted when

1. it is a ``Notification``, ``SubscriptionConfirmation`` or ``UnsubscribeConfirmation``
   of one of the connection's topics (``TopicArn``): anyone can have SNS sign a message for
   a topic of their own, so the signature alone says nothing about whose topic it is;
2. its ``SigningCertURL`` is an https URL ending in ``.pem`` on the provider's host
   (AWS: ``sns.<region>.amazonaws.com``, the connection's region; Scaleway Topics and
   Events: ``messaging.s3.<region>.scw.cloud``; tests name their own): the certificate is
   then the provider's, as TLS to that host proves. Where the provider says to check the
   certificate against its CA too (Scaleway), that is done with the trust chain it
   publishes;
3. its ``Signature`` is that certificate's RSA PKCS#1 v1.5 signature (SHA1 for
   ``SignatureVersion`` 1, SHA256 for 2) of the documented string to sign;
4. its ``Timestamp`` is within :data:`WINDOW` of now (a replay older than that is refused;
   a newer one is a duplicate by its MessageId).

Certificates are fetched with a bounded size and timeout and cached by URL. The fetch is
synchronous (``Webhook.verify`` is), so it is rare by construction: one per certificate
(AWS rotates them seldom), and at most one uncached fetch per :data:`FETCH_INTERVAL` for
the whole process, so a stream of requests naming new URLs cannot make Postroom fetch.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, Field, field_validator

from postroom.webhooks import BadEvent, Refused, WebhookRequest
from postroom.webhooks import verify as checks

# SNS retries an HTTPS delivery for up to an hour under a custom delivery policy (the
# default policy gives up within a minute): a signed message older than this is a replay.
WINDOW = 3600.0
MAX_CERT = 16 * 1024  # an SNS signing certificate is about 2 KB
FETCH_INTERVAL = 10.0
FETCH_TIMEOUT = 5.0
_CACHE_SIZE = 16
TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
# The fields of the string to sign, in order, per message type (SNS developer guide).
_SIGNED = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                 "TopicArn", "Type"),
}
_SIGNED["UnsubscribeConfirmation"] = _SIGNED["SubscriptionConfirmation"]

_ARN = r"arn:[a-z-]+:sns:[a-z0-9-]+:[A-Za-z0-9-]{1,80}:[A-Za-z0-9_.-]{1,256}"


class SnsTopics(BaseModel):
    """The settings of a connection whose events come through SNS (a provider's Settings
    inherits them): the topics it accepts (anyone can have SNS sign a message for a topic
    of their own, so the topic is what says it is this account's), and hosts besides the
    provider's own allowed to serve signing certificates (a test server)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    sns_topic_arns: list[str] = Field(default_factory=list)  # topics whose events are accepted
    sns_cert_hosts: list[str] = Field(default_factory=list)  # more certificate hosts (tests)

    @field_validator("sns_topic_arns")
    @classmethod
    def _arns(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not re.fullmatch(_ARN, arn):
                raise ValueError(f"sns_topic_arns: {arn!r} is not an SNS topic ARN "
                                 "(arn:aws:sns:REGION:ACCOUNT:TOPIC)")
        return value


_lock = threading.Lock()
_certs: OrderedDict[str, Any] = OrderedDict()
_last_fetch = [0.0]


def _envelope(req: WebhookRequest) -> dict[str, Any]:
    try:
        data = json.loads(req.body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("Type") not in TYPES:
        raise Refused("not an SNS message", code="event.unsigned")
    return data


def allowed(url: str, hosts: Collection[str] | None) -> bool:
    """An https URL on one of ``hosts`` (host[:port]; None: any host), without user info."""
    parts = urlsplit(url)
    return (parts.scheme == "https" and bool(parts.hostname) and parts.username is None
            and (hosts is None or parts.netloc in hosts))


def string_to_sign(data: dict[str, Any]) -> bytes:
    """The documented string to sign: "Name\\nvalue\\n" for each field of the type that is
    present, in the documented order."""
    fields = _SIGNED[str(data["Type"])]
    return "".join(f"{k}\n{data[k]}\n" for k in fields if k in data).encode()


def verify(req: WebhookRequest, *, topics: Sequence[str], cert_hosts: Collection[str],
           trust_chain: Sequence[Any] = (), ca_file: str | None = None,
           now: float | None = None) -> None:
    """Refused unless ``req`` is an SNS message of one of ``topics``, signed with a
    certificate from ``cert_hosts`` (issued by ``trust_chain``'s CA when one is given),
    recent (the module's docstring). ``ca_file``: the CA of the certificate host's TLS."""
    data = _envelope(req)
    if not topics:
        raise Refused("the connection accepts no SNS topic; set sns_topic_arns",
                      code="event.no_key")
    if data.get("TopicArn") not in topics:
        raise Refused("an SNS message of another topic", code="event.bad_signature")
    url = str(data.get("SigningCertURL", ""))
    parts = urlsplit(url)
    if not (allowed(url, cert_hosts) and parts.path.endswith(".pem") and not parts.query):
        raise Refused("SigningCertURL is not an SNS certificate URL",
                      code="event.bad_signature")
    algorithm = {"1": "sha1", "2": "sha256"}.get(str(data.get("SignatureVersion")))
    if algorithm is None:
        raise Refused("unknown SNS SignatureVersion", code="event.bad_signature")
    when = iso_time(data.get("Timestamp"))
    checks.check_timestamp(when if when is not None else "", tolerance=WINDOW, now=now)
    try:
        signature = base64.b64decode(str(data.get("Signature", "")), validate=True)
    except (ValueError, binascii.Error):
        signature = b""
    key = _certificate_key(url, ca_file, trust_chain)
    _check_rsa(key, signature, string_to_sign(data), algorithm)


def _check_rsa(key: Any, signature: bytes, data: bytes, algorithm: str) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if not isinstance(key, rsa.RSAPublicKey) or not signature:
        raise Refused("the SNS signature does not match", code="event.bad_signature")
    # SignatureVersion 1 is SHA1 by SNS's definition; 2 (SHA256) where the topic asks for it.
    digest = hashes.SHA1() if algorithm == "sha1" else hashes.SHA256()
    try:
        key.verify(signature, data, padding.PKCS1v15(), digest)
    except InvalidSignature as err:
        raise Refused("the SNS signature does not match",
                      code="event.bad_signature") from err


def _certificate_key(url: str, ca_file: str | None, trust_chain: Sequence[Any]) -> Any:
    """The public key of the certificate at ``url`` (fetched once, cached: the module
    docstring), checked against ``trust_chain`` on every use when one is given (the cache
    is shared by connections, each with its own trust)."""
    cert = _certificate(url, ca_file)
    if trust_chain and not (issued_by(cert, trust_chain) and cert.not_valid_before_utc
                            <= datetime.now().astimezone() <= cert.not_valid_after_utc):
        raise Refused("the SNS signing certificate is not issued by the provider's CA",
                      code="event.bad_signature")
    return cert.public_key()


def _certificate(url: str, ca_file: str | None) -> Any:
    with _lock:
        if url in _certs:
            _certs.move_to_end(url)
            return _certs[url]
        now = time.monotonic()
        if now - _last_fetch[0] < FETCH_INTERVAL:
            raise Refused("an uncached SNS certificate was fetched moments ago; SNS retries",
                          code="event.bad_signature")
        _last_fetch[0] = now
    pem = _fetch(url, ca_file)
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise Refused("the SNS signing certificate cannot be read",
                      code="event.bad_signature") from err
    with _lock:
        _certs[url] = cert
        while len(_certs) > _CACHE_SIZE:
            _certs.popitem(last=False)
    return cert


def _fetch(url: str, ca_file: str | None) -> bytes:
    import ssl

    tls: Any = ssl.create_default_context(cafile=ca_file) if ca_file else True
    try:
        with httpx.Client(timeout=FETCH_TIMEOUT, verify=tls, follow_redirects=False) as client, \
                client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise Refused(f"the SNS certificate URL answered {resp.status_code}",
                              code="event.bad_signature")
            data = b""
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_CERT:
                    raise Refused("the SNS certificate is too big", code="event.bad_signature")
            return data
    except httpx.HTTPError as err:
        raise Refused(f"cannot fetch the SNS certificate: {type(err).__name__}",
                      code="event.bad_signature") from err


async def confirm(req: WebhookRequest, *, hosts: Collection[str] | None,
                  ca_file: str | None = None) -> tuple[int, bytes] | None:
    """Confirm a (verified) SubscriptionConfirmation by visiting its SubscribeURL, an https
    URL on one of ``hosts`` (None: any, the signature vouching for it); None for any other
    message (it carries events)."""
    data = _envelope(req)
    if data["Type"] != "SubscriptionConfirmation":
        return None
    url = str(data.get("SubscribeURL", ""))
    if not allowed(url, hosts):
        raise BadEvent("the SubscribeURL is not an https URL of the provider's SNS host")
    import ssl

    tls: Any = ssl.create_default_context(cafile=ca_file) if ca_file else True
    try:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, verify=tls) as client:
            resp = await client.get(url)
    except httpx.HTTPError as err:
        raise BadEvent(f"could not confirm the SNS subscription: {type(err).__name__}") from err
    if resp.status_code != 200:
        raise BadEvent(f"SNS answered {resp.status_code} to the subscription confirmation")
    return 200, b"subscription confirmed"


def message(envelope: Any) -> dict[str, Any] | None:
    """A Notification's Message as a JSON object; None for the other types."""
    if not isinstance(envelope, dict) or envelope.get("Type") != "Notification":
        return None
    try:
        data = json.loads(str(envelope.get("Message", "")))
    except ValueError as err:
        raise BadEvent("the SNS Message is not JSON") from err
    if not isinstance(data, dict):
        raise BadEvent("the SNS Message is not a JSON object")
    return data


def iso_time(value: Any) -> float | None:
    """An ISO 8601 time ("2026-12-07T08:00:00.000Z") as epoch seconds; None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def timestamp(envelope: dict[str, Any]) -> float:
    return iso_time(envelope.get("Timestamp")) or time.time()


def load_chain(path: str) -> list[Any]:
    """The CA certificates of a PEM file (a provider's published trust chain)."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            return list(x509.load_pem_x509_certificates(f.read()))
    except (OSError, ValueError) as err:
        raise Refused(f"cannot read the SNS trust chain {path}: {err}",
                      code="event.no_key") from err


def issued_by(cert: Any, chain: Sequence[Any], depth: int = 4) -> bool:
    """Whether ``cert`` was signed by a certificate of ``chain`` (directly, or through
    others of it up to ``depth`` links), each valid now."""
    now = datetime.now().astimezone()
    for ca in chain:
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if ca.issuer == ca.subject or (depth > 1 and issued_by(ca, chain, depth - 1)):
            return True
    return False
