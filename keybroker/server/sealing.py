"""Resources at rest: AES-256-GCM under a key-encryption key (KEK).

A resource value is stored sealed: a random 96-bit nonce, the ciphertext and the 128-bit
tag, with the resource path and its lease as associated data (a sealed value moved to another
path, or given another lease, does not open). Values sealed before the lease was bound (the
path alone) still open; ``rewrap`` (``rotate-kek``) seals them again with their lease. Each
row names the id of the KEK that sealed it, so that ``rotate-kek`` can re-wrap what is still
under an old KEK while servers that know both keep serving.

A KEK file holds exactly 32 random bytes (``head -c 32 /dev/urandom``) or them as 64
hexadecimal digits (``openssl rand -hex 32``). It comes from ``--kek-file`` or the systemd
credential ``kek``; it is never stored in the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, SealError
from . import secretfile

KEK_CREDENTIAL = "kek"
KEK_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
_HEX_KEK = re.compile(rb"[0-9a-fA-F]{64}\n?")


@dataclass(frozen=True)
class Kek:
    id: str
    key: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Kek:
        if _HEX_KEK.fullmatch(data):
            data = bytes.fromhex(data.strip().decode())
        elif len(data) != KEK_SIZE:
            raise ConfigError(f"key-encryption key {where} must be {KEK_SIZE} bytes or {2 * KEK_SIZE} hex digits, "
                              f"not {len(data)} bytes (make one with: (umask 077; head -c 32 /dev/urandom > FILE))")
        return cls(hashlib.sha256(b"keybroker kek id\0" + data).hexdigest()[:16], data)

    @classmethod
    def load(cls, path: Path) -> Kek:
        return cls.from_bytes(secretfile.read(path, "key-encryption key"), str(path))


@dataclass(frozen=True)
class Sealed:
    kek_id: str
    blob: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """The size of the sealed value."""
        return len(self.blob) - OVERHEAD


class Sealer:
    """Seals with the current KEK; opens with it or any previous one (during a rotation)."""

    def __init__(self, current: Kek, previous: Iterable[Kek] = ()) -> None:
        self.current = current
        self._keks = {kek.id: kek for kek in (*previous, current)}

    @property
    def keks(self) -> tuple[Kek, ...]:
        """Every KEK this sealer opens with, the current one among them."""
        return tuple(self._keks.values())

    def seal(self, path: str, value: bytes, lease: int | None) -> Sealed:
        nonce = os.urandom(NONCE_SIZE)
        return Sealed(self.current.id, nonce + AESGCM(self.current.key).encrypt(nonce, value, _aad(path, lease)))

    def open(self, path: str, sealed: Sealed, lease: int | None) -> bytes:
        return self._open(path, sealed, lease)[0]

    def rewrap(self, path: str, sealed: Sealed, lease: int | None) -> Sealed | None:
        """``sealed`` sealed again under the current KEK with its lease bound, or None when it already is."""
        value, bound = self._open(path, sealed, lease)
        if bound and sealed.kek_id == self.current.id:
            return None
        return self.seal(path, value, lease)

    def _open(self, path: str, sealed: Sealed, lease: int | None) -> tuple[bytes, bool]:
        """The value, and whether its lease was bound (False: sealed with the path alone, as before)."""
        kek = self._keks.get(sealed.kek_id)
        if kek is None:
            raise SealError(f"resource {path} is sealed under KEK {sealed.kek_id}, which this server does not "
                            f"have (it knows {', '.join(sorted(self._keks))}): give it with --kek-file or "
                            f"--old-kek-file")
        if lease is not None and type(lease) is not int:  # SQLite keeps 60.5 or text in an INTEGER column
            raise SealError(f"resource {path} has a lease that is no integer: the row (its value or lease) was altered")
        if not isinstance(sealed.blob, bytes):  # and text or a number in a BLOB one
            raise SealError(f"resource {path} has a sealed value that is no bytes: the row (its value or lease) "
                            "was altered")
        nonce, box = sealed.blob[:NONCE_SIZE], sealed.blob[NONCE_SIZE:]
        for aad, bound in ((_aad(path, lease), True), (_aad_unbound(path), False)):
            try:
                return AESGCM(kek.key).decrypt(nonce, box, aad), bound
            except (InvalidTag, ValueError):
                pass
        raise SealError(f"resource {path} does not open under KEK {kek.id}: the row (its value or lease) was altered")

    def derived_keys(self, label: bytes) -> list[bytes]:
        """A key per KEK for the use ``label`` names (HKDF-SHA-256), the current KEK's first."""
        keks = (self.current, *(kek for kek in self._keks.values() if kek is not self.current))
        return [HKDF(hashes.SHA256(), 32, None, label).derive(kek.key) for kek in keks]


class RowMac:
    """The MAC that makes a row of the database this server's own: HMAC-SHA-256 over its columns as
    stored (length-prefixed), under a key derived from the KEK for that table (``label``); made
    under the current KEK, checked under it and the previous ones. Someone who can write the
    database but has no KEK cannot make a row that passes, nor change one."""

    def __init__(self, sealer: Sealer, label: bytes) -> None:
        self._keys = sealer.derived_keys(label)

    def mac(self, columns: tuple[str, ...]) -> str:
        return _row_mac(self._keys[0], columns)

    def verify(self, columns: tuple[str, ...], mac: object) -> bool:
        """Whether ``mac`` (as stored: anything a writer of the database put there) is the row's."""
        return isinstance(mac, str) and any(_same(_row_mac(key, columns), mac) for key in self._keys)

    def current(self, columns: tuple[str, ...], mac: object) -> bool:
        """Whether ``mac`` is the current KEK's."""
        return isinstance(mac, str) and _same(_row_mac(self._keys[0], columns), mac)


def _same(mac: str, stored: str) -> bool:
    """Compared as bytes: hmac.compare_digest raises TypeError for text that is not ASCII."""
    return hmac.compare_digest(mac.encode(), stored.encode(errors="replace"))


def _row_mac(key: bytes, columns: tuple[str, ...]) -> str:
    message = b"".join(len(data).to_bytes(4, "big") + data for data in (column.encode() for column in columns))
    return base64.urlsafe_b64encode(hmac.digest(key, message, hashlib.sha256)).rstrip(b"=").decode()


def load_sealer(kek_file: Path | None, old_kek_files: Iterable[Path] = ()) -> Sealer:
    """The sealer of ``--kek-file`` (or the ``kek`` credential) and ``--old-kek-file``s."""
    path = secretfile.locate(kek_file, KEK_CREDENTIAL)
    if path is None:
        raise ConfigError("no key-encryption key: give --kek-file FILE (32 random bytes, e.g. "
                          "(umask 077; head -c 32 /dev/urandom > FILE)) or the systemd credential "
                          f"'{KEK_CREDENTIAL}' (LoadCredential={KEK_CREDENTIAL}:FILE)")
    return Sealer(Kek.load(path), [Kek.load(old) for old in old_kek_files])


def _aad(path: str, lease: int | None) -> bytes:
    return _aad_unbound(path) + b"\0lease\0" + (b"%d" % lease if lease is not None else b"none")


def _aad_unbound(path: str) -> bytes:
    return b"keybroker resource\0" + path.encode()
