"""Secret references (``KEY_env``, ``KEY_file``, stored encrypted): the one reader,
postroom.secrets.resolve, and every secret read through it with one wording and one
whitespace rule (only a trailing CR/LF is taken off): SMTP passwords and OAuth tokens,
OAuth client secrets, API keys. `postroom connection set-password` stores an API-key
connection's key as its api key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from postroom.exceptions import AuthError
from postroom.oauth.config import OAuthSettings
from postroom.secrets import Secret, resolve, secret_name
from postroom.transports import password_secret, smtp
from postroom.transports.base import TransportContext
from postroom.transports.postmark import PostmarkSettings, PostmarkTransport

VAR = "POSTROOM_TEST_SECRET_REF"


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(VAR, raising=False)
    return VAR


def missing(fn: object, *args: object) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args)  # type: ignore[operator]
    err = info.value
    assert err.code == "auth.secret_missing" and not err.permanent
    return err


def test_env_then_file_then_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "key"
    f.write_text("from-file\n")
    monkeypatch.setenv(VAR, "from-env\r\n")
    assert resolve("c", "api_key", env=VAR, file=None, stored="s") == "from-env"
    assert resolve("c", "api_key", env=None, file=f, stored="s") == "from-file"
    assert resolve("c", "api_key", env=None, file=None, stored="s") == "s"
    assert resolve("c", "api_key", env=None, file=None, stored=None) is None


def test_only_a_trailing_newline_is_taken_off(tmp_path: Path) -> None:
    f = tmp_path / "password"
    f.write_bytes(b"  pass word \t\r\n")
    assert resolve("c", "password", env=None, file=f, stored=None) == "  pass word \t"
    f.write_bytes(b"two\nlines\n\n")
    assert resolve("c", "password", env=None, file=f, stored=None) == "two\nlines"


def ref(env: str | None = None, file: Path | None = None) -> str | None:
    return resolve("connection pm", "api_key", env=env, file=file, stored=None)


def test_one_wording_for_what_is_missing(tmp_path: Path, unset: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    err = missing(ref, unset)
    assert err.message.startswith(f"connection pm: environment variable {unset} is not set")
    assert "Environment=" in err.message  # how to set it for a service
    monkeypatch.setenv(unset, "\n")  # set but empty: the same
    assert missing(ref, unset).message == err.message
    gone = tmp_path / "nope"
    err = missing(ref, None, gone)
    assert f"connection pm: cannot read api_key_file {gone}: No such file" in err.message
    empty = tmp_path / "empty"
    empty.write_text("\r\n")
    err = missing(ref, None, empty)
    assert f"api_key_file {empty} is empty" in err.message


def _smtp(**keys: object) -> smtp.Transport:
    return smtp.Transport(smtp.Settings(name="mx", host="smtp.example.com", username="u",
                                        **keys),  # type: ignore[arg-type]
                          TransportContext("t", stored_secret=lambda n: f"stored:{n}"))


def test_every_secret_is_read_the_same_way(tmp_path: Path, unset: str) -> None:
    want = f"environment variable {unset} is not set"
    assert want in missing(_smtp(password_env=unset)._password).message
    assert want in missing(_smtp(auth="xoauth2", oauth_token_env=unset)._token).message
    oauth = OAuthSettings(provider="google", client_id="id", client_secret_env=unset)
    assert want in missing(oauth.secret, "connection g").message
    pm = PostmarkTransport(PostmarkSettings(name="pm", api_key_env=unset), TransportContext("t"))
    assert want in missing(pm.api_key).message
    asyncio.run(pm.aclose())
    f = tmp_path / "secret"
    f.write_text(" s p \n")
    assert _smtp(password_file=f)._password() == " s p "
    assert OAuthSettings(provider="google", client_id="id",
                         client_secret_file=f).secret("connection g") == " s p "


def test_the_database_is_asked_only_when_nothing_else_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def stored(name: str) -> str | None:
        asked.append(name)
        return "from-db"

    monkeypatch.setenv(VAR, "from-env")
    ctx = TransportContext("t", stored_secret=stored)
    with_env = PostmarkTransport(PostmarkSettings(name="pm", api_key_env=VAR), ctx)
    assert with_env.api_key() == "from-env" and asked == []
    stored_only = PostmarkTransport(PostmarkSettings(name="pm"), ctx)
    assert stored_only.api_key() == "from-db"
    assert asked == [secret_name("pm", Secret.API_KEY)] == ["connection:pm:api_key"]
    nothing = PostmarkTransport(PostmarkSettings(name="pm"), TransportContext("t"))
    err = missing(nothing.api_key)
    assert "postroom connection set-password pm" in err.message
    for t in (with_env, stored_only, nothing):
        asyncio.run(t.aclose())


def test_only_one_source_per_secret() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="give only one of api_key, api_key_env"):
        PostmarkSettings(name="pm", api_key="k", api_key_env="X")
    with pytest.raises(ValidationError, match="webhook_key_env, webhook_key_file"):
        PostmarkSettings(name="pm", webhook_key_env="X", webhook_key_file=Path("/x"))


def test_set_password_stores_an_api_key(tmp_path: Path) -> None:
    assert password_secret(PostmarkSettings(name="pm")) == ("api key", Secret.API_KEY)
    assert password_secret(smtp.Settings(name="mx", host="h")) == ("password", Secret.PASSWORD)
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n\n[[connections]]\nname = "pm"\n'
                   'transport = "postmark"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    res = subprocess.run([sys.executable, "-m", "postroom.cli", "connection", "set-password",
                          "pm", "--stdin", "--config", str(cfg)], input="pm-key-1\n",
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "api key for pm stored encrypted" in res.stdout
    assert "pm-key-1" not in res.stdout + res.stderr
    from postroom import settings as settings_mod
    from postroom.runtime import Instance  # the instance the CLI opened, opened again

    inst = Instance(settings_mod.load(cfg))
    try:
        assert inst.secrets.get("connection:pm:api_key") == "pm-key-1"
        assert inst.secrets.get("connection:pm:password") is None
    finally:
        inst.close()
