"""``[reports]``: scheduled summary reports, a feature section of postroom.toml (registered
through the ``postroom.sections`` entry point, so configurations without it never import
this package)::

    [reports]
    to = ["ops@example.com"]
    weekly = true              # Mondays (weekday = "monday") ...
    daily = false
    at = "08:00"               # ... at this local time
    timezone = "Europe/Paris"  # an IANA zone name (zoneinfo)

The report email goes through the queue like any message: from ``sender`` (default
postroom@ the server's hostname), pinned to ``connection`` when one is named, else routed.
"""

from __future__ import annotations

import re
import zoneinfo

from pydantic import Field, field_validator

from postroom.settings import SectionModel, register_section

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_AT = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class ReportsSettings(SectionModel):
    """The ``[reports]`` table."""

    to: list[str] = Field(default_factory=list, max_length=50)  # empty: no email is sent
    daily: bool = False  # send yesterday's report every day
    weekly: bool = True  # send the last week's report on weekday
    weekday: str = "monday"  # the weekly report's day
    at: str = "08:00"  # local time (HH:MM, 24 h) the reports are sent at
    timezone: str = "UTC"  # an IANA zone name ("Europe/Paris") for at and the days' bounds
    sender: str | None = None  # the From address; default postroom@<server.hostname>
    connection: str | None = None  # send through this connection; default: the routes
    # Seconds a report waits for the deliverability doctor's DNS answers before it says
    # they are missing (tests and offline hosts have no DNS: the report must not hang).
    dns_wait: float = Field(default=15.0, ge=0, le=120)
    dns_server: str | None = None  # IP[:PORT]; default: the system's resolver

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        from postroom.envelope import validate_address
        from postroom.exceptions import PostroomError

        for address in v:
            try:
                validate_address(address)
            except PostroomError as err:
                raise ValueError(f"to: {err.message}") from None
        return v

    @field_validator("weekday")
    @classmethod
    def _weekday(cls, v: str) -> str:
        day = v.strip().lower()
        if day not in WEEKDAYS:
            raise ValueError(f"weekday = {v!r}: use one of {', '.join(WEEKDAYS)}")
        return day

    @field_validator("at")
    @classmethod
    def _at(cls, v: str) -> str:
        if not _AT.match(v.strip()):
            raise ValueError(f"at = {v!r}: give a local time as HH:MM, 24-hour (\"08:00\")")
        return v.strip()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone = {v!r} is not a time zone name: use an IANA name "
                             "such as \"UTC\" or \"Europe/Paris\"") from None
        return v

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def periods(self) -> list[str]:
        """The scheduled kinds, "day" and/or "week"."""
        return [k for k, on in (("day", self.daily), ("week", self.weekly)) if on]


register_section("reports", ReportsSettings)
