"""Evidence verification: one verifier per provider, each parse -> verify -> appraise.

``verify()`` dispatches on the provider. Each provider package parses the vendor blob into
frozen records (``abi``), checks signatures, chains and bindings (``verify``) and turns the
records into flat claims for the release policy (``claims``). Every check is recorded with
its name, so a failure names what failed.
"""

from __future__ import annotations

from ..errors import EvidenceError
from .core import PROVIDERS, Check, Checks, Context, Evidence, Stop, Verdict, Verifier
from .fetch import Fetcher
from .trust import TrustStore

__all__ = [
    "PROVIDERS",
    "Check",
    "Context",
    "Evidence",
    "Fetcher",
    "TrustStore",
    "Verdict",
    "guess_provider",
    "verify",
]

def _verifier(provider: str) -> Verifier | None:
    # Imported on use: a command that verifies only TDX quotes never loads the CCA parser.
    if provider == "sev_guest":
        from .snp.verify import verify as snp
        return snp
    if provider == "tdx_guest":
        from .tdx.verify import verify as tdx
        return tdx
    if provider == "arm_cca_guest":
        from .cca.verify import verify as cca
        return cca
    if provider == "sev_aeb":
        from .sev.verify import verify as sev
        return sev
    return None


def verify(evidence: Evidence, context: Context) -> Verdict:
    """Verify ``evidence``; never raises for bad evidence, the verdict says what failed."""
    checks = Checks()
    claims: dict = {}
    verifier = _verifier(evidence.provider)
    try:
        if verifier is None:
            checks.failed("format", f"no verifier for provider {evidence.provider!r}")
        if evidence.event_log and evidence.provider != "tdx_guest":
            checks.skipped("event_log", "an event log is replayed against a TDX quote's RTMRs only: not read")
        verifier(evidence, context, checks, claims)
    except EvidenceError as exc:
        checks.items.append(Check("format", False, str(exc)))
    except Stop:
        pass
    return Verdict(evidence.provider, tuple(checks.items), claims, checks.proven)


def guess_provider(blob: bytes) -> str | None:
    """The provider of a raw report, quote or token, when its shape says so unambiguously."""
    if len(blob) == 0x4A0:
        return "sev_guest"
    if len(blob) == 6460 and blob[208:212] == b"\x01\x00\x00\x00" and blob[216:220] == b"\x04\x10\x00\x00":
        return "sev_aeb"  # an AEB report + CEK (version 1, usage CEK) + PEK + OCA
    if blob[:2] in (b"\x04\x00", b"\x05\x00") and blob[4:8] == b"\x81\x00\x00\x00":
        return "tdx_guest"
    if blob[:3] in (b"\xd9\x01\x8f", b"\xd9\x03\x8b"):  # CBOR tags 399 and 907
        return "arm_cca_guest"
    return None
