"""Amazon SES (API v2): ``SendEmail`` with the stored MIME as ``Content.Raw``, signed with
AWS Signature Version 4 (transports._auth.SigV4, botocore's signer). Pages: "SendEmail"
(https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html), "Common
errors", "GetAccount"; events: "Amazon SNS notification contents for Amazon SES" and "Event
publishing: contents of event data".

- Request: ``POST https://email.{region}.amazonaws.com/v2/email/outbound-emails`` with JSON
  ``{"Destination": {"ToAddresses": [...]}, "Content": {"Raw": {"Data": <base64 MIME>}},
  "EmailTags": [{"Name", "Value"}], "ConfigurationSetName"}``. The message is sent as it is
  stored (raw MIME, the From of its header); ``Destination`` carries the envelope
  recipients, to whom alone SES delivers (as SMTP's RCPT TO), so a Bcc or a split route
  needs nothing more.
- Credentials: the IAM access key id in ``access_key_id``; the secret access key is the
  connection's API key (``api_key_env`` / ``api_key_file`` / stored with `postroom
  connection set-password NAME`).
- Tags: Postroom's tags and metadata become SES message tags (names and values: ASCII
  letters, digits, ``_`` and ``-``, at most 256 characters); anything else is refused
  naming the tag, never dropped. A tag ``orders`` is ``{"Name": "orders", "Value": "true"}``,
  metadata ``order=1234`` is ``{"Name": "order", "Value": "1234"}``.
- Success: 200 ``{"MessageId": "..."}``: the id SES's events name the message by.
- Errors: ``X-Amzn-ErrorType`` header (or ``__type`` / ``code`` in the body) and
  ``{"message": "..."}``; the table below.
- Events: SES publishes them through Amazon SNS; postroom.webhooks.sns checks SNS's own
  signature, and the connection names the topics it accepts (``sns_topic_arns``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, cast

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import (
    ConnectError,
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http
from postroom.webhooks import BadEvent, DeliveryEvent, Kind, WebhookRequest, sns
from postroom.webhooks.base import Webhook, WebhookConfig

# SendEmail: "The maximum message size, including attachments, is 40 MB" (after base64).
MAX_SIZE = 40 * 1024 * 1024
MAX_RECIPIENTS = 50  # "the message may not include more than 50 recipients"
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")

_Rule = _http.ErrorRule
_IDENTITY = ("Fix: verify the From address or its domain under Identities in the SES console "
             "of this region")
# SendEmail's documented errors (x-amzn-ErrorType), and the signature errors of every AWS
# API ("Common errors"). "MessageRejected/unverified" is MessageRejected whose message says
# an identity is not verified (the sandbox's recipients, or the sender): parse_error names it.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "MessageRejected": _Rule("ses.message_rejected", "SES refuses this message (its content "
                             "or an attachment type): correct it in the app that sent it"),
    "MessageRejected/unverified": _Rule(
        "ses.identity_unverified", f"an address is not verified in SES. {_IDENTITY}; while "
        "the account is in the SES sandbox, recipients must be verified too (request "
        "production access)", kind=SenderRejected, permanent=False, scope=Scope.CONFIGURATION),
    "MailFromDomainNotVerifiedException": _Rule(
        "ses.mail_from_unverified", "the custom MAIL FROM domain's MX record cannot be read. "
        "Fix: publish the MX and SPF records SES shows for the identity's MAIL FROM domain",
        kind=SenderRejected, permanent=False, scope=Scope.CONFIGURATION),
    "AccountSuspendedException": _Rule(
        "ses.account_suspended", "SES has stopped this account from sending. Fix: open a case "
        "with AWS Support (the console's Reputation metrics say why)", kind=DeliveryError,
        permanent=False, scope=Scope.CONFIGURATION),
    "SendingPausedException": _Rule(
        "ses.sending_paused", "sending is paused for the account or the configuration set. "
        "Fix: resume it in the SES console (Account dashboard, or the configuration set)",
        kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    "LimitExceededException": _Rule(
        "ses.quota_exceeded", "the account reached an SES limit (its daily sending quota). "
        "Postroom retries later; ask AWS for a higher quota in the SES console",
        kind=ConnectError, permanent=False),
    "TooManyRequestsException": _Rule(
        "provider.rate_limited", "rate limit (the account's maximum send rate). Postroom "
        "retries later; lower the connection's rate_limit to stay under it",
        kind=ConnectError, permanent=False),
    "NotFoundException": _Rule(
        "ses.not_found", "the configuration set does not exist in this region. Fix: correct "
        "configuration_set (or region) of the connection", kind=DeliveryError,
        permanent=False, scope=Scope.CONFIGURATION),
    "BadRequestException": _Rule("ses.bad_request", "SES found the request invalid (named "
                                 "above): correct the message in the app that sent it"),
    "UnrecognizedClientException": _Rule("auth.aws_refused", auth="refused"),
    "InvalidSignatureException": _Rule("auth.aws_refused", auth="refused"),
    "SignatureDoesNotMatch": _Rule("auth.aws_refused", auth="refused"),
    "IncompleteSignature": _Rule("auth.aws_refused", auth="refused"),
    "AccessDeniedException": _Rule("auth.aws_forbidden", auth="forbidden"),
}


class SesSettings(_http.ApiKeySettings, sns.SnsTopics):
    """``api_key*``: the IAM user's secret access key. Delivery events: ``sns_topic_arns``,
    the SNS topics the configuration set publishes to (postroom.webhooks.sns)."""

    transport: Literal["ses"] = "ses"
    region: str = Field(default="us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")  # AWS
    access_key_id: str = Field(pattern=r"^[A-Z0-9]{16,128}$")  # the IAM user's access key id
    # The configuration set the mail goes out with (its event destinations, its IP pool).
    configuration_set: str | None = Field(default=None, min_length=1, max_length=64)


def email_tags(env: Envelope) -> list[dict[str, str]]:
    """Postroom's tags and metadata as SES message tags; refused when SES cannot hold one."""
    tags = [("tag", t, "true") for t in env.tags]
    tags += [("metadata key", k, v) for k, v in env.metadata.items()]
    seen: set[str] = set()
    out = []
    for what, name, value in tags:
        if not (_TAG.fullmatch(name) and _TAG.fullmatch(value)) or name in seen:
            raise UnsupportedFeature(
                f"Amazon SES message tags hold only ASCII letters, digits, _ and - (at most "
                f"256), each name once; the {what} {name!r} (= {value!r}) cannot be one: "
                "rename it or route such mail to an SMTP connection", code="unsupported.tags")
        seen.add(name)
        out.append({"Name": name, "Value": value})
    return out


# -- delivery events -------------------------------------------------------------------------
def _bounce(data: dict[str, Any]) -> tuple[list[Any], bool | None]:
    kind = str(data.get("bounceType", ""))
    permanent = {"Permanent": True, "Transient": False}.get(kind)
    return list(data.get("bouncedRecipients") or []), permanent


# eventType / notificationType -> (our kind, the key of its details).
_KINDS: dict[str, tuple[Kind, str]] = {
    "Send": (Kind.QUEUED, "send"),
    "Delivery": (Kind.DELIVERED, "delivery"),
    "DeliveryDelay": (Kind.DEFERRED, "deliveryDelay"),
    "Bounce": (Kind.BOUNCED, "bounce"),
    "Reject": (Kind.REJECTED, "reject"),
    "Rendering Failure": (Kind.REJECTED, "failure"),
    "Complaint": (Kind.COMPLAINED, "complaint"),
    "Subscription": (Kind.UNSUBSCRIBED, "subscription"),
    "Open": (Kind.OPENED, "open"),
    "Click": (Kind.CLICKED, "click"),
}


def sns_hosts(s: SesSettings) -> set[str]:
    """Where the region's SNS serves its certificates and subscription confirmations."""
    return {f"sns.{s.region}.amazonaws.com", *s.sns_cert_hosts}


class SesWebhook(Webhook):
    """SES events delivered by an SNS HTTPS subscription (postroom.webhooks.sns)."""

    docs_url = "https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        s = cast(SesSettings, settings.connection)  # the door pairs them (transport.webhook)
        sns.verify(req, topics=s.sns_topic_arns, cert_hosts=sns_hosts(s), ca_file=s.ca_file)

    async def answer(self, req: WebhookRequest,
                     settings: WebhookConfig) -> tuple[int, bytes] | None:
        s = cast(SesSettings, settings.connection)
        return await sns.confirm(req, hosts=sns_hosts(s), ca_file=s.ca_file)

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        envelope = self.json(req)
        message = sns.message(envelope)
        if message is None:  # a test notification, an unsubscribe confirmation
            return []
        return ses_events(message, str(envelope.get("MessageId", "")),
                          sns.timestamp(envelope))


def ses_events(data: dict[str, Any], sns_id: str, sent_at: float) -> list[DeliveryEvent]:
    """One SES notification (or published event) as events, one per recipient."""
    name = str(data.get("eventType") or data.get("notificationType") or "")
    if name == "AmazonSnsSubscriptionSucceeded":
        return []
    mail = data.get("mail")
    if not isinstance(mail, dict):
        raise BadEvent("an SES notification without its mail object")
    kind, key = _KINDS.get(name, (Kind.UNKNOWN, ""))
    details = data.get(key) if key else None
    details = details if isinstance(details, dict) else {}
    permanent: bool | None = None
    if kind is Kind.BOUNCED:
        people, permanent = _bounce(details)
    elif kind is Kind.COMPLAINED:
        people = list(details.get("complainedRecipients") or [])
    elif kind is Kind.DEFERRED:
        people = list(details.get("delayedRecipients") or [])
    elif kind is Kind.DELIVERED:
        people = list(details.get("recipients") or [])
    else:
        people = list(mail.get("destination") or [])
    headers = mail.get("commonHeaders")
    header_id = headers.get("messageId") if isinstance(headers, dict) else None
    at = sns.iso_time(details.get("timestamp")) or sent_at
    detail = str(details.get("smtpResponse") or details.get("bounceSubType") or
                 details.get("complaintFeedbackType") or details.get("reason") or
                 details.get("errorMessage") or details.get("link") or name)
    out = []
    for person in people or [None]:
        rcpt = person.get("emailAddress") if isinstance(person, dict) else person
        said = detail
        if isinstance(person, dict) and person.get("diagnosticCode"):
            said = f"{detail}: {person['diagnosticCode']}"
        out.append(DeliveryEvent(
            kind=kind, provider_id=str(mail.get("messageId") or "") or None,
            recipient=str(rcpt) if rcpt else None, at=at, detail=said[:1000], raw=data,
            event_id=f"{sns_id}:{rcpt or ''}" if sns_id else None,
            message_id_header=str(header_id) if header_id else None, permanent=permanent))
    return out


class SesTransport(_http.HttpTransport):
    settings: SesSettings
    settings_model = SesSettings
    title = "Amazon SES"
    docs_url = "https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "region": "eu-west-1",
        "access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "api_key_env": "AWS_SECRET_ACCESS_KEY",
        "sns_topic_arns": ["arn:aws:sns:eu-west-1:123456789012:ses-events"],
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "access_key_id": "an IAM user allowed ses:SendEmail, ses:SendRawEmail",
        "api_key_env": "its secret access key",
        "sns_topic_arns": "POST /webhooks/ses",
    }
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = SesWebhook

    def default_api_base(self) -> str:
        return f"https://email.{self.settings.region}.amazonaws.com"

    def make_auth(self) -> _auth.Auth:
        s = self.settings
        return _auth.SigV4("ses", s.region, access_key_id=lambda: s.access_key_id,
                           secret_access_key=self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        if len(env.recipients) > MAX_RECIPIENTS:
            raise UnsupportedFeature(
                f"Amazon SES sends one message to at most {MAX_RECIPIENTS} recipients; this "
                f"one has {len(env.recipients)}: send it in parts", code="unsupported.recipients")
        data: dict[str, Any] = {
            "Destination": {"ToAddresses": list(env.recipients)},
            "Content": {"Raw": {"Data": base64.b64encode(env.raw).decode("ascii")}},
        }
        tags = email_tags(env)
        if tags:
            data["EmailTags"] = tags
        if self.settings.configuration_set:
            data["ConfigurationSetName"] = self.settings.configuration_set
        body = json.dumps(data).encode()
        if len(body) > MAX_SIZE:
            raise UnsupportedFeature(
                f"the message is {len(body)} bytes in SES's request; SES takes at most "
                f"{MAX_SIZE}: send big files as links", code="unsupported.size")
        return _http.Request("POST", f"{self.base}/v2/email/outbound-emails",
                             {"Content-Type": "application/json"}, body,
                             f"raw MIME, {len(env.raw)} bytes base64 in JSON")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        msg_id = _http.json_body(resp).get("MessageId")
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        # rest-json: "Code:namespace" in the header, else __type "namespace#Code" or code.
        kind = (resp.headers.get("x-amzn-errortype") or str(data.get("__type") or "")
                or str(data.get("code") or data.get("Code") or ""))
        code = kind.split(":", 1)[0].rpartition("#")[2]
        message = str(data.get("message") or data.get("Message") or resp.reason_phrase)
        if code == "MessageRejected" and "not verified" in message.lower():
            code = "MessageRejected/unverified"
        return _http.ApiError(resp.status_code, code, message)

    def check_request(self) -> _http.Request:
        """``GET /v2/email/account`` (GetAccount) proves the key pair and its permission
        without sending, and says whether the account is out of the sandbox."""
        return _http.Request("GET", f"{self.base}/v2/email/account", {}, b"",
                             "the account's sending status")

    def checked(self, resp: httpx.Response) -> str:
        data = _http.json_body(resp)
        mode = "production" if data.get("ProductionAccessEnabled") else (
            "sandbox: only verified recipients")
        sending = "" if data.get("SendingEnabled", True) else ", sending PAUSED"
        return f"the access key works ({self.settings.region}, {mode}{sending})"
