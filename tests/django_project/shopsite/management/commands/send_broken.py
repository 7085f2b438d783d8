"""`manage.py send_broken --to ADDR`: the fail_silently contract when Postroom cannot take the
message (the test points POSTROOM at a configuration that does not exist): prints JSON with
what send_mail returned with fail_silently=True and the error it raised without."""

from __future__ import annotations

import json
from typing import Any

from django.core.mail import send_mail
from django.core.management.base import BaseCommand, CommandParser

from postroom.exceptions import PostroomError


class Command(BaseCommand):
    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True)

    def handle(self, *args: Any, **opts: Any) -> None:
        out: dict[str, Any] = {}
        out["silent"] = send_mail("broken", "x", None, [opts["to"]], fail_silently=True)
        try:
            send_mail("broken", "x", None, [opts["to"]])
        except PostroomError as err:
            out["error"] = {"type": type(err).__name__, "code": err.code, "message": str(err)}
        self.stdout.write(json.dumps(out))
