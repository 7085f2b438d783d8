"""Amazon SES (v2) in the contract suite: shapes and bodies from the SES API v2 reference
("SendEmail": POST /v2/email/outbound-emails with Content.Raw, Destination, EmailTags;
"GetAccount"; "Common errors") and botocore's sesv2 service model (error types and their
HTTP statuses, X-Amzn-ErrorType). The fake checks the request's AWS Signature Version 4 for
real: it signs the request it received again with botocore and the test key pair."""

from __future__ import annotations

import base64
import hmac
import re
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mime_sent

from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
)

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documentation example pair
REGION = "eu-west-1"
MESSAGE_ID = "010201234567890a-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901-000000"
FIELDS = {"FromEmailAddress", "Destination", "ReplyToAddresses", "Content", "EmailTags",
          "ConfigurationSetName", "FeedbackForwardingEmailAddress"}
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<day>\d{8})/"
                   r"(?P<region>[a-z0-9-]+)/ses/aws4_request, "
                   r"SignedHeaders=(?P<signed>[a-z0-9;-]+), "
                   r"Signature=(?P<sig>[0-9a-f]{64})$")


def error(status: int, kind: str, message: str, **headers: str) -> Answer:
    """An AWS rest-json error: the type in X-Amzn-ErrorType, the words in the body."""
    return Answer(status, {"message": message},
                  {"X-Amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"
                   "com.amazonaws.sesv2/", **headers})


def signed_by_test_key(rec: Recorded) -> bool:
    """The request's SigV4 signature, computed again by botocore with the test secret."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    m = _AUTH.match(rec.headers.get("authorization", ""))
    stamp = rec.headers.get("x-amz-date", "")
    if not m or m["key"] != KEY_ID or m["region"] != REGION or not stamp.startswith(m["day"]):
        return False
    headers = {"X-Amz-Date": stamp}
    if "content-type" in rec.headers:
        headers["Content-Type"] = rec.headers["content-type"]
    req = AWSRequest(method=rec.method, url=f"https://{rec.headers['host']}{rec.path}",
                     data=rec.body, headers=headers)
    req.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(KEY_ID, SECRET), "ses", REGION)
    string = signer.string_to_sign(req, signer.canonical_request(req))
    return hmac.compare_digest(signer.signature(string, req), m["sig"])


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    assert set(data["Destination"]) == {"ToAddresses"}
    assert set(data["Content"]) == {"Raw"}
    tags = [t["Name"] for t in data.get("EmailTags", []) if t["Value"] == "true"]
    metadata = {t["Name"]: t["Value"] for t in data.get("EmailTags", [])
                if t["Value"] != "true"}
    raw = base64.b64decode(data["Content"]["Raw"]["Data"], validate=True)
    return mime_sent(raw, data["Destination"]["ToAddresses"], tags=tags, metadata=metadata)


CASE = ProviderCase(
    kind="ses",
    settings={"api_key": SECRET, "access_key_id": KEY_ID, "region": REGION},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/v2/email/outbound-emails"),
    authorised=signed_by_test_key,
    read=read,
    success=Answer(200, {"MessageId": MESSAGE_ID}),
    provider_id=MESSAGE_ID,
    bad_key=error(403, "InvalidSignatureException", "The request signature we calculated "
                  "does not match the signature you provided. Check your AWS Secret Access "
                  "Key and signing method."),
    rate_limited=error(429, "TooManyRequestsException", "Maximum sending rate exceeded.",
                       **{"Retry-After": "30"}),
    unavailable=Answer(503, {"message": "Service Unavailable"}, {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "MessageRejected", "Email address is not verified. The following "
                        "identities failed the check in region EU-WEST-1: bob@example.org"),
                  SenderRejected, False, "ses.identity_unverified"),
        ErrorCase(error(400, "MessageRejected", "Illegal address"), DataRejected, True,
                  "ses.message_rejected"),
        ErrorCase(error(400, "MailFromDomainNotVerifiedException", "The message can't be sent "
                        "because the sending domain isn't verified."), SenderRejected, False,
                  "ses.mail_from_unverified"),
        ErrorCase(error(400, "AccountSuspendedException", "The message can't be sent because "
                        "the account's ability to send email has been permanently "
                        "restricted."), DeliveryError, False, "ses.account_suspended"),
        ErrorCase(error(400, "SendingPausedException", "The message can't be sent because the "
                        "account's ability to send email is currently paused."), DeliveryError,
                  False, "ses.sending_paused", advice="ses.account_suspended"),
        ErrorCase(error(400, "LimitExceededException", "Daily message quota exceeded."),
                  ConnectError, False, "ses.quota_exceeded"),
        ErrorCase(error(404, "NotFoundException", "Configuration set <orders> does not "
                        "exist."), DeliveryError, False, "ses.not_found"),
        ErrorCase(error(400, "BadRequestException", "Missing final '@domain'"), DataRejected,
                  True, "ses.bad_request"),
        ErrorCase(error(403, "UnrecognizedClientException", "The security token included in "
                        "the request is invalid."), AuthError, False, "auth.aws_refused"),
        ErrorCase(error(403, "AccessDeniedException", "User: arn:aws:iam::123456789012:user/"
                        "postroom is not authorized to perform: ses:SendEmail"), AuthError,
                  False, "auth.aws_forbidden"),
        ErrorCase(Answer(413, {"message": "Request Entity Too Large"}), DataRejected, True,
                  "data.too_big", advice="message.too_big"),
    ],
    check=("GET", "/v2/email/account"),
    check_ok=Answer(200, {"DedicatedIpAutoWarmupEnabled": False, "EnforcementStatus":
                          "HEALTHY", "ProductionAccessEnabled": True, "SendQuota": {
                              "Max24HourSend": 50000.0, "MaxSendRate": 14.0,
                              "SentLast24Hours": 12.0}, "SendingEnabled": True}),
    unmappable=None,
)
