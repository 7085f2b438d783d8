"""postroom-sendmail's pydantic-free configuration loader (ingress/sendmail_settings.py) holds
to the models: its table (a block of that module, generated from them by scripts/docs_gen.py,
which tests/test_docs.py holds current) has every field of each section it takes, with the
models' defaults, and names only checks the loader implements; the generator refuses what it
cannot describe; whatever the loader accepts, the full loader (postroom.config_load) accepts
too and reads the same; and what it cannot vouch for goes down the full path, which words the
error."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field, field_validator, model_validator

from postroom import settings as settings_mod
from postroom.exceptions import ConfigError
from postroom.ingress import sendmail_settings
from postroom.ingress.sendmail_settings import SECTIONS, LightSettings, load_light

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from docsgen import sendmail_spec as generator  # scripts/ is not a package

# Values tried for every key of every section: right and wrong types, in and out of bounds,
# and the forms the models' own validators check.
CANDIDATES: list[Any] = [
    0, 1, -1, 10, 59, 60, 1000, 1001, 1023, 1024, 100_000, 100_001, 0.0, 0.5, 60.0, -0.5,
    math.inf, math.nan, True, False, "", "x", "5", "true", "full", "normal", "fast", "text",
    "json", "debug", "127.0.0.1:2525", "[::1]:25", "host:99999", "nohost", "2GB", "512MiB",
    "lots", "smtp://127.0.0.1:2525", "smtps://h.example:465", "http://x", "example.com",
    "not a domain", "/etc/postroom", "relative/dir", [], ["127.0.0.1/32"], ["10.0.0.0/8",
    "::1"], ["not-a-net"], ["/abs/a", "/abs/b"], ["rel"], [1, 2], {"a": 1},
]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return "inf" if v > 0 else ("nan" if math.isnan(v) else "-inf")
    if isinstance(v, int | float | str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"


def full(path: Path, environ: dict[str, str] | None = None) -> settings_mod.Settings | None:
    try:
        return settings_mod.load(path, environ=environ or {}, connections=False)
    except ConfigError:
        return None


def same(light: LightSettings, loaded: settings_mod.Settings) -> None:
    """Every value the command reads, read alike (type included: Path, float...)."""
    for view, model in ((light.server, loaded.server), (light.sendmail, loaded.sendmail)):
        for key in type(view).__annotations__:
            mine, theirs = getattr(view, key), getattr(model, key)
            assert (mine, type(mine)) == (theirs, type(theirs)), key
    assert light.delivery.max_lifetime == loaded.delivery.max_lifetime
    assert type(light.delivery.max_lifetime) is type(loaded.delivery.max_lifetime)
    assert light.config_path == loaded.config_path and light.base_dir == loaded.base_dir
    assert light.data_dir == loaded.data_dir and light.database_url == loaded.database_url


def test_the_table_is_the_models() -> None:
    for name, specs in SECTIONS.items():
        model = settings_mod.SECTIONS[name]
        assert list(specs) == list(model.model_fields), name
        theirs = model.model_construct()
        for key, mine in sendmail_settings.defaults(name).items():
            if mine is sendmail_settings.HOSTNAME:
                continue  # this machine's name, from the same call
            value = getattr(theirs, key)
            assert (mine, type(mine)) == (value, type(value)), (name, key)
    # Every section of the models is here but [policy], whose validators need its module.
    assert set(settings_mod.SECTIONS) - set(SECTIONS) == {"policy"}


def test_every_check_the_table_names_is_implemented() -> None:
    kinds = {"int", "float", "bool", "str", "size", "path", "strs", "paths"}
    for name, specs in SECTIONS.items():
        for key, (kind, _, checks) in specs.items():
            assert kind in kinds, (name, key)
            assert {c for c, _ in checks} <= set(sendmail_settings.FIELD_CHECKS), (name, key)
        assert set(sendmail_settings.SECTION_CHECKS.get(name, ())) <= set(
            sendmail_settings.MODEL_CHECKS), name
        assert set(sendmail_settings.DEFAULT_FACTORIES.get(name, {}).values()) <= set(
            sendmail_settings.FACTORIES), name


class Plain(settings_mod.SectionModel):
    count: int = Field(default=1, ge=1)


class MultipleOf(settings_mod.SectionModel):
    count: int = Field(default=5, multiple_of=5)


class Strict(settings_mod.SectionModel):
    count: int = Field(default=5, strict=True)


class NoInfinity(settings_mod.SectionModel):
    delay: float = Field(default=1.0, allow_inf_nan=False)


class Pattern(settings_mod.SectionModel):
    name: str = Field(default="a", pattern="^a")


class Table(settings_mod.SectionModel):
    headers: dict[str, str] = Field(default={})


class Numbers(settings_mod.SectionModel):
    level: Literal[1, 2] = 1


class Aliased(settings_mod.SectionModel):
    from_: str = Field(default="", alias="from")


class Computed(settings_mod.SectionModel):
    where: str = Field(default_factory=os.getcwd)


class Validated(settings_mod.SectionModel):
    name: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v.strip()


class CrossChecked(settings_mod.SectionModel):
    low: int = 1
    high: int = 2

    @model_validator(mode="after")
    def _order(self) -> CrossChecked:
        return self


class Stripped(settings_mod.SectionModel):
    model_config = settings_mod.SectionModel.model_config | {"str_strip_whitespace": True}
    name: str = ""


def test_the_generator_describes_only_what_it_knows() -> None:
    keys, checks, computed = generator.section("plain", Plain)
    assert (keys, checks, computed) == ({"count": ("int", 1, (("ge", 1),))}, [], {})
    for model in (MultipleOf, Strict, NoInfinity, Pattern, Table, Numbers, Aliased, Computed,
                  Validated, CrossChecked, Stripped):
        with pytest.raises(generator.Undescribed):
            generator.section("x", model)


def test_the_generator_rewrites_only_its_block() -> None:
    path = Path(sendmail_settings.__file__)
    text = path.read_text("utf-8")
    assert generator.render(text) == text  # current (tests/test_docs.py checks it too)
    edited = text.replace('"max_recipients": ("int", 1000,', '"max_recipients": ("int", 7,')
    assert edited != text and generator.render(edited) == text
    hand = text.replace("class _Refused(Exception):", "class _Refused(ValueError):")
    assert generator.render(hand) == hand
    with pytest.raises(generator.Undescribed, match="generated block"):
        generator.render(text.replace(generator.END, "# the end"))


def test_a_changed_validator_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = "postroom.settings.ServerSettings._listen"
    mode, check, _ = generator.FIELD_VALIDATORS[ref]
    monkeypatch.setitem(generator.FIELD_VALIDATORS, ref, (mode, check, "0" * 12))
    with pytest.raises(generator.Undescribed, match="_listen changed"):
        generator.section("server", settings_mod.ServerSettings)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_what_it_accepts_the_models_accept_alike(tmp_path: Path, section: str) -> None:
    cfg = tmp_path / "postroom.toml"
    taken = 0
    for key in SECTIONS[section]:
        for value in CANDIDATES:
            cfg.write_text(f"[{section}]\n{key} = {toml_value(value)}\n", encoding="utf-8")
            light = load_light(cfg, {})
            if light is None:
                continue
            taken += 1
            loaded = full(cfg)
            assert loaded is not None, (section, key, value)
            same(light, loaded)
    assert taken >= len(SECTIONS[section]), taken  # the light path does take configurations


@pytest.mark.parametrize("text", [
    '[server]\ntls_cert = "/c.pem"\n',  # one of a pair
    '[http]\ntls_key = "/k.pem"\n',
    '[delivery]\nmin_backoff = 500\nmax_backoff = 400\n',
    '[sendmail]\nusername = "app"\n',  # no password
    '[sendmail]\npassword_env = "X"\n',  # no username
    '[sendmail]\nalternate_config_directories = ["relative"]\n',
    '[server]\nunknown = 1\n',
    'unknown = 1\n',
    '[nonsense]\n',
    '[policy]\nfrom = "A <a@example.org>"\n',  # valid, but the models' to check
    'server = 5\n',
    '[server\n',  # not TOML
])
def test_what_it_cannot_vouch_for_goes_the_full_way(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(text, encoding="utf-8")
    assert load_light(cfg, {}) is None


def test_a_whole_configuration_and_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(
        '[server]\ndata_dir = "d"\nhostname = "h.example"\nsmtp_listen = "0.0.0.0:25"\n'
        'trusted_networks = ["10.0.0.0/8"]\nsqlite_synchronous = "normal"\n'
        '[delivery]\nmax_lifetime = 3600\nconcurrency = 5\n'
        '[sendmail]\nserver = "smtps://mx.example:465"\nusername = "app"\n'
        'password_file = "secret"\ndomain = "example.org"\ndead_letter = "d/dead.letter"\n'
        'alternate_config_directories = ["/etc/postroom/a"]\nsyslog = ""\ntimeout = 5\n'
        '[retention]\nmax_size = "2GB"\n[log]\nformat = "json"\n[oauth]\ncheck_interval = 60\n'
        '[http]\ntls = true\n'
        '[[connections]]\nname = "x"\ntransport = "smtp"\nport = "not checked here"\n'
        '[[routes]]\nchain = ["nowhere"]\n', encoding="utf-8")
    environ = {"POSTROOM_SERVER__HOSTNAME": "env.example", "POSTROOM_DELIVERY__MAX_LIFETIME": "60",
               "POSTROOM_CONFIG_UNRELATED": "x", "POSTROOM_SECRET_KEY": "k"}
    light = load_light(cfg, environ)
    loaded = full(cfg, environ)
    assert light is not None and loaded is not None
    same(light, loaded)
    assert light.server.hostname == "env.example" and light.delivery.max_lifetime == 60.0
    # A section the light loader does not know, named by the environment: the full way.
    assert load_light(cfg, {"POSTROOM_ADMIN__LISTEN": "x"}) is None
    assert load_light(cfg, {"POSTROOM_SERVER__MAX_MESSAGE_SIZE": "10"}) is None  # too small


def test_no_file_and_defaults(tmp_path: Path) -> None:
    assert load_light(tmp_path / "missing.toml", {}) is None
    cfg = tmp_path / "postroom.toml"
    cfg.write_text("", encoding="utf-8")
    light = load_light(cfg, {})
    loaded = full(cfg)
    assert light is not None and loaded is not None
    same(light, loaded)
    os.chmod(cfg, 0)
    if os.geteuid() != 0:  # root reads it anyway
        assert load_light(cfg, {}) is None
