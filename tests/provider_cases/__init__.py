"""The contract suite's providers (tests/test_provider_contract.py): one module per provider
with its ``CASE`` (a provider_fake.ProviderCase), listed here, and its ``WEBHOOK`` (delivery
events, tests/test_provider_webhooks.py), listed in WEBHOOKS. Adding a provider: write its
module after postmark.py and add one line to CASES (ADDING_PROVIDERS.md)."""

from __future__ import annotations

from provider_fake import ProviderCase
from provider_hooks import HookCase

from provider_cases import (
    brevo,
    elasticemail,
    mailersend,
    mailgun,
    mailjet,
    mailtrap,
    mandrill,
    postal,
    postmark,
    resend,
    scaleway,
    sendgrid,
    ses,
    smtp2go,
    sparkpost,
    zeptomail,
)

CASES: list[ProviderCase] = [
    postmark.CASE,
    sendgrid.CASE,
    mailgun.CASE,
    mailjet.CASE,
    resend.CASE,
    ses.CASE,
    sparkpost.CASE,
    postal.CASE,
    scaleway.CASE,
    brevo.CASE,
    mandrill.CASE,
    smtp2go.CASE,
    elasticemail.CASE,
    mailersend.CASE,
    mailtrap.CASE,
    zeptomail.CASE,
]

# The providers' delivery events in the webhook contract suite (tests/test_provider_webhooks.py):
# each module's ``WEBHOOK`` (a provider_hooks.HookCase), one line each.
WEBHOOKS: list[HookCase] = [
    sendgrid.WEBHOOK,
    mailgun.WEBHOOK,
    mailjet.WEBHOOK,
    resend.WEBHOOK,
    sparkpost.WEBHOOK,
    postal.WEBHOOK,
    brevo.WEBHOOK,
    mandrill.WEBHOOK,
    smtp2go.WEBHOOK,
    mailersend.WEBHOOK,
    mailtrap.WEBHOOK,
    zeptomail.WEBHOOK,
]
