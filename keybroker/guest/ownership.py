"""What root runs and reads must be root's: the handler, its interpreter, its code, its configuration.

The request-key handler runs as root for any local user's request. If a user could change
the handler script, the Python that runs it, the modules it imports or the client
configuration (the key server, the CA it trusts), every key request would run that user's
code or trust that user's server. A path is trusted when it and every directory above it
belong to root and are not writable by group or others; a directory writable by others is
accepted only when it is sticky and root's (``/tmp``: others cannot replace what root put
there). Symbolic links are followed, and each link and each target is checked.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from ..errors import UntrustedFile


def check(path: Path, what: str) -> None:
    """UntrustedFile unless ``path`` (and each directory above, each link on the way) is root's alone."""
    seen: set[str] = set()
    pending = [os.path.abspath(path)]
    while pending:
        current = pending.pop()
        parts = Path(current).parts
        for depth in range(1, len(parts) + 1):
            here = os.path.join(*parts[:depth])
            if here in seen:
                continue
            seen.add(here)
            try:
                st = os.lstat(here)
            except OSError as exc:
                raise UntrustedFile(f"{what} {path}: cannot check {here}: {exc.strerror}") from None
            _judge(here, st, path, what, last=depth == len(parts))
            if stat.S_ISLNK(st.st_mode):
                target = os.path.join(os.path.dirname(here), os.readlink(here))
                pending.append(os.path.normpath(os.path.join(target, *parts[depth:])))
                break


def _judge(here: str, st: os.stat_result, path: Path, what: str, *, last: bool) -> None:
    writable = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    sticky_folder = stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX) and not last
    # A link's own mode means nothing: the folder holding it and its target are checked.
    mode_ok = stat.S_ISLNK(st.st_mode) or not writable or sticky_folder
    if st.st_uid != 0:
        raise UntrustedFile(f"refusing {what} {path}: {here} belongs to uid {st.st_uid}, not root; root would run "
                            "or trust what that user puts there (chown root)")
    if not mode_ok:
        raise UntrustedFile(f"refusing {what} {path}: {here} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); root would run or trust what they put there "
                            "(chmod go-w)")


def check_tree(root: Path, what: str) -> None:
    """``check`` for ``root`` and every file and directory below it (a package's code)."""
    check(root, what)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            entry = os.path.join(folder, name)
            st = os.lstat(entry)
            _judge(entry, st, Path(entry), what, last=True)


def check_handler(config: Path, server_ca: Path | None = None, *, thorough: bool = False) -> None:
    """What one key request makes root run and read: the interpreter, the code it imports, the configuration."""
    check_code(thorough=thorough)
    check_config(config, server_ca)


def check_code(*, thorough: bool = False) -> None:
    """The interpreter and the code it imports: keybroker's own package file by file; the other import
    folders (site-packages, the standard library) as folders, or file by file when ``thorough``
    (at install time)."""
    check(Path(sys.executable), "interpreter")
    check_tree(Path(__file__).resolve().parent.parent, "keybroker package")
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            (check_tree if thorough else check)(Path(entry), "import folder")


def check_config(config: Path, server_ca: Path | None = None) -> None:
    """The client configuration and the CA bundle it names."""
    check(config, "client configuration")
    if server_ca is not None:
        check(server_ca, "CA bundle")
