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
import re
from dataclasses import dataclass
from typing import Any

from ..errors import EvidenceError
from . import parse_toml, shown

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


def _deepest_line(body: str) -> int:
    """The most dots outside strings and comments on one line of ``body``: a bound on the parts of any
    key or table header, which may be quoted (``"a"."b"``) but hold their separators outside quotes.

    Strings are read as TOML reads them, closers included (a multi-line string's ends with up to two
    of its quotes as content), so that no key hides in what only looks like a string here; where this
    and TOML disagree (not TOML), dots count. A string left open runs to the end of the document (of
    its line if single-line), as TOML fails there and reads nothing after it; were it no string here,
    each of its quotes would open one that scans to that end again (time quadratic in its length:
    minutes for 256 KiB of ``"\\"\\"…``). Lines end at "\n" only, as TOML's do (not at U+2028)."""
    deepest = dots = 0
    for token in _TOKENS.finditer(body):
        if token.group() == ".":
            dots += 1
            deepest = max(deepest, dots)
        elif token.group() == "\n":
            dots = 0
    return deepest


_TOKENS = re.compile(r"""
    "{3}(?:[^"\\]|\\[\s\S]|"(?!""))*(?:"{3,5}|\\?\Z)  # multi-line basic string
  | '{3}[\s\S]*?(?:'{3,5}|\Z)                      # multi-line literal string
  | "(?:[^"\\\n]|\\.)*(?:"|\\?(?=\n)|\\?\Z)     # basic string
  | '[^'\n]*'                                    # literal string
  | \#[^\n]*                                     # comment
  | [.\n]""", re.VERBOSE)


def parse(body: str) -> InitData:
    """An init-data document, checked as guest-components and Trustee read it, with its digest."""
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError:
        raise EvidenceError("init-data is not valid Unicode (a lone surrogate)") from None
    if len(raw) > BODY_MAX:
        raise EvidenceError(f"init-data is {len(raw)} bytes, more than {BODY_MAX}")
    if _deepest_line(body) > LINE_DOTS_MAX:
        raise EvidenceError(f"init-data has a line with more than {LINE_DOTS_MAX} dots outside strings: TOML "
                            "keys or table headers that deep are refused (they cost quadratic time to parse)")
    doc = parse_toml(body, "init-data", EvidenceError)
    version, algorithm, data = doc.get("version"), doc.get("algorithm"), doc.get("data")
    if not isinstance(version, str):
        raise EvidenceError("init-data needs a string 'version'")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise EvidenceError(f"init-data algorithm {shown(algorithm)} is not one of {', '.join(ALGORITHMS)}")
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise EvidenceError("init-data needs a [data] table of strings")
    return InitData(version, algorithm, ALGORITHMS[algorithm](raw).digest(), tuple(sorted(data)))
