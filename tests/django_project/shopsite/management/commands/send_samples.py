"""`manage.py send_samples --to ADDR --tag T --attach FILE`: send one of each kind of message
Django composes, through whatever EMAIL_BACKEND is configured, and print how many each call
reported sent (JSON). Subjects are "<kind> <tag>" so the test can find them upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.core.mail import (
    EmailMessage,
    EmailMultiAlternatives,
    get_connection,
    send_mail,
    send_mass_mail,
)
from django.core.management.base import BaseCommand, CommandParser

from postroom.exceptions import PostroomError


class Command(BaseCommand):
    help = "Send sample messages through the configured email backend."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True)
        parser.add_argument("--cc", required=True)
        parser.add_argument("--bcc", required=True)
        parser.add_argument("--tag", required=True)
        parser.add_argument("--attach", required=True)
        parser.add_argument("--metadata", action="store_true")

    def handle(self, *args: Any, **opts: Any) -> None:
        to, tag = opts["to"], opts["tag"]
        out: dict[str, Any] = {}
        out["plain"] = send_mail(f"plain {tag}", "Grüße aus Django\nZeile 2\n", None, [to])

        alt = EmailMultiAlternatives(f"alternative {tag} ✓", "Text part", to=[to],
                                     cc=[opts["cc"]], bcc=[opts["bcc"]],
                                     headers={"X-Shop-Order": "42"})
        alt.attach_alternative("<p>HTML <b>part</b> ✓</p>", "text/html")
        alt.tags = ["alt"]  # type: ignore[attr-defined]  # anymail's attribute names
        if opts["metadata"]:  # (raw messages over the HTTP API cannot carry metadata)
            alt.metadata = {"order": "42"}  # type: ignore[attr-defined]
        out["alternative"] = alt.send()

        att = EmailMessage(f"attachments {tag}", "See the files.", to=[to])
        att.attach("résumé.txt", "Lebenslauf: café ☕\n", "text/plain")
        att.attach("blob.bin", bytes(range(256)) * 4, "application/octet-stream")
        att.attach_file(opts["attach"])
        out["attachments"] = att.send()

        out["mass"] = send_mass_mail((
            (f"mass 1 {tag}", "first", None, [to]),
            (f"mass 2 {tag}", "second", None, [to]),
        ))
        with get_connection() as conn:  # one connection, several messages
            out["reused"] = conn.send_messages([
                EmailMessage(f"reused {i} {tag}", f"body {i}", to=[to]) for i in (1, 2, 3)
            ])

        async def async_view() -> int:  # a sync send from inside a running event loop
            return send_mail(f"from async {tag}", "async body", None, [to])

        out["async"] = asyncio.run(async_view())

        out["bad_silent"] = send_mail(f"bad {tag}", "x", None, ["not an address"],
                                      fail_silently=True)
        try:
            send_mail(f"bad {tag}", "x", None, ["not an address"])
        except PostroomError as err:
            out["bad_error"] = err.code
        self.stdout.write(json.dumps(out))
