"""Postroom: the mail room for your applications.

Public API only; everything else is internal. ``__all__`` is pinned by a test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from postroom.exceptions import (
    AuthError,
    ConfigError,
    ConnectError,
    CredentialsError,
    DeliveryError,
    MessageError,
    PostroomError,
    StoreError,
    TLSError,
)

if TYPE_CHECKING:
    from postroom.envelope import Envelope
    from postroom.mailer import Mailer
    from postroom.message import Attachment

__version__ = "0.1.0"

# Imported on first use: `import postroom` stays light for the commands that only need the
# exceptions (postroom-sendmail starts once per message, `postroom --help` needs none).
_LAZY = {"Mailer": "postroom.mailer", "Attachment": "postroom.message",
         "Envelope": "postroom.envelope"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'postroom' has no attribute {name!r}")

__all__ = [
    "Attachment",
    "AuthError",
    "ConfigError",
    "ConnectError",
    "CredentialsError",
    "DeliveryError",
    "Envelope",
    "Mailer",
    "MessageError",
    "PostroomError",
    "StoreError",
    "TLSError",
    "__version__",
]
