"""JOSE as Trustee and guest-components write it (kbs/src/jwe, kbs-types' ProtectedHeader), for the
test peers: written from their sources with ``cryptography``'s primitives, not with keybroker's.

kbs-types serializes a protected header as ``alg``, ``enc``, then the other members as a
sorted map, compactly; guest-components takes that serialization (not the header as sent) as
the AAD.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

ECDH_ES_A256KW = "ECDH-ES+A256KW"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def protected(header: dict[str, Any]) -> str:
    """kbs-types' ProtectedHeader, serialized and base64url-encoded: the AAD guest-components uses."""
    others = {k: v for k, v in header.items() if k not in ("alg", "enc")}
    text = json.dumps({"alg": header["alg"], "enc": header["enc"], **json.loads(json.dumps(others, sort_keys=True))},
                      separators=(",", ":"))
    return b64url(text.encode())


def kek(shared_secret: bytes) -> bytes:
    """Trustee's concat_kdf("ECDH-ES+A256KW", 32, Z): RFC 7518 4.6.2 with empty apu and apv."""
    other = len(ECDH_ES_A256KW).to_bytes(4, "big") + ECDH_ES_A256KW.encode() + bytes(8) + (256).to_bytes(4, "big")
    return ConcatKDFHash(hashes.SHA256(), 32, other).derive(shared_secret)
