"""Secrets the key server reads from files: the KEK, admin tokens, the token-signing key.

Each comes from the file the configuration names or, when it names none, from the systemd
credential of the same name (``$CREDENTIALS_DIRECTORY/<name>``, set by ``LoadCredential=``
or ``LoadCredentialEncrypted=``). A secret file that its group or others may access is
refused, as ssh refuses such private keys.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigError

SECRET_MAX = 64 * 1024


def locate(path: Path | None, credential: str) -> Path | None:
    """``path`` when given, else the systemd credential ``credential`` when present, else None."""
    if path is not None:
        return path
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / credential).is_file():
        return Path(directory) / credential
    return None


def read(path: Path, what: str) -> bytes:
    """The bytes of secret file ``path`` (``what`` names it in errors)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot open it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"{what} {path} is accessible to group or others "
                              f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
        data = f.read(SECRET_MAX + 1)
    if len(data) > SECRET_MAX:
        raise ConfigError(f"{what} {path} is larger than {SECRET_MAX} bytes")
    return data
