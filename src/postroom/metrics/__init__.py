"""``/metrics``: Postroom's figures in the Prometheus text exposition format.

Served on ``server.http_listen`` to an admin API token (``Authorization: Bearer prt_...``,
the viewer role suffices), or without a token on an address of its own::

    [metrics]
    listen = "127.0.0.1:9464"

Either way the client must be in ``server.admin_networks``, the fence of everything that
administers Postroom. The figures come from the database every process writes (the queue,
the attempts, the events, the breaker and the OAuth grants), so one scrape of any `postroom
serve` is right for every worker process and node sharing it.

This module holds the ``[metrics]`` section only (registered through the
``postroom.sections`` entry point) and stays light: the collector (postroom.metrics.collect)
and prometheus_client are imported on the first scrape, never by an idle server.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from postroom.settings import SectionModel, parse_listen, register_section

PATH = "/metrics"


class MetricsSettings(SectionModel):
    """[metrics]: where /metrics is served besides server.http_listen, and how fresh."""

    # "HOST:PORT": /metrics served there without a token (server.admin_networks still
    # applies); "" (the default): only on server.http_listen, with an admin API token.
    listen: str = ""
    # A scrape within this many seconds of the last gets the same figures: each is a few
    # queries on the store, and several Prometheus servers may scrape every node.
    cache_seconds: float = Field(default=5.0, ge=0, le=300)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v:
            parse_listen(v)
        return v

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


register_section("metrics", MetricsSettings)
