"""Reading a file a user names (evidence, an event log, init-data, a policy, a resource's value,
a configuration): no further than what such a file may hold, so that ``/dev/zero`` or a pipe
that does not end is refused instead of read until memory runs out."""

from __future__ import annotations

from pathlib import Path

from .errors import KeybrokerError


def read_bounded(path: Path, limit: int, what: str, error: type[KeybrokerError]) -> bytes:
    """The bytes of ``path`` (``what`` it holds, for the messages), at most ``limit`` of them; else ``error``."""
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise error(f"the {what} {path} is larger than {limit} bytes")
    return data
