"""A local HTTPS stand-in for a provider's API, and the shape of one provider's entry in the
contract suite (tests/test_provider_contract.py, entries in tests/provider_cases/).

:class:`FakeProvider` listens on 127.0.0.1, a port the OS picks, with a certificate from a
private CA made here (``cryptography``); a connection points at it with ``api_base =
fake.url`` and ``ca_file = fake.ca_file``, so the transport's real TLS client runs. It
records every request and answers from a script per route (method, path); what is not
scripted gets the case's documented success. A request whose credential the case does not
accept gets the case's documented "bad key" answer, as the provider would.

:class:`ProviderCase` is the data one provider adds: its settings, routes, how to check the
auth header, how to read its request back into the provider-neutral :class:`Sent` (asserting
the documented shape on the way), and its documented answers.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import json
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from diag_helpers import https_server, make_ca, make_cert, server_context

from postroom.exceptions import DeliveryError

HOST = "127.0.0.1"
Route = tuple[str, str]  # ("POST", "/email")


@dataclass(frozen=True)
class Answer:
    """One scripted HTTP answer: a dict/list body is sent as JSON."""

    status: int
    body: Any = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, (dict, list)):
            headers.setdefault("Content-Type", "application/json")
            return json.dumps(self.body).encode(), headers
        data = self.body.encode() if isinstance(self.body, str) else bytes(self.body)
        return data, headers


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Sent:
    """A request read back into what it asks the provider to send (addresses bare, lower
    case; attachments as (filename, content type, bytes, content id or None))."""

    from_: str
    to: list[str]
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[tuple[str, str, bytes, str | None]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def addresses(value: str | Sequence[str] | None) -> list[str]:
    """Bare lower-case addresses of a header-like value ("A <a@x>, b@y") or a list."""
    if not value:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [a.lower() for _, a in getaddresses(values) if a]


def basic_auth(user: str, password: str) -> str:
    """The Authorization value of HTTP Basic (RFC 7617) for ``user:password``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def mailbox_address(obj: Mapping[str, str], email: str = "email", name: str = "name") -> str:
    """The address of an API's {email, name} object, asserting it has no other key."""
    assert set(obj) <= {email, name}, obj
    return obj[email]


def mime_sent(raw: bytes, recipients: Sequence[str] | None = None, *,
              tags: Sequence[str] = (), metadata: Mapping[str, str] | None = None) -> Sent:
    """A raw-MIME API's message read back into Sent: ``recipients`` (the API's envelope
    field, when it has one) not in To/Cc are the Bcc; tags and metadata come from the API's
    own fields."""
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    to, cc = addresses(msg.get_all("to", [])), addresses(msg.get_all("cc", []))
    bcc = addresses(msg.get_all("bcc", []))
    if recipients is not None:
        bcc = [r for r in addresses(list(recipients)) if r not in to + cc]
    sent = Sent(from_=addresses(str(msg["from"]))[0], to=to, cc=cc, bcc=bcc,
                reply_to=addresses(msg.get_all("reply-to", [])), subject=str(msg["subject"]),
                headers={k: str(v) for k, v in msg.items()}, tags=list(tags),
                metadata=dict(metadata or {}))
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype, cid = part.get_content_type(), part.get("content-id")
        if part.get_filename() is None and cid is None and ctype in ("text/plain", "text/html"):
            if ctype == "text/plain":
                sent.text = part.get_content()
            else:
                sent.html = part.get_content()
            continue
        sent.attachments.append((part.get_filename() or "", ctype, part.get_payload(decode=True),
                                 str(cid).strip("<>") if cid else None))
    return sent


def form_data(rec: Recorded) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """A multipart/form-data request body: its fields (name -> values) and files."""
    head = f"Content-Type: {rec.headers['content-type']}\r\n\r\n".encode()
    form = BytesParser(policy=email.policy.default).parsebytes(head + rec.body)
    assert form.get_content_type() == "multipart/form-data", form.get_content_type()
    fields: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}
    for part in form.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        data = part.get_payload(decode=True)
        if part.get_filename() is not None:
            files[name] = data
        else:
            fields.setdefault(name, []).append(data.decode())
    return fields, files


@dataclass(frozen=True)
class ErrorCase:
    """A documented error answer and what Postroom must make of it."""

    answer: Answer
    error: type[DeliveryError]
    permanent: bool
    code: str  # the DeliveryError's code
    advice: str = ""  # the advice catalog entry it gets (default: the entry named ``code``)

    @property
    def advice_id(self) -> str:
        return self.advice or self.code


@dataclass(frozen=True)
class ProviderCase:
    """One provider in the contract suite."""

    kind: str  # the transport kind (postroom.transports.REGISTRY)
    settings: Mapping[str, Any]  # the connection's keys besides name/transport/api_base/ca_file
    send: Route
    authorised: Callable[[Recorded], bool]  # the request carries the case's credential
    read: Callable[[Recorded], Sent]  # the send request, shape-checked, as Sent
    success: Answer  # the documented success of ``send``
    provider_id: str  # the message id ``success`` names
    bad_key: Answer  # the documented answer to a wrong credential
    rate_limited: Answer  # a 429 with Retry-After
    unavailable: Answer  # a 5xx
    errors: Sequence[ErrorCase] = ()
    check: Route | None = None  # what check() asks (None: the provider has nothing to ask)
    check_ok: Answer | None = None
    # A message the API cannot express, and the words its refusal must contain.
    unmappable: tuple[bytes, str] | None = None
    bad_settings: Mapping[str, Any] = field(default_factory=dict)  # a wrong credential
    # Parts of the suite's full message the API has no field for ("inline": inline images):
    # the full message must be refused naming it, and is then sent without.
    lacks: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.kind


class FakeProvider:
    """The local HTTPS server. ``script(route, *answers)`` queues answers for a route."""

    def __init__(self, case: ProviderCase, folder: Path) -> None:
        self.case = case
        ca = make_ca(folder / "ca", "Provider Fake Test CA")
        cert, key = make_cert(ca, folder, [HOST, "localhost"])
        self.ca_file = str(ca.path)
        self._tls: ssl.SSLContext = server_context(cert, key)
        self.requests: list[Recorded] = []
        self._scripts: dict[Route, list[Answer]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def script(self, route: Route, *answers: Answer) -> None:
        with self._lock:
            self._scripts.setdefault(route, []).extend(answers)

    def sent(self) -> list[Recorded]:
        """The requests to the case's send route."""
        return [r for r in self.requests if (r.method, r.path) == self.case.send]

    def _answer(self, rec: Recorded) -> Answer:
        route = (rec.method, rec.path)
        with self._lock:
            self.requests.append(rec)
            queued = self._scripts.get(route)
            if queued:
                return queued.pop(0)
        if not self.case.authorised(rec):
            return self.case.bad_key
        if route == self.case.send:
            return self.case.success
        if route == self.case.check and self.case.check_ok is not None:
            return self.case.check_ok
        return Answer(404, {"error": f"no route {rec.method} {rec.path} in the fake"})

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeProvider]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the providers

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                rec = Recorded(self.command, parts.path, dict(parse_qsl(parts.query)),
                               {k.lower(): v for k, v in self.headers.items()}, body)
                answer = fake._answer(rec)
                data, headers = answer.encoded()
                self.send_response(answer.status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return

        with https_server(Handler, self._tls) as server:
            self._server = server
            self.url = f"https://{HOST}:{server.server_address[1]}"
            yield self
