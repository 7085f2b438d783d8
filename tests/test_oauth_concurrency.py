"""Four workers that need a new access token at the same moment make one refresh request
(issue 5), on SQLite (one machine: a flock beside the database) and on PostgreSQL (an
advisory lock: also across nodes). The workers are real `postroom worker` processes, each
with its own data folder (as on separate nodes) sharing one database and one key; the token
endpoint is the recipe's OAuth server, whose request log is counted; the mail goes through
the Postfix + Dovecot peer, which checks each token with that server.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from oauth_helpers import USER, DotServer, oauth_connection
from real_servers import enqueue_many, envelopes, start_workers, wait_statuses

from postroom import settings as settings_mod
from postroom.oauth import flows
from postroom.runtime import Instance
from postroom.secrets import KEY_ENV

MESSAGES = 12
# One message per claim, so that every worker takes some (and needs a token) at once.
DELIVERY = ("min_backoff = 30\nmax_backoff = 60\npoll_interval = 0.2\nshutdown_grace = 2\n"
            "claim_batch = 1\n")


@pytest.fixture(scope="module")
def dot(peers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    server = DotServer(peers, tmp_path_factory.mktemp("dot"), ttl=3600).start()
    try:
        yield server
    finally:
        server.stop()


def _sign_in(inst: Instance, name: str) -> None:
    """The authorization-code flow in this process (the same code /oauth/start and
    /oauth/callback run), the user "logged in" by the recipe's test header."""
    url = flows.start(inst.oauth, name)
    back = httpx.get(url, headers={"X-Test-User": USER}, timeout=20)
    assert back.status_code == 302, back.text[:2000]
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(back.headers["location"]).query))
    flows.finish(inst.oauth, params)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_four_workers_refresh_an_expired_token_once(
        store: str, peers: Any, dot: DotServer, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.fernet import Fernet

    # Every node must have the same key (README "Running several nodes").
    monkeypatch.setenv(KEY_ENV, Fernet.generate_key().decode())
    database = (request.getfixturevalue("pg_server").new_database() if store == "postgresql"
                else f"sqlite:///{tmp_path / 'shared.db'}")
    # One session per worker: four AUTHs at once, each checked by the OAuth server.
    conns = oauth_connection("dot", peers, dot, extra="pool_size = 1\n")
    admin = tmp_path / "admin"
    admin.mkdir()
    (admin / "postroom.toml").write_text(
        f'[server]\ndata_dir = "data"\ndatabase = "{database}"\nhttp_listen = ""\n'
        f"[delivery]\n{DELIVERY}\n{conns}")
    inst = Instance(settings_mod.load(admin / "postroom.toml"))
    workers = []
    try:
        _sign_in(inst, "dot")
        grant = inst.oauth.store.get("dot")
        assert grant is not None and grant.refresh_token
        # The access token has run out: the next delivery on any worker needs a refresh.
        inst.oauth.store.update("dot", expires_at=grant.issued_at or 0.0)
        workers = start_workers(tmp_path, 4, database=database, connections=conns,
                                delivery=DELIVERY)
        before = dot.token_requests()
        enqueue_many(database, envelopes(MESSAGES, lambda i: USER, prefix="race"))
        counts = wait_statuses(database, lambda c: c.get("sent", 0) >= MESSAGES, timeout=90)
        assert counts.get("sent", 0) == MESSAGES, counts
        assert dot.wait_logged(before + 1) == before + 1, "expected exactly one token request"
        after = inst.oauth.store.get("dot")
        assert after is not None and after.refreshes == 1 and after.state == "ok"
        assert after.refresh_token != grant.refresh_token  # the rotated token was kept
        logs = "".join(w.log.read_text(errors="replace") for w in workers)
        assert logs.count("refreshing the access token of connection dot") == 1, logs[-3000:]
        peers.wait_for(USER, lambda m: str(m.get("Subject", "")).startswith("race "))
    finally:
        for w in workers:
            w.stop()
        inst.close()
