"""Files a user names (evidence, an event log, init-data, a policy, a resource's value, a
configuration, the code root runs):

- read no further than what such a file may hold, so that ``/dev/zero`` or a pipe that does not
  end is refused instead of read until memory runs out;
- believed only when held by their owners alone: a path is held when it and every directory above
  it belong to one of them and are not writable by group or others; a directory writable by others
  is accepted only when it is sticky (``/tmp``: others cannot replace what was put there). Symbolic
  links are followed as the kernel follows them, and each link and each target is checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import KeybrokerError, UntrustedFile


def read_bounded(path: Path, limit: int, what: str, error: type[KeybrokerError]) -> bytes:
    """The bytes of ``path`` (``what`` it holds, for the messages), at most ``limit`` of them; else ``error``.

    Opened without waiting: a FIFO that nobody writes to reads as empty, where a plain open would wait
    for a writer for ever (a server starting, a key request, with it). A pipe with a writer is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            os.set_blocking(fd, True)
            data = file.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise error(f"the {what} {path} is larger than {limit} bytes")
    return data


#: Only root holds what root runs and reads.
ROOT = frozenset({0})


def root_or_self() -> frozenset[int]:
    """Root and this process's user: who may hold what a service running as its own user trusts."""
    return frozenset({0, os.geteuid()})


#: Symbolic links followed in one path before giving up, as the kernel does (ELOOP).
MAX_LINKS = 40


def check_held(path: Path, what: str, owners: frozenset[int] = ROOT) -> None:
    """UntrustedFile unless ``path`` (and each directory above, each link on the way) is held by ``owners``
    alone: theirs, and not writable by group or others (a sticky folder on the way may be: ``/tmp``).

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
    _judge(here, _lstat(here, path, what), path, what, owners, last=False)
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
        _judge(step, st, path, what, owners, last=False)
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
    _judge(here, _lstat(here, path, what), path, what, owners, last=True)  # what is opened: not a shared folder


def _components(text: str) -> list[str]:
    """A path's components, the first last (a stack to pop)."""
    return text.split("/")[::-1]


def _lstat(here: str, path: Path, what: str) -> os.stat_result:
    try:
        return os.lstat(here)
    except OSError as exc:
        raise UntrustedFile(f"{what} {path}: cannot check {here}: {exc.strerror}") from None


def _judge(here: str, st: os.stat_result, path: Path, what: str, owners: frozenset[int], *, last: bool) -> None:
    writable = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    sticky_folder = stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX) and not last
    # A link's own mode means nothing: the folder holding it and its target are checked.
    mode_ok = stat.S_ISLNK(st.st_mode) or not writable or sticky_folder
    if st.st_uid not in owners:
        held_by = " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(owners))
        raise UntrustedFile(f"refusing {what} {path}: {here} belongs to uid {st.st_uid}, not {held_by}; keybroker "
                            "would run or trust what that user puts there (chown root)")
    if not mode_ok:
        raise UntrustedFile(f"refusing {what} {path}: {here} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); keybroker would run or trust what they put there "
                            "(chmod go-w)")


def check_tree(root: Path, what: str) -> None:
    """``check_held`` (by root) for ``root`` and every file, folder and link below it (a package's code).

    A link is checked in full, with its target (and a folder it leads to file by file: an
    import follows it), each folder once.
    """
    check_held(root, what)
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
            _judge(entry.path, st, Path(entry.path), what, ROOT, last=True)
            if stat.S_ISLNK(st.st_mode):
                check_held(Path(entry.path), what)  # the target, and every folder and link on the way to it
                if os.path.isdir(entry.path):
                    folders.append(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                folders.append(entry.path)
