"""Confidential Containers init-data: the TOML a host hands a guest at launch, and its digest.

A guest-components guest may send its init-data with the attestation (``"init-data":
{"format": "toml", "body": "<TOML>"}``). The document says which hash binds it::

    version = "0.1.0"
    algorithm = "sha384"          # sha256, sha384 or sha512
    [data]
    "aa.toml" = "..."

and its digest is that hash of the body's bytes exactly as sent. The host put the digest
in the field the TEE measures at launch (SEV-SNP HOST_DATA, TDX MRCONFIGID, the CCA realm
personalization value): the verifier checks it there, so the init-data is the host's
launch-time choice and not something the guest made up afterwards.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from typing import Any

from ..errors import EvidenceError
from . import shown

BODY_MAX = 256 * 1024
#: Dots one line may hold. tomllib spends time and memory quadratic in the parts of a dotted key
#: (a key of 10,000 parts, 20 KiB, takes 400 MiB; 120,000 exhaust the machine) and in a table header's
#: parts times the lines under it; no key or header spans lines. Real init-data keys have a few parts.
LINE_DOTS_MAX = 64
ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


@dataclass(frozen=True)
class InitData:
    version: str
    algorithm: str
    digest: bytes
    files: tuple[str, ...]  # the names in [data]

    def claims(self) -> dict[str, Any]:
        """What a release policy can pin: the digest above all."""
        return {"init_data.digest": self.digest.hex(), "init_data.algorithm": self.algorithm,
                "init_data.version": self.version, "init_data.files": list(self.files)}


def from_json(obj: Any) -> InitData:
    """The ``init-data`` member of an attestation: ``{"format": "toml", "body": "..."}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str) or not isinstance(obj.get("body"), str):
        raise EvidenceError("init-data must be {\"format\": \"toml\", \"body\": \"<TOML>\"}")
    if obj["format"] != "toml":
        raise EvidenceError(f"init-data format {shown(obj['format'])} is not supported (only \"toml\")")
    return parse(obj["body"])


def parse(body: str) -> InitData:
    """An init-data document, checked as guest-components and Trustee read it, with its digest."""
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError:
        raise EvidenceError("init-data is not valid Unicode (a lone surrogate)") from None
    if len(raw) > BODY_MAX:
        raise EvidenceError(f"init-data is {len(raw)} bytes, more than {BODY_MAX}")
    # Lines as TOML ends them (only "\n"): str.splitlines() would also cut at U+2028 and others, which a
    # quoted part of a key may hold, and so count a deep key as several shallow lines.
    if any(line.count(".") > LINE_DOTS_MAX for line in body.split("\n")):
        raise EvidenceError(f"init-data has a line with more than {LINE_DOTS_MAX} dots: TOML keys or table "
                            "headers that deep are refused (they cost quadratic time to parse)")
    try:
        doc = tomllib.loads(body)
    except tomllib.TOMLDecodeError as exc:
        raise EvidenceError(f"init-data is not TOML: {exc}") from None
    except ValueError as exc:  # an integer past Python's 4300 digits raises plain ValueError
        raise EvidenceError(f"init-data holds a value TOML cannot read: {str(exc)[:80]}") from None
    except RecursionError:  # tomllib descends once per nested array or inline table
        raise EvidenceError("init-data nests arrays or tables too deeply") from None
    version, algorithm, data = doc.get("version"), doc.get("algorithm"), doc.get("data")
    if not isinstance(version, str):
        raise EvidenceError("init-data needs a string 'version'")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise EvidenceError(f"init-data algorithm {shown(algorithm)} is not one of {', '.join(ALGORITHMS)}")
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise EvidenceError("init-data needs a [data] table of strings")
    return InitData(version, algorithm, ALGORITHMS[algorithm](raw).digest(), tuple(sorted(data)))
