"""Encryption under a passphrase, for what leaves the instance: `postroom config export`'s
secrets (postroom.config_transfer) and `postroom backup` archives (postroom.backup).

One key derivation for both: scrypt (RFC 7914) at OWASP's recommended cost, with a random
salt per file, giving an AES-256-GCM key. A small document is sealed in one piece
(config_transfer keeps its JSON envelope); a large one — a database of any size — is
sealed as a stream of chunks (:class:`SealedWriter`, :class:`SealedReader`), so neither side
ever holds the whole file in memory.

The stream is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): chunk
``i`` is sealed with the nonce ``prefix || i || last``, so chunks cannot be reordered,
dropped, or the file cut short at a chunk boundary without the reader noticing, and the
header line (cost, salt, chunk size) is authenticated with every chunk.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Mapping
from typing import IO, Any

from postroom.exceptions import ConfigError

MIN_PASSPHRASE = 12
# scrypt cost (RFC 7914; OWASP's recommendation for scrypt): 128 MiB of memory per try.
SCRYPT = {"n": 2**17, "r": 8, "p": 1}
# The most a file may ask for: the reader pays the cost the file names.
MAX_SCRYPT = {"n": 2**18, "r": 16, "p": 4}
CHUNK = 1 << 20  # plaintext bytes per sealed chunk of a stream
_TAG = 16  # AES-GCM's tag, after each chunk
_PREFIX = 7  # random nonce bytes; then 4 of chunk counter and 1 of "last chunk" flag
_MAX_HEADER = 4096


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise ConfigError(f"the passphrase is {len(passphrase)} characters; use at least "
                          f"{MIN_PASSPHRASE} (a few random words)", code="config.passphrase")


def cost_allowed(cost: Mapping[str, int]) -> bool:
    """Whether a file's scrypt cost is one this reader accepts (see :data:`MAX_SCRYPT`)."""
    return all(1 <= cost[k] <= MAX_SCRYPT[k] for k in MAX_SCRYPT)


def derive_key(passphrase: str, salt: bytes, *, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _Stream:
    """What tarfile's stream modes may call on a file object: these go one way, in order."""

    def read(self, size: int = -1, /) -> bytes:
        raise io.UnsupportedOperation("a sealed stream is either read or written")

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("a sealed stream is either read or written")

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("a sealed stream is read and written in order")

    def tell(self) -> int:
        raise io.UnsupportedOperation("a sealed stream is read and written in order")

    def close(self) -> None:
        return None


class SealedWriter(_Stream):
    """A write-only file object that seals what is written to ``out`` under ``passphrase``.
    ``kind`` names the content (``"postroom-backup"``); :class:`SealedReader` checks it.
    :meth:`close` writes the last chunk: a stream not closed is unreadable, as it should
    be (it was cut short)."""

    def __init__(self, out: IO[bytes], passphrase: str, kind: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        check_passphrase(passphrase)
        salt, self._prefix = os.urandom(16), os.urandom(_PREFIX)
        b64 = base64.b64encode
        header = {"format": kind, "cipher": "AES-256-GCM-STREAM", "chunk": CHUNK,
                  "kdf": {"name": "scrypt", **SCRYPT, "salt": b64(salt).decode()},
                  "nonce": b64(self._prefix).decode()}
        self._header = json.dumps(header, sort_keys=True).encode() + b"\n"
        self._aead = AESGCM(derive_key(passphrase, salt, **SCRYPT))
        self._out = out
        self._buf = bytearray()
        self._counter = 0
        self.closed = False
        out.write(self._header)

    def write(self, data: bytes, /) -> int:
        self._buf += data
        # Strictly more than a chunk: the last chunk (flagged) must always have its bytes.
        while len(self._buf) > CHUNK:
            self._emit(bytes(self._buf[:CHUNK]), last=False)
            del self._buf[:CHUNK]
        return len(data)

    def _emit(self, chunk: bytes, *, last: bool) -> None:
        nonce = _nonce(self._prefix, self._counter, last)
        self._out.write(self._aead.encrypt(nonce, chunk, self._header))
        self._counter += 1

    def close(self) -> None:
        if not self.closed:
            self._emit(bytes(self._buf), last=True)
            self._buf.clear()
            self.closed = True


class SealedReader(_Stream):
    """A read-only file object giving back what :class:`SealedWriter` sealed. Every chunk is
    authenticated before a byte of it is returned; a wrong passphrase fails on the first,
    before anything is read, as a :class:`ConfigError` ``<kind>.passphrase``; a damaged or
    truncated file as ``<kind>.damaged``."""

    def __init__(self, src: IO[bytes], passphrase: str, kind: str, *, what: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._src, self._kind, self._what = src, kind, what
        self._header = src.readline(_MAX_HEADER)
        head = self._parse_header()
        try:
            kdf = head["kdf"]
            cost = {k: int(kdf[k]) for k in ("n", "r", "p")}
            salt = base64.b64decode(kdf["salt"])
            self._prefix = base64.b64decode(head["nonce"])
            self._chunk = int(head["chunk"])
        except (KeyError, TypeError, ValueError) as err:
            raise self._damaged("its header is unreadable") from err
        if (kdf.get("name") != "scrypt" or head.get("cipher") != "AES-256-GCM-STREAM"
                or not cost_allowed(cost) or len(self._prefix) != _PREFIX
                or not 1 <= self._chunk <= 64 * CHUNK):
            raise self._damaged("its header names a cipher or cost this Postroom does not use")
        self._aead = AESGCM(derive_key(passphrase, salt, **cost))
        self._counter = 0
        self._next = src.read(self._chunk + _TAG)
        self._done = False
        self._plain, self._pos = self._pull(), 0  # a wrong passphrase is known here

    def _parse_header(self) -> dict[str, Any]:
        try:
            head = json.loads(self._header)
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("format") != self._kind:
            raise ConfigError(f"{self._what} is not a {self._kind} file (or it was made by "
                              "another program)", code=f"{self._kind}.format")
        return head

    def _damaged(self, why: str) -> ConfigError:
        return ConfigError(f"{self._what} is damaged or incomplete ({why}): nothing was "
                           "restored; use another copy", code=f"{self._kind}.damaged")

    def _pull(self) -> bytes:
        from cryptography.exceptions import InvalidTag

        sealed = self._next
        self._next = self._src.read(self._chunk + _TAG)
        last = not self._next
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, self._counter, last), sealed,
                                       self._header)
        except InvalidTag as err:
            if self._counter == 0 and not last:
                raise ConfigError(f"wrong passphrase for {self._what} (or the file was "
                                  "altered): nothing was restored",
                                  code=f"{self._kind}.passphrase") from err
            if self._counter == 0:
                # One chunk only: a wrong passphrase and a cut file look the same; the
                # passphrase is by far the likelier.
                raise ConfigError(f"wrong passphrase for {self._what}, or the file is "
                                  "damaged: nothing was restored",
                                  code=f"{self._kind}.passphrase") from err
            raise self._damaged(f"chunk {self._counter} does not authenticate") from err
        self._counter += 1
        self._done = last
        return plain

    def read(self, size: int = -1, /) -> bytes:
        # A read position, not slicing off what was read: tarfile reads in 10 KiB steps, and
        # copying the rest of a 1 MiB chunk at each step would be quadratic.
        while not self._done and (size < 0 or len(self._plain) - self._pos < size):
            self._plain, self._pos = self._plain[self._pos:] + self._pull(), 0
        end = len(self._plain) if size < 0 else min(self._pos + size, len(self._plain))
        out = self._plain[self._pos:end]
        self._pos = end
        return out
