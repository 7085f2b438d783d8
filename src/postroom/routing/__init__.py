"""Routing: rules that pick a chain of connections (``rules.py``), what a failure means
(``chain.py``), the walk along a chain as one decision function (``walk.py``), and each
connection's shared health: breaker, pause, Retry-After hold (``health.py``)."""
