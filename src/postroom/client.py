"""A small typed client for Postroom's HTTP API (``/api/v1``), sync and async, over httpx.

The requests are built and the answers read by one set of functions (``_Call`` builders and
``_read``); :class:`Client` and :class:`AsyncClient` only differ in how they put a call on the
wire (httpx's sync or async client), so there is no second copy of the API logic.

Errors come back as the package's exception tree:

- 401/403 -> :class:`~postroom.exceptions.CredentialsError` (unknown or missing API key);
- other 4xx -> :class:`~postroom.exceptions.MessageError` with the server's code and its
  human-readable fix (bad address, too many recipients, idempotency conflict, unknown id...);
- 5xx, refused connection, timeout -> :class:`~postroom.exceptions.StoreError`
  (``permanent = False``: try again later; pass an ``idempotency_key`` so that a retry after
  an ambiguous failure cannot enqueue the message twice).

::

    from postroom.client import Client

    with Client("http://127.0.0.1:8025", "shop.SECRET") as api:
        msg_id = api.send({"from": "shop@example.com", "to": ["bob@example.org"],
                           "subject": "Hi", "text": "Hello"}, idempotency_key="order-42")
        print(api.get(msg_id)["status"])
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from postroom.exceptions import CredentialsError, MessageError, PostroomError, StoreError

API_PREFIX = "/api/v1"
SendAt = float | str | dt.datetime | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the log, newest first; pass ``next`` as ``cursor`` for the following one
    (``None``: this was the last page)."""

    messages: list[dict[str, Any]]
    next: str | None


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _send_at(value: SendAt) -> str | float | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise MessageError("send_at must be timezone-aware (e.g. datetime.now(UTC))",
                               code="message.send_at")
        return value.isoformat()
    return value


def _idem(key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    if not key.isascii() or not key.isprintable() or not 1 <= len(key) <= 255:
        # An HTTP header value: httpx would fail with a bare UnicodeEncodeError.
        raise MessageError(f"idempotency key {key!r} must be 1-255 printable ASCII characters",
                           code="request.idempotency_key")
    return {"Idempotency-Key": key}


def _send(payload: Mapping[str, Any], key: str | None) -> _Call:
    body = dict(payload)
    if "send_at" in body:
        body["send_at"] = _send_at(body["send_at"])
    return _Call("POST", "/messages", json=body, headers=_idem(key))


def _send_raw(
    raw: bytes,
    sender: str | None,
    recipients: Sequence[str] | None,
    connection: str | None,
    tags: Sequence[str],
    send_at: SendAt,
    key: str | None,
) -> _Call:
    params: list[tuple[str, str]] = []
    if sender is not None:
        params.append(("from", sender))
    params += [("to", r) for r in recipients or ()]
    if connection is not None:
        params.append(("connection", connection))
    params += [("tag", t) for t in tags]
    when = _send_at(send_at)
    if when is not None:
        params.append(("send_at", str(when)))
    return _Call("POST", "/messages/raw", params=params, content=raw,
                 headers={"Content-Type": "message/rfc822", **_idem(key)})


def _path(msg_id: str) -> str:
    return "/messages/" + quote(msg_id, safe="")


def _get(msg_id: str) -> _Call:
    return _Call("GET", _path(msg_id))


def _search(filters: Mapping[str, Any]) -> _Call:
    params = []
    for name, value in filters.items():
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            value = _send_at(value)
        params.append((name, str(value)))
    return _Call("GET", "/messages", params=params)


def _resend(msg_id: str, to: Sequence[str] | None, key: str | None) -> _Call:
    return _Call("POST", _path(msg_id) + "/resend",
                 json={"to": list(to)} if to else {}, headers=_idem(key))


def _error(resp: httpx.Response) -> PostroomError:
    """The server's structured error ({"error": {code, message, fix, field}}) as an exception."""
    try:
        detail = resp.json()["error"]
        code = str(detail["code"])
        text = str(detail["message"])
        if detail.get("fix"):
            text += f"; {detail['fix']}"
    except (ValueError, KeyError, TypeError):
        code, text = f"http.{resp.status_code}", resp.text[:300] or resp.reason_phrase
    text = f"{text} (HTTP {resp.status_code})"
    if resp.status_code in (401, 403):
        return CredentialsError(text, code=code)
    if resp.status_code >= 500:
        return StoreError(text, code=code, permanent=False)
    return MessageError(text, code=code)


def _read(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise _error(resp)
    try:
        return resp.json()
    except ValueError as err:
        raise StoreError(f"the server answered HTTP {resp.status_code} with no JSON; is "
                         f"{resp.request.url} a Postroom server?", code="api.protocol") from err


def _transport_error(err: httpx.HTTPError, url: str) -> StoreError:
    if isinstance(err, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(err, httpx.ConnectError):
        what = "could not connect"
    else:
        what = f"failed ({type(err).__name__}: {err})"
    return StoreError(
        f"request to the Postroom API at {url} {what}; check that `postroom serve` runs and "
        "listens there (server.http_listen). A message may have been accepted if the request "
        "was sent: retry with the same Idempotency-Key",
        code="api.unavailable", permanent=False,
    )


def _id(data: Any) -> str:
    return str(data["id"])


def _page(data: Any) -> Page:
    return Page(messages=list(data["messages"]), next=data.get("next"))


def _base(url: str) -> str:
    return url.rstrip("/") + API_PREFIX


def _auth(api_key: str) -> dict[str, str]:
    if not api_key or any(c in api_key for c in "\r\n "):
        raise MessageError("api_key must be the token `postroom app add NAME` printed "
                           "(NAME.SECRET)", code="api.key")
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "postroom-client"}


class Client:
    """Blocking client. Keeps one keep-alive connection pool; close it (or use ``with``)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self._http = httpx.Client(base_url=_base(url), headers=_auth(api_key), timeout=timeout,
                                  transport=transport)

    def _do(self, call: _Call) -> Any:
        try:
            resp = self._http.request(call.method, call.path, params=tuple(call.params),
                                      json=call.json, content=call.content, headers=call.headers)
        except httpx.HTTPError as err:
            raise _transport_error(err, self.url) from err
        return _read(resp)

    def send(self, payload: Mapping[str, Any], *, idempotency_key: str | None = None) -> str:
        """Compose and queue a message from JSON fields (from, to, cc, bcc, reply_to, subject,
        text, html, attachments, headers, tags, metadata, connection, send_at); its id."""
        return _id(self._do(_send(payload, idempotency_key)))

    def send_raw(
        self,
        raw: bytes,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        *,
        connection: str | None = None,
        tags: Sequence[str] = (),
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Queue a ready MIME message; envelope from the headers unless given. Its id."""
        return _id(self._do(_send_raw(raw, sender, recipients, connection, tags, send_at,
                                      idempotency_key)))

    def get(self, msg_id: str) -> dict[str, Any]:
        """One message: status, per-recipient state, attempts with their transcripts."""
        data: dict[str, Any] = self._do(_get(msg_id))
        return data

    def search(self, **filters: Any) -> Page:
        """The log, newest first. Filters: status, recipient, sender, q (text), tag, since,
        until (ISO 8601, epoch seconds or an aware datetime), limit, cursor (a Page.next)."""
        return _page(self._do(_search(filters)))

    def resend(
        self, msg_id: str, to: Sequence[str] | None = None, *, idempotency_key: str | None = None
    ) -> str:
        """Queue a copy of a message (to its recipients, or to ``to``); the new id."""
        return _id(self._do(_resend(msg_id, to, idempotency_key)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio code (``await api.send(...)``)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._http = httpx.AsyncClient(base_url=_base(url), headers=_auth(api_key),
                                       timeout=timeout, transport=transport)

    async def _do(self, call: _Call) -> Any:
        try:
            resp = await self._http.request(call.method, call.path, params=tuple(call.params),
                                            json=call.json, content=call.content,
                                            headers=call.headers)
        except httpx.HTTPError as err:
            raise _transport_error(err, self.url) from err
        return _read(resp)

    async def send(
        self, payload: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> str:
        return _id(await self._do(_send(payload, idempotency_key)))

    async def send_raw(
        self,
        raw: bytes,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        *,
        connection: str | None = None,
        tags: Sequence[str] = (),
        send_at: SendAt = None,
        idempotency_key: str | None = None,
    ) -> str:
        return _id(await self._do(_send_raw(raw, sender, recipients, connection, tags, send_at,
                                            idempotency_key)))

    async def get(self, msg_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._do(_get(msg_id))
        return data

    async def search(self, **filters: Any) -> Page:
        return _page(await self._do(_search(filters)))

    async def resend(
        self, msg_id: str, to: Sequence[str] | None = None, *, idempotency_key: str | None = None
    ) -> str:
        return _id(await self._do(_resend(msg_id, to, idempotency_key)))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
