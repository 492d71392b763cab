"""Intel PCK certificates: the SGX extension of the PCK leaf and the chain to the root.

The PCK leaf (CN "Intel SGX PCK Certificate") carries the SGX extension, OID
1.2.840.113741.1.13.1, a SEQUENCE of {OID, value}: ``.1`` PPID, ``.2`` TCB (``.2.1``-``.2.16``
the SGX TCB component SVNs, ``.2.17`` PCESVN, ``.2.18`` CPUSVN), ``.3`` PCE-ID, ``.4`` FMSPC,
``.5`` SGX type, and on certificates of the Platform CA ``.6`` PlatformInstanceID and ``.7``
Configuration (``.7.1`` dynamicPlatform, ``.7.2`` cachedKeys, ``.7.3`` SMTEnabled) (tdx.md
section 6). Its issuer is "Intel SGX PCK Platform CA" or "Intel SGX PCK Processor CA", whose
issuer is the Intel SGX Root CA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from ...errors import EvidenceError
from ..certs import der_integer, der_items, der_oid, der_read, extension, issuer_cn, names_issuer, subject_cn

SGX_OID = "1.2.840.113741.1.13.1"
PCK_LEAF_CN = "SGX PCK Certificate"
PCK_CA_NAMES = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}
TCB_SIGNING_CN = "Intel SGX TCB Signing"


@dataclass(frozen=True)
class PckInfo:
    """What the PCK leaf says about the platform: which one (FMSPC) and at which TCB."""

    fmspc: bytes
    pce_id: bytes
    pcesvn: int
    cpusvn: bytes
    tcb_components: tuple[int, ...]  # the 16 SGX TCB component SVNs
    sgx_type: int | None
    platform_instance_id: bytes | None = None  # Platform CA certificates only
    configuration: dict[str, bool] | None = None  # dynamic_platform, cached_keys, smt_enabled


def pck_info(leaf: x509.Certificate) -> PckInfo:
    """Parse the SGX extension of a PCK leaf (hostile input: every length and type checked)."""
    raw = extension(leaf, SGX_OID)
    if raw is None:
        raise EvidenceError("the PCK certificate has no SGX extension (OID 1.2.840.113741.1.13.1)")
    tag, content, end = der_read(raw)
    if tag != 0x30 or end != len(raw):
        raise EvidenceError("the PCK certificate's SGX extension is not one DER SEQUENCE")
    fields = _oid_values(content, SGX_OID)
    for name, suffix in (("TCB", "2"), ("PCE-ID", "3"), ("FMSPC", "4")):
        if suffix not in fields:
            raise EvidenceError(f"the PCK certificate's SGX extension has no {name} ({SGX_OID}.{suffix})")
    fmspc = _octets(fields["4"], 6, "FMSPC")
    pce_id = _octets(fields["3"], 2, "PCE-ID")
    tcb_tag, tcb_content = fields["2"]
    if tcb_tag != 0x30:
        raise EvidenceError("the PCK certificate's TCB is not a SEQUENCE")
    tcb = _oid_values(tcb_content, f"{SGX_OID}.2")
    missing = [s for s in map(str, range(1, 19)) if s not in tcb]
    if missing:
        raise EvidenceError(f"the PCK certificate's TCB lacks component(s) {', '.join(missing)}")
    components = tuple(_small_int(tcb[str(i)], 255, f"SGX TCB component {i}") for i in range(1, 17))
    pcesvn = _small_int(tcb["17"], 0xFFFF, "PCESVN")
    cpusvn = _octets(tcb["18"], 16, "CPUSVN")
    sgx_type = None
    if "5" in fields:
        type_tag, type_content = fields["5"]
        if type_tag != 0x0A or len(type_content) != 1:
            raise EvidenceError("the PCK certificate's SGX type is not a one-byte ENUMERATED")
        sgx_type = type_content[0]
    instance = _octets(fields["6"], 16, "PlatformInstanceID") if "6" in fields else None
    return PckInfo(fmspc, pce_id, pcesvn, cpusvn, components, sgx_type, instance,
                   _configuration(fields["7"]) if "7" in fields else None)


_CONFIGURATION = {"1": "dynamic_platform", "2": "cached_keys", "3": "smt_enabled"}


def _configuration(value: tuple[int, bytes]) -> dict[str, bool]:
    tag, content = value
    if tag != 0x30:
        raise EvidenceError("the PCK certificate's Configuration is not a SEQUENCE")
    out = {}
    for suffix, (flag_tag, flag) in _oid_values(content, f"{SGX_OID}.7").items():
        if suffix in _CONFIGURATION:
            if flag_tag != 0x01 or len(flag) != 1:
                raise EvidenceError(f"the PCK certificate's Configuration .{suffix} is not a BOOLEAN")
            out[_CONFIGURATION[suffix]] = flag != b"\x00"
    return out


def _oid_values(content: bytes, prefix: str) -> dict[str, tuple[int, bytes]]:
    """{suffix: (tag, content)} of a SEQUENCE OF SEQUENCE {OID, value} under ``prefix``."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, item in der_items(content):
        parts = der_items(item) if tag == 0x30 else []
        if len(parts) != 2 or parts[0][0] != 0x06:
            raise EvidenceError(f"malformed entry in the PCK certificate's extension {prefix}")
        oid = der_oid(parts[0][1])
        if oid.startswith(prefix + ".") and oid.count(".") == prefix.count(".") + 1:
            suffix = oid[len(prefix) + 1:]
            if suffix in out:
                raise EvidenceError(f"the PCK certificate's extension repeats {oid}")
            out[suffix] = parts[1]
    return out


def _octets(value: tuple[int, bytes], size: int, name: str) -> bytes:
    tag, content = value
    if tag != 0x04 or len(content) != size:
        raise EvidenceError(f"the PCK certificate's {name} is not an OCTET STRING of {size} bytes")
    return content


def _small_int(value: tuple[int, bytes], maximum: int, name: str) -> int:
    tag, content = value
    if tag != 0x02 or len(content) > 3:
        raise EvidenceError(f"the PCK certificate's {name} is not a small INTEGER")
    number = der_integer(bytes([0x02, len(content)]) + content)
    if number > maximum:
        raise EvidenceError(f"the PCK certificate's {name} is {number}, above {maximum}")
    return number


@dataclass(frozen=True)
class PckChain:
    leaf: x509.Certificate
    ca: x509.Certificate
    root: x509.Certificate | None  # None: no certificate issued the CA among those offered

    @property
    def ca_kind(self) -> str | None:
        """``platform`` or ``processor``: which PCK CRL applies (None for an unknown CA name)."""
        return PCK_CA_NAMES.get(subject_cn(self.ca))


def pck_chain(offered: list[x509.Certificate], anchors: list[x509.Certificate],
              is_trusted: Callable[[x509.Certificate], bool]) -> PckChain:
    """Pick leaf, CA and root by their names: the quote's own certificates first for the leaf
    and CA; for the root, a trusted one among the quote's, the operator's and the anchors."""
    leaves = [c for c in offered if PCK_LEAF_CN in subject_cn(c)]
    if not leaves:
        raise EvidenceError("the quote's certification data has no PCK leaf certificate "
                            f"(CN containing {PCK_LEAF_CN!r})")
    leaf = leaves[0]
    cas = [c for c in offered if names_issuer(leaf, c) and c is not leaf]
    if not cas:
        raise EvidenceError(f"the quote's certification data has no certificate for the PCK's issuer "
                            f"{issuer_cn(leaf)!r}")
    ca = cas[0]
    roots = sorted((c for c in offered + anchors if names_issuer(ca, c)), key=lambda c: not is_trusted(c))
    return PckChain(leaf, ca, roots[0] if roots else None)
