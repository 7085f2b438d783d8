"""The public API is what __all__ says, nothing more; changing it is a deliberate act."""

from __future__ import annotations

import postroom


def test_all_is_pinned() -> None:
    assert sorted(postroom.__all__) == [
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
    for name in postroom.__all__:
        assert hasattr(postroom, name)


def test_every_error_has_code_and_permanence() -> None:
    from postroom import exceptions

    for obj in vars(exceptions).values():
        if isinstance(obj, type) and issubclass(obj, exceptions.PostroomError):
            err = obj("x")
            assert isinstance(err.code, str) and err.code
            assert isinstance(err.permanent, bool)
