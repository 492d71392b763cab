"""The pre-unlock step: place a volume's key in root's user keyring, ``keybroker place-key``.

dm-crypt (a ``:<size>:logon:<description>`` table key) and the LUKS2 keyring token
(``cryptsetup token add --key-description ...``) only look keys up, in the keyrings of the
process that activates the volume. ``keybroker-unlock@<volume>.service`` runs this before
``systemd-cryptsetup@<volume>.service``, whose generated unit links root's user keyring
into its session keyring (``KeyringMode=shared``), so the key placed here is found there.

It is ``keyctl request2 <key_type> keybroker:<resource> "" @u`` with retries: the type is the
volume's ``key_type`` (``logon`` for dm-crypt, ``user`` for LUKS2 keyring tokens, which read
the passphrase back).
"""

from __future__ import annotations

from ...errors import UnlockRefused
from .. import keyring
from ..config import ClientConfig
from .keys import KeySource
from .progress import Reporter
from .retry import Retry


def place(config: ClientConfig, name: str, reporter: Reporter) -> int:
    """Request the volume's key into root's user keyring; its serial."""
    volume = config.volume(name)
    if volume is None:
        raise UnlockRefused(f"volume {name[:80]!r} is not mapped in {config.path} (add [volumes.{name[:80]}])")
    # As KeyringMode=shared: a session keyring of its own that links root's user keyring, so that the
    # key under construction there is possessed (the handler restricts its permissions, which needs
    # that), whatever session the caller had (su or sudo without pam_keyinit keep the caller's).
    keyring.join_session_keyring(None)
    keyring.link(keyring.USER_KEYRING, keyring.SESSION_KEYRING)
    retry = Retry(f"volume {volume.name}", config.server_url, volume.deadline, reporter)
    serial = retry.run(lambda: KeySource(keyring.USER_KEYRING).request(volume, volume.key_type))
    reporter.status(f"volume {volume.name}: {volume.key_type} key {volume.description} is in the user keyring "
                    f"(serial {serial})")
    return serial
