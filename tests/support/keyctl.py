"""keyctl in a fresh session keyring, as the key-requesting tests run it."""

from __future__ import annotations

import subprocess


def keyctl_session(script: str, *, user: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``sh -c script`` in a new session keyring (as ``user`` when given); the keyring goes with it."""
    cmd = ["keyctl", "session", "-", "sh", "-c", script]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
