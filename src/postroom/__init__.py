"""Postroom: the mail room for your applications.

Public API only; everything else is internal. ``__all__`` is pinned by a test.
"""

from __future__ import annotations

from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConfigError,
    ConnectError,
    DeliveryError,
    MessageError,
    PostroomError,
    StoreError,
    TLSError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConfigError",
    "ConnectError",
    "DeliveryError",
    "Envelope",
    "MessageError",
    "PostroomError",
    "StoreError",
    "TLSError",
    "__version__",
]
