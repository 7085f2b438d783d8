"""The instance's VAPID key pair (RFC 8292): what identifies this Postroom to the browsers'
push services.

One P-256 key pair per instance, made on first need (the account page that offers Web Push,
or the first push sent) and kept in the secret store (``webpush:vapid``, Fernet with the
instance key, like every stored secret). The public key is the ``applicationServerKey`` a
browser subscribes with: the push service then takes messages for that subscription only
when they carry a JWT signed by the private key, so a leaked endpoint URL is not enough to
push to the browser. Replacing the key (a new instance key, the row deleted) makes every
subscription useless: the browsers must subscribe again.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from postroom.exceptions import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

    from postroom.secrets import SecretStore

NAME = "webpush:vapid"  # the secret store's row of the private key (PKCS#8 PEM)
# RFC 8292 2: "exp" no more than 24 hours ahead; less, so a clock a little fast still passes.
LIFETIME = 12 * 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def private_key(store: SecretStore) -> EllipticCurvePrivateKey:
    """The instance's VAPID private key, made and stored on the first call. Two processes
    making it at once keep one: the row is inserted only when absent, in one transaction."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from sqlalchemy import insert, select
    from sqlalchemy.exc import IntegrityError

    from postroom.store.db import write_transaction
    from postroom.store.schema import secrets as table

    pem = store.get(NAME)
    if pem is None:
        key = ec.generate_private_key(ec.SECP256R1())
        new = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
        try:
            with write_transaction(store.engine) as conn:
                if conn.execute(select(table.c.name).where(table.c.name == NAME)).first() is None:
                    conn.execute(insert(table).values(name=NAME,
                                                      ciphertext=store.vault.encrypt(new),
                                                      updated_at=time.time()))
        except IntegrityError:
            pass  # another process stored its key first (PostgreSQL): that one is kept
        pem = store.get(NAME)
        if pem is None:  # pragma: no cover - the row was just written or found
            raise ConfigError("the VAPID key could not be stored", code="webpush.vapid")
    loaded = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the secret {NAME} is not a P-256 key; delete it and let "
                          "Postroom make a new one (browsers then subscribe again)",
                          code="webpush.vapid")
    return loaded


def public_key(key: EllipticCurvePrivateKey) -> str:
    """The public key as browsers take it (applicationServerKey): the uncompressed point,
    base64url without padding."""
    from cryptography.hazmat.primitives import serialization

    return b64url(key.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint))


def audience(endpoint: str) -> str:
    """The JWT's "aud": the push service's origin (RFC 8292 2)."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def authorization(key: EllipticCurvePrivateKey, endpoint: str, subject: str,
                  now: float) -> str:
    """The ``Authorization: vapid t=<JWT>, k=<public key>`` header for one push request,
    signed by py_vapid (pywebpush's own VAPID library)."""
    from py_vapid import Vapid02, VapidException

    claims = {"aud": audience(endpoint), "exp": int(now) + LIFETIME, "sub": subject}
    try:
        header: str = Vapid02(key).sign(claims)["Authorization"]
    except VapidException as err:
        raise ConfigError(f"cannot sign the VAPID claims ({err}); set [[alerts]] "
                          "webpush_subject to mailto:you@example.com", code="webpush.vapid",
                          ) from err
    return header
