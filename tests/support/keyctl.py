"""keyctl in a fresh session keyring, as the key-requesting tests run it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


def keyctl_session(script: str, *, user: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``sh -c script`` in a new session keyring (as ``user`` when given); the keyring goes with it."""
    cmd = ["keyctl", "session", "-", "sh", "-c", script]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def serials(ring: int) -> list[int]:
    """The serials of the keys linked in keyring ``ring``, in its order (what reading a keyring gives)."""
    import sys

    from keybroker.guest import keyring

    listing = keyring.read(ring)
    return [int.from_bytes(listing[at:at + 4], sys.byteorder) for at in range(0, len(listing), 4)]


@contextlib.contextmanager
def new_attestation_locks_removed() -> Iterator[None]:
    """Remove, on the way out, the attestation locks made in /run/keybroker meanwhile: one per key server URL,
    and a test's or a benchmark's server has a port of its own, which no request names again."""
    from keybroker.guest import tokens

    before = set(tokens.LOCK_DIR.glob("attest-*.lock"))
    try:
        yield
    finally:
        for lock in set(tokens.LOCK_DIR.glob("attest-*.lock")) - before:
            lock.unlink(missing_ok=True)


def proc_keys(serial: int) -> list[str]:
    """The fields of ``serial``'s line in /proc/keys (the fourth is its timeout left: "4s", "1m", "perm")."""
    return next(line.split() for line in open("/proc/keys") if int(line.split()[0], 16) == serial)


def forget_in_user_keyring(key_type: str, description: str) -> None:
    """Unlink the keys of that type and description from root's user keyring, which outlives a test.

    In a process of its own whose process keyring links that keyring: what the handler puts there is
    for its possessors alone, and pytest's process must not get a process keyring (a negative key in
    its session keyring would then be passed over; see docs/guest.md)."""
    import sys

    script = ("import sys\nfrom keybroker.guest import keyring\nfrom keybroker.guest.unlock.keys import KeySource\n"
              "keyring.link(keyring.USER_KEYRING, keyring.PROCESS_KEYRING)\n"
              "KeySource(keyring.USER_KEYRING).forget(sys.argv[1], sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", script, key_type, description], check=True, timeout=30)
