"""Secrets the key server reads from files: the KEK, admin tokens, the token-signing key, and
(checked, then read by the TLS stack) the TLS private key.

Each comes from the file the configuration names or, when it names none, from the systemd
credential of the same name (``$CREDENTIALS_DIRECTORY/<name>``, set by ``LoadCredential=``
or ``LoadCredentialEncrypted=``). As ssh does with private keys, a secret file is refused
when its group or others may access it, or when it is owned by anyone but root or the user
the process runs as: whoever owns it can rewrite it (a KEK of their choosing, an admin
token of their own) or open it up to anyone.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError

SECRET_MAX = 64 * 1024
#: The group-read bit, allowed in two cases: a systemd credential (systemd writes it 0400, owned
#: by root, and grants the service's user read access with an ACL, whose mask ``stat`` reports as
#: the group bits, 0440, although no group may read it), and a TLS key (``group_may_read``).
_GROUP_READ = 0o040


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
    with _open(path, what) as f:
        data = f.read(SECRET_MAX + 1)
    if len(data) > SECRET_MAX:
        raise ConfigError(f"{what} {path} is larger than {SECRET_MAX} bytes")
    return data


def check(path: Path, what: str, *, group_may_read: bool = False) -> None:
    """Refuse secret file ``path`` as ``read`` would, for a secret that another library opens;
    ``group_may_read`` for a TLS key (Debian keeps them 0640 in group ssl-cert, for the services
    that serve TLS)."""
    with _open(path, what, group_may_read=group_may_read):
        pass


def _open(path: Path, what: str, *, group_may_read: bool = False) -> BinaryIO:
    """``path`` opened for reading, once its type, mode and owner are those of a secret."""
    try:  # not blocking: a FIFO nobody writes to would hold the open forever (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot open it: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    try:
        _check(os.fstat(f.fileno()), path, what, group_may_read)
        os.set_blocking(fd, True)
    except BaseException:
        f.close()
        raise
    return f


def _check(info: os.stat_result, path: Path, what: str, group_may_read: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    allowed = _GROUP_READ if _is_credential(path) or group_may_read else 0
    if info.st_mode & 0o077 & ~allowed:
        raise ConfigError(f"{what} {path} is accessible to group or others "
                          f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise ConfigError(f"{what} {path} is owned by {_user(info.st_uid)}, who can rewrite it; a secret must "
                          f"be owned by root or {_user(me)}, the user this runs as: chown {_user(me)} {path}")


def _is_credential(path: Path) -> bool:
    """Whether ``path`` is a systemd credential: a file directly in ``$CREDENTIALS_DIRECTORY``."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return directory is not None and directory != "" and path.absolute().parent == Path(directory).absolute()


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
