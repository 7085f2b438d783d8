"""Every provider fact says where it was checked (issue 19, point 5): each entry of
providers.toml carries ``sources``, each a provider page URL or an explicit "unverified: ..."
that says why none is given; and the OAuth facts the issue named are the documented ones."""

from __future__ import annotations

import urllib.parse

import pytest

from postroom.diagnostics import providers
from postroom.exceptions import ConfigError
from postroom.oauth import providers as oauth_providers


def test_every_provider_names_its_sources() -> None:
    table = providers.table()
    assert len(table) > 20
    for p in table:
        assert p.sources, f"{p.id}: no sources"
        for src in p.sources:
            if src.startswith("unverified: "):
                assert len(src) > len("unverified: ") + 10, (p.id, src)  # says why
                continue
            url = urllib.parse.urlsplit(src)
            assert url.scheme == "https" and url.hostname, (p.id, src)


def test_the_checked_providers_cite_pages() -> None:
    cited = {p.id: [s for s in p.sources if s.startswith("https://")]
             for p in providers.table()}
    assert any("developers.google.com" in s for s in cited["google"])
    assert any("ionos" in s for s in cited["ionos"])


def test_sources_must_be_a_list_of_strings_in_the_schema() -> None:
    text = '[[provider]]\nid = "x"\ntitle = "X"\nsources = ["unverified: no page"]\nsorce = 1\n'
    with pytest.raises(ConfigError, match="unknown keys"):
        providers.load(text)
    ok = providers.load(text.replace("sorce = 1\n", ""))
    assert ok[0].sources == ("unverified: no page",)


def test_documented_oauth_facts() -> None:
    yahoo = oauth_providers.PROVIDERS["yahoo"]
    # developer.yahoo.com/oauth2/guide/yahoo_scopes: <api>-w is read/write.
    assert yahoo.scopes["smtp"] == ("mail-w",)
    # Yahoo's token guides authenticate the client with HTTP Basic.
    assert yahoo.token_auth == "client_secret_basic"
    assert yahoo.token_url == "https://api.login.yahoo.com/oauth2/get_token"
    assert yahoo.device_url is None  # Yahoo documents no device flow
    google = oauth_providers.PROVIDERS["google"]
    # limited-input-device#allowedscopes has no Gmail scope: both of Postroom's are refused.
    assert set(google.scopes["smtp"]) | set(google.scopes["gmail"]) <= set(google.device_refuses)
