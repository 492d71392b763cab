"""What root runs and reads must be root's: the handler, its interpreter, its code, its configuration.

The request-key handler runs as root for any local user's request. If a user could change
the handler script, the Python that runs it, the modules it imports or the client
configuration (the key server, the CA it trusts), every key request would run that user's
code or trust that user's server. A path is trusted when it and every directory above it
belong to root and are not writable by group or others; a directory writable by others is
accepted only when it is sticky and root's (``/tmp``: others cannot replace what root put
there). Symbolic links are followed as the kernel follows them, and each link and each target is
checked.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from ..errors import UntrustedFile

#: Symbolic links followed in one path before giving up, as the kernel does (ELOOP).
MAX_LINKS = 40


def check(path: Path, what: str) -> None:
    """UntrustedFile unless ``path`` (and each directory above, each link on the way) is root's alone.

    The path is walked as the kernel walks it: one component at a time from ``/`` (or the
    working directory), a link's target spliced in where the link was, ``..`` taken from the
    folder reached so far (after a link, the parent of its target, not of the link). Each
    folder, link and the object reached is judged; a path with more than ``MAX_LINKS`` links
    is refused.
    """
    text = os.fspath(path)
    start = text if text.startswith("/") else os.path.join(os.getcwd(), text)
    pending = _components(start)  # what is left to walk, the next component last
    here = "/"
    _judge(here, _lstat(here, path, what), path, what, last=False)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            here = os.path.dirname(here)  # a folder already judged, with no link in its path
            continue
        step = os.path.join(here, name)
        st = _lstat(step, path, what)
        _judge(step, st, path, what, last=False)
        if not stat.S_ISLNK(st.st_mode):
            here = step
            continue
        links += 1
        if links > MAX_LINKS:
            raise UntrustedFile(f"refusing {what} {path}: more than {MAX_LINKS} symbolic links on the way "
                                f"(at {step})")
        try:
            target = os.readlink(step)
        except OSError as exc:
            raise UntrustedFile(f"{what} {path}: cannot check {step}: {exc.strerror}") from None
        if target.startswith("/"):
            here = "/"
        pending += _components(target)
    _judge(here, _lstat(here, path, what), path, what, last=True)  # what is opened: not a shared folder


def _components(text: str) -> list[str]:
    """A path's components, the first last (a stack to pop)."""
    return text.split("/")[::-1]


def _lstat(here: str, path: Path, what: str) -> os.stat_result:
    try:
        return os.lstat(here)
    except OSError as exc:
        raise UntrustedFile(f"{what} {path}: cannot check {here}: {exc.strerror}") from None


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
    """``check`` for ``root`` and every file, folder and link below it (a package's code).

    A link is checked in full, with its target (and a folder it leads to file by file: an
    import follows it), each folder once.
    """
    check(root, what)
    walked: set[tuple[int, int]] = set()
    folders = [os.fspath(root)]
    while folders:
        folder = folders.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in walked:
                continue
            walked.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            raise UntrustedFile(f"{what} {root}: cannot check {folder}: {exc.strerror}") from None
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the listing (a temporary file): nothing left to trust
            except OSError as exc:
                raise UntrustedFile(f"{what} {root}: cannot check {entry.path}: {exc.strerror}") from None
            _judge(entry.path, st, Path(entry.path), what, last=True)
            if stat.S_ISLNK(st.st_mode):
                check(Path(entry.path), what)  # the target, and every folder and link on the way to it
                if os.path.isdir(entry.path):
                    folders.append(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                folders.append(entry.path)


def check_handler(config: Path, server_ca: Path | None = None, *, thorough: bool = False) -> None:
    """What one key request makes root run and read: the interpreter, the code it imports, the configuration."""
    check_code(thorough=thorough)
    check_config(config, server_ca)


def check_code(*, thorough: bool = False) -> None:
    """The interpreter and the code it imports: keybroker's own package file by file; the other import
    folders (site-packages, the standard library) as folders, or file by file when ``thorough``
    (at install time)."""
    check(Path(sys.executable), "interpreter")
    venv = _venv_config(Path(sys.executable))
    if venv is not None:
        check(venv, "interpreter configuration")
    check_tree(Path(__file__).resolve().parent.parent, "keybroker package")
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            (check_tree if thorough else check)(Path(entry), "import folder")


def _venv_config(executable: Path) -> Path | None:
    """The pyvenv.cfg the interpreter read as it started, as Python looks for it: beside the executable
    (the path it was started by, links not followed), else in the folder above. Its ``home`` says where
    the standard library comes from, imported before any check runs."""
    for folder in (executable.parent, executable.parent.parent):
        if os.path.lexists(folder / "pyvenv.cfg"):
            return folder / "pyvenv.cfg"
    return None


def check_config(config: Path, server_ca: Path | None = None) -> None:
    """The client configuration and the CA bundle it names."""
    check(config, "client configuration")
    if server_ca is not None:
        check(server_ca, "CA bundle")
