"""Summary reports (issue 15): daily and weekly figures per connection and per app with the
trend against the previous period, the top failure causes with their advice, OAuth grant
health, suppressed addresses and the deliverability doctor's findings.

``config`` (the ``[reports]`` section), ``build`` (the Report from the store), ``render``
(HTML with a text part, and the email), ``schedule`` (the serve chore that sends them)."""
