"""The resource path grammar both sides share: ``<repo>/<type>/<tag>``, as Trustee's ``kbs:///repo/type/tag``.

A guest names a resource in its key description (``keybroker:<repo>/<type>/<tag>``); the
key server stores and releases resources under the same path. Each segment is what Trustee's
resource plugin accepts, ``[A-Za-z0-9_-][A-Za-z0-9_.-]*`` (never ``.`` or ``..``), and the
whole path is at most 200 characters (what the key server's columns and audit records hold).

Release policies and the guest's access rules name resources by pattern: those characters,
``/`` and ``*``, which matches any run of characters, ``/`` included (nothing else is a wildcard).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DescriptionError
from . import shown

PATH_MAX = 200
#: Bytes of a resource's value at most: what a user or logon key holds (the kernel's limit).
VALUE_MAX = 32767
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_PATTERN = re.compile(r"[A-Za-z0-9_.*/-]+")


def check_pattern(text: str) -> str:
    """``text`` if it is a resource pattern (see above), else DescriptionError."""
    if len(text) > PATH_MAX or not _PATTERN.fullmatch(text):
        raise DescriptionError(f"resource pattern {shown(text)} must be at most {PATH_MAX} characters of "
                               "[A-Za-z0-9_.-], '/' and '*' (the only wildcard)")
    return text


def pattern_parts(pattern: str) -> tuple[str, ...]:
    """A checked ``pattern`` split at its wildcards, for :func:`pattern_matches` (split once where
    many names are matched: fnmatch would compile a regular expression per pattern, and cache 32768)."""
    return tuple(pattern.split("*"))


def pattern_matches(name: str, parts: tuple[str, ...]) -> bool:
    """Whether ``name`` matches the pattern of ``parts`` (:func:`pattern_parts`), where ``*`` matches
    any run of characters; in time linear in the name and the pattern."""
    if len(parts) == 1:
        return name == parts[0]
    first, *middle, last = parts
    if len(name) < len(first) + len(last) or not name.startswith(first) or not name.endswith(last):
        return False
    start, end = len(first), len(name) - len(last)
    for part in middle:  # the leftmost place of each keeps the most room for the rest
        found = name.find(part, start, end)
        if found < 0:
            return False
        start = found + len(part)
    return True


@dataclass(frozen=True)
class ResourcePath:
    repo: str
    type: str
    tag: str

    def __str__(self) -> str:
        return f"{self.repo}/{self.type}/{self.tag}"

    @classmethod
    def parse(cls, text: str) -> ResourcePath:
        if len(text) > PATH_MAX:
            raise DescriptionError(f"resource {shown(text)} is longer than {PATH_MAX} characters")
        parts = text.split("/")
        if len(parts) != 3:
            raise DescriptionError(f"resource {shown(text)} must be <repo>/<type>/<tag>")
        for part in parts:
            if not _SEGMENT.fullmatch(part):
                raise DescriptionError(f"resource segment {shown(part)} must be characters of [A-Za-z0-9_.-], "
                                       "not starting with '.'")
        return cls(*parts)
