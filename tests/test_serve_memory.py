"""`postroom serve` stays within its idle memory budget (60 MB RSS) after each part of it has
been used once: the HTTP listener (/healthz), the API (a send, a list, a get) and the delivery
worker (the message delivered to a real SMTP sink).

One real `postroom serve` (tests/serve_proc.py) delivering to a counting SMTP sink
(tests/real_servers.py); RSS is read from /proc/PID/status. The first start of an instance
migrates the database and creates its key and certificate (alembic and cryptography's X.509
code stay loaded), so it is stopped and the measured process is the second start, as after
any restart. RSS is repeatable to a few hundred kB on one machine; the budget leaves less than
that over the idle figure, so a regression of a MB shows here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from real_servers import Sink
from serve_proc import Postroom, smtp_connection

BUDGET_KB = 60 * 1024
SETTLE = 0.5  # seconds after each step, for work it started (threads, the worker) to end

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads RSS from /proc")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """RSS (kB) of one `postroom serve` after each stage, in order."""
    sink = Sink().start()
    pr = Postroom(tmp_path_factory.mktemp("serve-memory"),
                  connections=smtp_connection(sink.port))
    try:
        pr.start()
        pr.stop()  # the first start: migration, key and certificate
        _, key = pr.add_app_keys("memapp")
        pr.start()
        assert pr.proc is not None
        pid = pr.proc.pid
        seen: dict[str, int] = {}
        time.sleep(SETTLE)
        seen["idle"] = rss_kb(pid)
        with pr.api() as anonymous:
            assert anonymous.get("/healthz").status_code == 200
        time.sleep(SETTLE)
        seen["after /healthz"] = rss_kb(pid)
        with pr.api(key) as api:
            sent = api.post("/api/v1/messages", json={
                "from": "app@example.com", "to": ["bob@example.org"],
                "subject": "memory", "text": "hello"})
            assert sent.status_code == 202, sent.text
            msg_id = sent.json()["id"]
            listed = api.get("/api/v1/messages")
            assert listed.status_code == 200
            assert msg_id in [m["id"] for m in listed.json()["messages"]]
            assert api.get(f"/api/v1/messages/{msg_id}").status_code == 200
            time.sleep(SETTLE)
            seen["after the API"] = rss_kb(pid)
            assert sink.wait_count(1, timeout=30) == 1
            deadline = time.monotonic() + 30
            status = ""
            while time.monotonic() < deadline:
                status = api.get(f"/api/v1/messages/{msg_id}").json()["status"]
                if status == "sent":
                    break
                time.sleep(0.1)
            assert status == "sent"
        time.sleep(SETTLE)
        seen["after a delivery"] = rss_kb(pid)
        print("serve RSS (MB): " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in seen.items()))
        yield seen
    finally:
        pr.stop()
        sink.stop()


# Issue 19, point 4, is open: uvicorn (~3 MB) and FastAPI with its OpenAPI models, pydantic.v1
# and opentelemetry (~9 MB) stay loaded once /healthz or the API has been used. These stages
# are recorded as expected failures until a request is served without FastAPI.
_OPEN = pytest.mark.xfail(reason="issue 19 point 4: serve keeps uvicorn and FastAPI loaded "
                          "(about 61 MB after /healthz, 71 MB after the API)", strict=False)


@pytest.mark.parametrize("stage", ["idle", pytest.param("after /healthz", marks=_OPEN),
                                   pytest.param("after the API", marks=_OPEN),
                                   pytest.param("after a delivery", marks=_OPEN)])
def test_serve_rss_within_budget(stages: dict[str, int], stage: str) -> None:
    rss = stages[stage]
    assert rss <= BUDGET_KB, (
        f"postroom serve uses {rss / 1024:.1f} MB RSS {stage}, over its 60 MB budget "
        f"(all stages: { {k: round(v / 1024, 1) for k, v in stages.items()} })")
