"""Volume keys through the kernel keyring: request_key with a callout, into one keyring.

A miss upcalls /sbin/request-key, whose keybroker handler attests and instantiates the key
in ``keyring``; a second volume with the same resource, or a later retry, finds it there
without attesting again. A failed upcall leaves a negative key in ``keyring`` (5 s for
transient failures) that would answer the next request with the same error without an
upcall: after a transient failure it is unlinked, so that the next attempt really reaches
the key server.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

from ...errors import KeyringError
from .. import keyring
from ..config import Volume
from .retry import TRANSIENT_ERRNOS


@dataclass(frozen=True)
class KeySource:
    keyring: int  # the destination keyring (a special id such as keyring.SESSION_KEYRING, or a serial)

    def request(self, volume: Volume, key_type: str) -> int:
        """The key's serial, from the keyring or through the handler; KeyringError on failure."""
        try:
            return keyring.request_key(key_type, volume.description, "", self.keyring)
        except KeyringError as exc:
            if exc.errno in TRANSIENT_ERRNOS:
                self.forget(key_type, volume.description)
            raise

    def read(self, serial: int) -> bytearray:
        """The payload of a ``user`` key, in a buffer to wipe after use."""
        return keyring.read_secret(serial)

    def forget(self, key_type: str, description: str) -> None:
        """Unlink every key of that type and description from the destination keyring."""
        try:
            serials = array.array("i", keyring.read(self.keyring))
        except KeyringError:
            return  # then the negative key just expires
        for serial in serials:
            try:
                key = keyring.describe(serial)
                if (key.type, key.description) == (key_type, description):
                    keyring.unlink(serial, self.keyring)
            except KeyringError:
                continue  # gone meanwhile, or not ours to see
