"""Routing: rules that pick a chain of connections (``rules.py``) and the fallback
decision along a chain (``chain.py``)."""
