"""The contract both sides share: RCAR 0.4.0, the evidence envelope, resource paths, transport."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ..errors import KeybrokerError

#: How much of one value a client sent an error message may quote back.
QUOTE_MAX = 64


def shown(value: object, limit: int = QUOTE_MAX) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error never echoes a client's megabyte back.
    What has no repr (an integer past Python's 4300 decimal digits, which TOML's hexadecimal
    makes; a value nested too deeply) is named by its kind."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[:limit] + "..."


def shown_names(names: list[str], count: int = 5) -> str:
    """A few of the (client-chosen) names, each cut: for 'unknown member(s) ...' messages."""
    listed = ", ".join(shown(name) for name in names[:count])
    return listed + (f" and {len(names) - count} more" if len(names) > count else "")


#: A \uD800-\uDFFF escape (JSON lets one stand alone; UTF-8 text cannot carry it).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str | bytes, *, unique: bool = False) -> Any:
    """``json.loads`` for what others sent: bytes that are not UTF-8 (RFC 8259), nesting too deep
    for the parser, and a string holding a lone UTF-16 surrogate (no UTF-8 text can carry it, so
    no hash, database or log could take it), are ValueErrors like any bad JSON; with ``unique``, so
    is an object that names a member twice (json.loads keeps the last, which a reader may not)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # strict: json.loads alone takes UTF-16 and encoded surrogates
    else:
        text.encode("utf-8")  # a str from within the process must be text too
    try:
        value = json.loads(text, object_pairs_hook=_unique_members if unique else None)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # paired escapes make one character; a lone one stays a surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON string with a lone UTF-16 surrogate (\\ud800-\\udfff unpaired): not text") \
                from None
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for key, value in pairs:
        if key in members:
            raise ValueError(f"member {shown(key)} appears twice in one object")
        members[key] = value
    return members


def parse_toml(text: str, what: str, error: type[KeybrokerError]) -> dict[str, Any]:
    """``tomllib.loads`` for a file or body: what it cannot read is ``error`` naming ``what``, also an
    integer past Python's 4300 digits (a plain ValueError) and nesting past its recursion."""
    import tomllib  # here: what imports this package on a key request's path reads no TOML

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} is not valid TOML, or not TOML at all: {exc}") from None
    except ValueError as exc:
        raise error(f"{what} holds a value TOML cannot read: {str(exc)[:80]}") from None
    except RecursionError:  # tomllib descends once per nested array or inline table
        raise error(f"{what} nests arrays or tables too deeply") from None


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(text: object) -> bytes | None:
    """Unpadded base64url (RFC 7515 section 2), canonical, as the base64 crate's URL_SAFE_NO_PAD reads it
    (Trustee, kbs-types, guest-components); None for anything else: padding, the standard alphabet, other
    characters, or unused trailing bits that are not zero (a second spelling of the same bytes)."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") == text else None


def decimal(text: str, digits: int = 20) -> int | None:
    """``text`` as a non-negative integer of at most ``digits`` ASCII digits, else None.

    str.isdigit() accepts '²' and other digits int() refuses; this is the one strict reading.
    """
    return int(text) if re.fullmatch(f"[0-9]{{1,{digits}}}", text) else None
