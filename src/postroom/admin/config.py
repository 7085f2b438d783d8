"""The ``[admin]`` section of postroom.toml: the web admin's switches and its login rules.

Registered with postroom.settings as a feature section (the ``postroom.sections`` entry
point in pyproject.toml), so settings.py does not import this module: commands that never
serve the web admin do not pay for it. Read it with ``settings.section(AdminSettings)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from postroom.audit import Role
from postroom.settings import SectionModel, check_networks, register_section

SOURCE_LANGUAGE = "en"  # the templates' own language: always there, needs no catalog


def shipped_languages() -> list[str]:
    """The languages the web admin ships a catalog for (postroom/web/locale/<lang>), found
    on disk without importing the web package."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("postroom.web")
    found = {SOURCE_LANGUAGE}
    for folder in (spec.submodule_search_locations or []) if spec else []:
        locale = Path(folder) / "locale"
        if locale.is_dir():
            found |= {p.name for p in locale.iterdir() if (p / "LC_MESSAGES").is_dir()}
    return sorted(found)


class AdminSettings(SectionModel):
    """[admin]: the web admin served under /admin on server.http_listen."""

    enabled: bool = True  # false: no web admin (its pages and JSON API answer 404)
    # The lowest role that may see message bodies and attachments (they can hold
    # password-reset links); every view is audited.
    bodies: Role = Role.ADMIN
    session_idle: int = Field(default=1800, ge=60, le=7 * 86400)  # seconds without a request
    session_max: int = Field(default=43200, ge=300, le=30 * 86400)  # seconds after login
    # auto: Secure cookies when served over TLS or when the proxy says https.
    secure_cookies: Literal["auto", "always", "never"] = "auto"
    login_failures: int = Field(default=5, ge=1, le=1000)  # per account, then locked...
    lockout: int = Field(default=900, ge=1, le=7 * 86400)  # ...for this many seconds
    # Single sign-on behind a reverse proxy: the header naming the signed-in user, trusted
    # only from these proxy addresses (any other client sending it is ignored).
    sso_header: str = ""
    sso_proxies: list[str] = Field(default_factory=list)
    sso_role: Literal["", "viewer", "admin"] = ""  # "": the account must exist
    language: str = ""  # "": the browser's (Accept-Language); else a shipped one
    # Under `postroom serve` the web admin runs in a process of its own
    # (postroom.ingress.admin_proxy), started by the first admin request and stopped after
    # this many seconds without one: its libraries and templates are not kept by the server.
    process_idle: int = Field(default=300, ge=1, le=7 * 86400)

    @field_validator("bodies", mode="before")
    @classmethod
    def _role(cls, v: object) -> object:
        if isinstance(v, str) and v not in {r.value for r in Role}:
            raise ValueError(f"expected one of {', '.join(r.value for r in Role)}")
        return v

    @field_validator("sso_header")
    @classmethod
    def _header(cls, v: str) -> str:
        # An HTTP field name (RFC 9110 5.1: a token); what goes wrong here is a space or colon.
        if v and not all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in v):
            raise ValueError("not a header name; write it like X-Forwarded-User")
        return v

    @field_validator("sso_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return check_networks(v)

    @field_validator("language")
    @classmethod
    def _language(cls, v: str) -> str:
        shipped = shipped_languages()
        if v and v not in shipped:
            raise ValueError(f"not a shipped language; use one of {', '.join(shipped)}, or "
                             "\"\" for the browser's")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AdminSettings:
        if self.session_idle > self.session_max:
            raise ValueError("session_idle is longer than session_max; make it shorter")
        if self.sso_header and not self.sso_proxies:
            raise ValueError("sso_header is set: also set sso_proxies to the reverse proxy's "
                             "address(es); the header is trusted from those only")
        if self.sso_role and not self.sso_header:
            raise ValueError("sso_role is set but sso_header is not; set both or neither")
        return self


register_section("admin", AdminSettings)
