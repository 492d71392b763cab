"""Key descriptions and callout strings: the grammar keybroker accepts from any local user.

A key description names a resource on the key server, with the same three segments as
Trustee's ``kbs:///repo/type/tag``::

    keybroker:<repo>/<type>/<tag>

The callout string carries optional, space-separated ``name=value`` options::

    privlevel=N        the guest privilege level to attest (SEV-SNP VMPL 0-3; ignored on TDX and CCA)

Anything else is refused: both strings come from whoever called request_key(2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DescriptionError
from ..wire.resource import ResourcePath

DESCRIPTION_PREFIX = "keybroker:"
KEY_TYPES = ("user", "logon")
CALLOUT_MAX = 256

_OPTION = re.compile(r"([a-z_]{1,32})=([A-Za-z0-9_.-]{1,64})")


@dataclass(frozen=True)
class KeyRequest:
    """A validated request: key type, the resource, and callout options."""

    key_type: str
    resource: ResourcePath
    privlevel: int | None = None

    @property
    def description(self) -> str:
        return f"{DESCRIPTION_PREFIX}{self.resource}"


def parse_request(key_type: str, description: str, callout: str | bytes) -> KeyRequest:
    if key_type not in KEY_TYPES:
        raise DescriptionError(f"key type {key_type[:32]!r} is not served (only {', '.join(KEY_TYPES)})")
    if not description.startswith(DESCRIPTION_PREFIX):
        raise DescriptionError(f"description {description[:80]!r} does not start with {DESCRIPTION_PREFIX!r}")
    resource = ResourcePath.parse(description[len(DESCRIPTION_PREFIX):])
    options = parse_callout(callout)
    return KeyRequest(key_type, resource, **options)


def parse_callout(callout: str | bytes) -> dict[str, int]:
    if isinstance(callout, bytes):
        if len(callout) > CALLOUT_MAX:
            raise DescriptionError(f"callout is {len(callout)} bytes, more than {CALLOUT_MAX}")
        try:
            callout = callout.decode("ascii")
        except UnicodeDecodeError:
            raise DescriptionError("callout is not ASCII") from None
    if len(callout) > CALLOUT_MAX:
        raise DescriptionError(f"callout is {len(callout)} characters, more than {CALLOUT_MAX}")
    options: dict[str, int] = {}
    for word in callout.split(" "):
        if not word:
            continue
        match = _OPTION.fullmatch(word)
        if not match:
            raise DescriptionError(f"callout option {word[:80]!r} is not name=value")
        name, value = match.groups()
        if name in options:
            raise DescriptionError(f"callout option {name!r} is given twice")
        if name == "privlevel":
            if value not in ("0", "1", "2", "3"):
                raise DescriptionError(f"callout privlevel={value[:8]} must be 0, 1, 2 or 3")
            options[name] = int(value)
        else:
            raise DescriptionError(f"unknown callout option {name!r} (known: privlevel)")
    return options
