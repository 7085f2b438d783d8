"""The web admin's shared pieces, without a server: the state tokens' labels in each shipped
language (web/labels.py) and the one mapping from an ops refusal to an answer
(web/ops_errors.py) that the pages and the JSON API share."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postroom.exceptions import (
    ConfigError,
    MessageError,
    PermissionDenied,
    PostroomError,
    StoreError,
)
from postroom.ingress.http_errors import HttpError
from postroom.store.states import STATUSES
from postroom.web import i18n, labels, ops_errors
from postroom.web.labels import Vocabulary

FR = i18n.translations(i18n.Language("fr")).gettext
EN = i18n.translations(i18n.Language("en")).gettext


def test_every_label_has_a_french_word() -> None:
    for kind, table in labels.LABELS.items():
        for token, label in table.items():
            assert FR(label.text) != label.text or label.text in ("ok", "info"), (kind, token)
            assert labels.label(EN, kind, token) == label.text


def test_every_message_status_is_labelled_and_toned() -> None:
    assert set(STATUSES) <= set(labels.LABELS[Vocabulary.STATUS])
    assert labels.label(FR, Vocabulary.STATUS, "failed") == "échoué"
    assert labels.tone(Vocabulary.STATUS, "failed") == "fail"
    assert labels.label(FR, Vocabulary.HEALTH, "degraded") == "dégradée"
    assert labels.label(FR, Vocabulary.OAUTH, "none") == "non connectée"
    # a token the table does not know (a newer state) is shown as it is, without a tone
    assert labels.label(FR, Vocabulary.STATUS, "frozen") == "frozen"
    assert labels.tone(Vocabulary.STATUS, "frozen") == ""


@pytest.mark.parametrize(("seconds", "en", "fr"), [
    (3 * 86400 + 4 * 3600 + 59, "3 d 4 h", "3 j 4 h"),
    (5 * 3600 + 2 * 60, "5 h 2 min", "5 h 2 min"),
    (61, "1 min", "1 min"),
    (42, "42 s", "42 s"),
    (None, "", ""),
])
def test_duration_in_the_page_language(seconds: float | None, en: str, fr: str) -> None:
    assert labels.duration(EN, seconds) == en
    assert labels.duration(FR, seconds) == fr


@pytest.mark.parametrize(("err", "status"), [
    (PermissionDenied("no"), 403),
    (ConfigError("x", code="config.connection.unknown"), 404),
    (MessageError("x", code="message.unknown"), 404),
    (ConfigError("x", code="config.locked"), 409),
    (ConfigError("x", code="config.dupe"), 409),
    (ConfigError("x", code="config.connection.in_use"), 409),
    (MessageError("x", code="app.exists"), 409),
    (StoreError("busy"), 503),
    (MessageError("x", code="bulk.empty"), 400),
])
def test_one_status_for_pages_and_api(err: PostroomError, status: int) -> None:
    assert ops_errors.status(err) == status

    def refuse() -> None:
        raise err

    refused = asyncio.run(ops_errors.attempt(refuse))
    assert refused == ops_errors.Refused(status, err.message)
    with pytest.raises(HttpError) as answer:
        asyncio.run(ops_errors.call(refuse))
    assert answer.value.status == status and answer.value.fix


def test_a_result_passes_through() -> None:
    assert asyncio.run(ops_errors.attempt(lambda a, b=0: a + b, 2, b=3)) == 5
    assert asyncio.run(ops_errors.call(lambda: "done")) == "done"


def test_every_web_admin_file_is_package_data() -> None:
    """A wheel carries only what pyproject's package-data globs name: a template in a new
    folder that no glob covers works from a checkout and is missing once installed."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["postroom"]
    pkg = root / "src" / "postroom"
    web = pkg / "web"
    shipped = {p for g in globs for p in pkg.glob(g)}  # setuptools' globs: * stays in a folder
    missing = [str(p.relative_to(pkg)) for p in web.rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc")
               and "__pycache__" not in p.parts and p not in shipped]
    assert missing == [], f"add a package-data glob for: {missing}"
