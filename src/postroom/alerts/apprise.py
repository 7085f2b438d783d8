"""Chat and push services through Apprise URLs (https://github.com/caronc/apprise/wiki):
Slack, Microsoft Teams, Discord, Telegram, Pushover, ntfy, Gotify, Matrix, Mattermost,
mailto and the rest, none written by hand. The library is imported when an alert goes to
one. Apprise answers only yes or no: a no is retried by the outbox, and the channel is
disabled after MAX_ATTEMPTS (postroom.alerts.config) tries of one alert; a URL Apprise does
not understand is permanent at once.
"""

from __future__ import annotations

from postroom.alerts import Alert, ChannelConfig, display
from postroom.exceptions import AlertError

# Apprise's notify types by severity: the services colour or prioritise by them.
TYPES = {"error": "failure", "warning": "warning", "info": "info"}


class AppriseChannel:
    def __init__(self, config: ChannelConfig) -> None:
        self.url = config.url

    async def send(self, alert: Alert) -> None:
        import apprise

        obj = apprise.Apprise()
        if not obj.add(self.url):
            raise AlertError(f"Apprise does not understand the URL {display(self.url)}; see "
                             "https://github.com/caronc/apprise/wiki for its form",
                             code="alert.apprise", permanent=True)
        kind = "success" if alert.change.value == "recovered" else TYPES.get(alert.severity,
                                                                             "info")
        ok = await obj.async_notify(body=alert.text, title=f"Postroom: {alert.title}",
                                    notify_type=kind)
        if not ok:
            raise AlertError(f"{display(self.url)} did not take the alert (Apprise's log "
                             "says why)", code="alert.apprise")
