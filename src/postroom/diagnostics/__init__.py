"""Diagnosis: why mail does not go out, said so that a non-expert can act on it.

- ``probe``: which SMTP ports of a host answer and how (TCP, banner, EHLO, TLS, certificate,
  AUTH), plus HTTPS reachability of the API providers; one verdict per port and a
  recommendation. Used by ``postroom probe`` and by anything that must choose a port.
- ``advice``: a data-driven catalog (``advice.toml``) mapping an error (our ``.code``, the
  SMTP reply and enhanced status code, the reply text, the provider's host) to a cause and a
  fix. Used by ``postroom show``/``test`` and the API's attempt records.
"""
