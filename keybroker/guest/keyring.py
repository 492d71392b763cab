"""The kernel keyring, through the system's libkeyutils.so.1 (ctypes).

Thin wrappers: each function is one keyutils call and raises :class:`KeyringError`
(carrying the errno) when the kernel refuses.
"""

from __future__ import annotations

import ctypes

from ..errors import KeybrokerError, KeyringError

TYPE_CHECKING = False
if TYPE_CHECKING:  # the request-key handler imports this module on every request: nothing more at run time
    from collections.abc import Callable
    from typing import Any

# Special keyring IDs (keyutils.h).
PROCESS_KEYRING = -2
SESSION_KEYRING = -3
USER_KEYRING = -4
REQKEY_AUTH_KEY = -7

# Permission bits (keyutils.h): possessor, user, group, other.
POS_VIEW, POS_READ, POS_SEARCH, POS_LINK = 0x01 << 24, 0x02 << 24, 0x08 << 24, 0x10 << 24
#: What a released key keeps: its possessors may view, read, search and link it; nobody
#: else gets anything (not even its owner without possession). Without SETATTR the
#: requester can neither lift the lease the server gave nor widen the permissions.
POSSESSOR_ONLY = POS_VIEW | POS_READ | POS_SEARCH | POS_LINK

_serial = ctypes.c_int32


_LIB: list[ctypes.CDLL] = []


def _lib() -> ctypes.CDLL:
    if _LIB:
        return _LIB[0]
    try:
        lib = ctypes.CDLL("libkeyutils.so.1", use_errno=True)  # the soname: no ldconfig run per request
    except OSError:
        from ctypes.util import find_library

        try:
            lib = ctypes.CDLL(find_library("keyutils") or "libkeyutils.so", use_errno=True)
        except OSError as exc:
            raise KeybrokerError(f"cannot load libkeyutils.so.1 (install keyutils): {exc}") from None
    s, p, n = _serial, ctypes.c_char_p, ctypes.c_size_t
    u, lng = ctypes.c_uint, ctypes.c_long
    signatures = {
        "request_key": (s, [p, p, p, s]),
        "add_key": (s, [p, p, ctypes.c_void_p, n, s]),
        "keyctl_search": (lng, [s, p, p, s]),
        "keyctl_describe": (lng, [s, ctypes.c_void_p, n]),
        "keyctl_read": (lng, [s, ctypes.c_void_p, n]),
        "keyctl_unlink": (lng, [s, s]),
        "keyctl_link": (lng, [s, s]),
        "keyctl_setperm": (lng, [s, ctypes.c_uint32]),
        "keyctl_set_timeout": (lng, [s, u]),
        "keyctl_assume_authority": (lng, [s]),
        "keyctl_instantiate": (lng, [s, ctypes.c_void_p, n, s]),
        "keyctl_reject": (lng, [s, u, u, s]),
        "keyctl_join_session_keyring": (s, [p]),
        "keyctl_get_keyring_ID": (s, [s, ctypes.c_int]),
    }
    for fn, (restype, argtypes) in signatures.items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    _LIB.append(lib)
    return lib


def _check(call: str, result: int) -> int:
    if result < 0:
        raise KeyringError(call, ctypes.get_errno())
    return result


def _buffer(data: bytes | bytearray) -> ctypes.Array[ctypes.c_char]:
    """A C view of ``data`` without copying a bytearray (so the caller can wipe it)."""
    if isinstance(data, bytearray):
        return (ctypes.c_char * len(data)).from_buffer(data)
    return ctypes.create_string_buffer(bytes(data), len(data))


def request_key(key_type: str, description: str, callout: str | None, keyring: int = 0) -> int:
    """request_key(2); a ``None`` callout only searches and never upcalls."""
    info = None if callout is None else callout.encode()
    return _check("request_key", _lib().request_key(key_type.encode(), description.encode(), info, keyring))


def add_key(key_type: str, description: str, payload: bytes | bytearray, keyring: int) -> int:
    """add_key(2): create or update the key ``description`` of ``key_type`` in ``keyring``."""
    buf = _buffer(payload) if payload else None
    return _check("add_key", _lib().add_key(key_type.encode(), description.encode(), buf, len(payload), keyring))


def search(keyring: int, key_type: str, description: str) -> int:
    """KEYCTL_SEARCH: the key in ``keyring`` (or a keyring linked from it) with this type and description."""
    return _check("keyctl_search", _lib().keyctl_search(keyring, key_type.encode(), description.encode(), 0))


def _read_all(call: str, fn: Callable[[int, Any, int], int], key: int) -> bytearray:
    """Ask for the size, then read; the result (and any buffer that turned out too small) can be wiped."""
    size = _check(call, fn(key, None, 0))
    while True:
        buf = bytearray(size)
        got = _check(call, fn(key, _buffer(buf), size))
        if got <= size:
            del buf[got:]
            return buf
        buf[:] = bytes(size)
        size = got


class KeyDescription:
    """KEYCTL_DESCRIBE: ``type;uid;gid;perm;description``."""

    __slots__ = ("description", "gid", "perm", "type", "uid")

    def __init__(self, key_type: str, uid: int, gid: int, perm: int, description: str) -> None:
        self.type, self.uid, self.gid, self.perm, self.description = key_type, uid, gid, perm, description


def describe(key: int) -> KeyDescription:
    raw = bytes(_read_all("keyctl_describe", _lib().keyctl_describe, key)).rstrip(b"\0")
    # The description may itself contain ';': split on the first four only.
    key_type, uid, gid, perm, description = raw.decode("utf-8", "surrogateescape").split(";", 4)
    return KeyDescription(key_type, int(uid), int(gid), int(perm, 16), description)


def read(key: int) -> bytes:
    """KEYCTL_READ of a payload that is not secret (a callout, a keyring's list of serials)."""
    return bytes(_read_all("keyctl_read", _lib().keyctl_read, key))


def read_secret(key: int) -> bytearray:
    """KEYCTL_READ into a bytearray the caller can wipe (no immutable copy of the payload is left)."""
    return _read_all("keyctl_read", _lib().keyctl_read, key)


def link(key: int, keyring: int) -> None:
    _check("keyctl_link", _lib().keyctl_link(key, keyring))


def unlink(key: int, keyring: int) -> None:
    _check("keyctl_unlink", _lib().keyctl_unlink(key, keyring))


def setperm(key: int, perm: int) -> None:
    _check("keyctl_setperm", _lib().keyctl_setperm(key, perm))


def set_timeout(key: int, seconds: int) -> None:
    _check("keyctl_set_timeout", _lib().keyctl_set_timeout(key, seconds))


def assume_authority(key: int) -> int:
    return _check("keyctl_assume_authority", _lib().keyctl_assume_authority(key))


def instantiate(key: int, payload: bytes | bytearray, keyring: int = 0) -> None:
    buf = _buffer(payload)
    _check("keyctl_instantiate", _lib().keyctl_instantiate(key, buf, len(payload), keyring))


def reject(key: int, timeout: int, error: int, keyring: int = 0) -> None:
    _check("keyctl_reject", _lib().keyctl_reject(key, timeout, error, keyring))


def serial_of(key: int) -> int:
    """KEYCTL_GET_KEYRING_ID: the serial a special ID (``REQKEY_AUTH_KEY``, say) stands for; never creates."""
    return _check("keyctl_get_keyring_ID", _lib().keyctl_get_keyring_ID(key, 0))


def join_session_keyring(name: str | None = None) -> int:
    """Join (or with ``None``, create) a session keyring for this process."""
    return _check("keyctl_join_session_keyring",
                  _lib().keyctl_join_session_keyring(None if name is None else name.encode()))
