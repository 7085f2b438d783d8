"""The settings every HTTPS API connection has (:class:`HttpSettings`) and those of a provider
that takes an API key (:class:`ApiKeySettings`); a provider's own settings subclass one."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from postroom.settings import ConnectionBase


class HttpSettings(ConnectionBase):
    """Keys every HTTP API connection has."""

    api_base: str = ""  # default: the provider's; a test server or a proxy otherwise
    timeout: float = Field(default=60, gt=0)  # seconds for a request's answer
    connect_timeout: float = Field(default=15, gt=0)  # seconds to connect to the API
    ca_file: str | None = None  # a private CA for api_base (a company proxy, a test server)
    # Connections each worker process keeps open to the API, all reused: HTTP/1.1 carries one
    # request at a time on each, so this bounds the requests in flight (the worker's other
    # deliveries wait for one), as pool_size bounds an SMTP connection's sessions.
    pool_size: int = Field(default=10, ge=1, le=100)

    @model_validator(mode="after")
    def _http_consistent(self) -> HttpSettings:
        if self.api_base and not self.api_base.startswith(("https://", "http://")):
            raise ValueError(f"api_base {self.api_base!r} must be a URL (https://host/path)")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist or is not a file")
        return self


class ApiKeySettings(HttpSettings):
    """Keys of a provider that takes an API key: the key from ``api_key_env`` (a variable),
    ``api_key_file`` (a file), or stored encrypted (``postroom connection set-password
    NAME``); ``api_key`` in the file itself works but is discouraged. The signing key of
    the provider's delivery events (webhooks) likewise: ``webhook_key_env`` /
    ``webhook_key_file`` / stored (secret ``connection:NAME:webhook_key``)."""

    api_key: str | None = None  # discouraged: prefer api_key_env / api_key_file / the CLI
    api_key_env: str | None = None  # the API key from this environment variable
    api_key_file: Path | None = None  # or from this file
    webhook_key: str | None = None  # the events' signing key; discouraged, as api_key
    webhook_key_env: str | None = None  # the events' signing key from this variable
    webhook_key_file: Path | None = None  # or from this file

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeySettings:
        for key in ("api_key", "webhook_key"):
            given = [k for k in (key, f"{key}_env", f"{key}_file") if getattr(self, k)]
            if len(given) > 1:
                raise ValueError(f"give only one of {', '.join(given)}")
        return self
