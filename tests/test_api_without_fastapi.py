"""The app API on the HTTP front without FastAPI (issue 19.4): `postroom serve` answers its
apps from the route table (ingress.api_dispatch), so FastAPI, Starlette and anyio (about
7 MB) stay out of it. In a fresh interpreter (this one has FastAPI from other tests): the
front, in-process on a real SQLite instance, answers a send, a search, a validation error,
an unknown path, a wrong method and a scanner's path; none of them imports FastAPI.
The HTTP API's behaviour itself is tests/test_http_api.py's (a real `postroom serve`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import asyncio, json, sys
from pathlib import Path
from postroom import settings
from postroom.ingress.http_front import Context, Front
from postroom.runtime import Instance

root = Path(sys.argv[1])
(root / "postroom.toml").write_text(
    '[server]\ndata_dir = "data"\n\n[[connections]]\nname = "up"\ntransport = "smtp"\n'
    'host = "127.0.0.1"\nport = 9\nsecurity = "none"\n')
inst = Instance(settings.load(root / "postroom.toml", environ={}))
key = "shop." + inst.apps.add("shop")
ctx = Context(inst.queue, inst.apps, inst.settings, intake=inst.intake)
front = Front(ctx)


async def call(method, path, body=b"", query=b"", headers=()):
    scope = {"type": "http", "method": method, "path": path, "query_string": query,
             "client": ("127.0.0.1", 5000), "headers": [
                 (b"authorization", f"Bearer {key}".encode()),
                 (b"content-type", b"application/json"),
                 (b"content-length", str(len(body)).encode()), *headers]}
    sent = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await front(scope, receive, send)
    head = dict(sent[0]["headers"])
    data = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], head, json.loads(data) if data else None


async def main():
    msg = {"from": "shop@example.org", "to": ["bob@example.net"], "subject": "hi",
           "text": "hello"}
    out = {"send": await call("POST", "/api/v1/messages", json.dumps(msg).encode(),
                              headers=[(b"idempotency-key", b"k-1")])}
    out["again"] = await call("POST", "/api/v1/messages", json.dumps(msg).encode(),
                              headers=[(b"idempotency-key", b"k-1")])
    out["search"] = await call("GET", "/api/v1/messages", query=b"limit=5&limit=1")
    out["invalid"] = await call("POST", "/api/v1/messages", b'{"from": "a@example.org", '
                                b'"tos": []}')
    out["limit"] = await call("GET", "/api/v1/messages", query=b"limit=0")
    out["unknown"] = await call("GET", "/api/v1/nothing")
    out["method"] = await call("DELETE", "/api/v1/messages")
    out["scanner"] = await call("GET", "/wp-login.php")
    return {k: [s, {h.decode(): v.decode() for h, v in head.items()}, body]
            for k, (s, head, body) in out.items()}


answers = asyncio.run(main())
loaded = sorted(m for m in ("fastapi", "starlette", "anyio") if m in sys.modules)
print(json.dumps({"answers": answers, "loaded": loaded}))
ctx.keys.close()
inst.close()
'''


def test_front_answers_the_api_without_fastapi(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout.decode().splitlines()[-1])
    assert result["loaded"] == [], result["loaded"]
    got = result["answers"]

    status, headers, body = got["send"]
    assert status == 202 and body["status"] == "queued" and body["recipients"] == [
        "bob@example.net"], body
    assert headers["content-type"] == "application/json"
    status, _, again = got["again"]
    assert status == 200 and again["id"] == body["id"] and again["duplicate"] is True
    status, _, page = got["search"]  # the last of a repeated single value counts
    assert status == 200 and [m["id"] for m in page["messages"]] == [body["id"]]

    for name, status, code, field in (("invalid", 422, "request.unknown_field", "tos"),
                                      ("limit", 422, "request.invalid", "limit"),
                                      ("unknown", 404, "route.unknown", None),
                                      ("method", 405, "method.not_allowed", None),
                                      ("scanner", 404, "route.unknown", None)):
        answer = got[name]
        assert answer[0] == status, (name, answer)
        assert answer[2]["error"]["code"] == code and answer[2]["error"]["field"] == field, (
            name, answer)
    assert set(got["method"][1]["allow"].split(", ")) == {"GET", "HEAD", "POST"}
