"""AMD SEV-SNP, parsed: the ATTESTATION_REPORT, the host's certificate table, SVSM manifests, VEK extensions.

Layouts follow snp.md (AMD SEV-SNP ABI 56860, GHCB 2.03): the 1184-byte report (versions
2 to 5, little-endian; every reserved range must be zero), the GHCB certificate table in
``auxblob``, the SVSM "all services" manifest, and the AMD extensions of VCEK/VLEK
certificates (SPLs, hwID, productName). Bytes in, frozen records out; nothing is verified.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from cryptography import x509

from ...errors import EvidenceError
from ..certs import der_integer, der_read, extension, remembered

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
VERSIONS = (2, 3, 4, 5)
PRODUCTS = ("Milan", "Genoa", "Turin")


@dataclass(frozen=True)
class Tcb:
    """A TCB_VERSION, decoded with the product's layout (Turin puts FMC first)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def parse(cls, raw: bytes, turin: bool) -> Tcb:
        if turin:
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        d = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            d["fmc"] = self.fmc
        return d


@dataclass(frozen=True)
class Report:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: Tcb
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: Tcb
    cpuid: tuple[int, int, int] | None  # family, model, stepping (v3+)
    chip_id: bytes
    committed_tcb: Tcb
    current_version: tuple[int, int, int]    # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb: Tcb
    launch_mit_vector: int | None  # v5
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> 2) & 0b111

    @property
    def turin(self) -> bool:
        return self.cpuid is not None and self.cpuid[0] == 0x1A

    @property
    def cpuid_product(self) -> str | None:
        if self.cpuid is None:
            return None
        family, model, _ = self.cpuid
        if family == 0x19 and model <= 0x0F:
            return "Milan"
        if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
            return "Genoa"
        if family == 0x1A and model <= 0x11:
            return "Turin"
        return None

    @property
    def significant_chip_id(self) -> bytes:
        return self.chip_id[:8] if self.turin else self.chip_id


def parse_report(raw: bytes) -> Report:
    """Parse and structurally check an ATTESTATION_REPORT (every reserved range must be zero)."""
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"SEV-SNP report is {len(raw)} bytes, expected {REPORT_SIZE}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x000)
    if version not in VERSIONS:
        raise EvidenceError(f"unsupported SEV-SNP report version {version} (known: 2 to 5)")
    vmpl, algo = struct.unpack_from("<II", raw, 0x030)
    platform_info, signer_info = struct.unpack_from("<QI", raw, 0x040)
    if algo != 1:
        raise EvidenceError(f"SIGNATURE_ALGO is {algo}, expected 1 (ECDSA P-384 with SHA-384)")
    if vmpl > 3:
        raise EvidenceError(f"VMPL {vmpl} is out of range 0-3")
    if not policy & (1 << 17) or policy >> 26:
        raise EvidenceError(f"POLICY 0x{policy:x} has reserved bits wrong (bit 17 must be 1, bits 63:26 zero)")
    if signer_info >> 5:
        raise EvidenceError(f"SIGNER_INFO 0x{signer_info:x} has reserved bits set")
    cpuid = tuple(raw[0x188:0x18B]) if version >= 3 else None
    mbz = [(0x04C, 0x050), (0x18B if cpuid else 0x188, 0x1A0), (0x1EB, 0x1EC), (0x1EF, 0x1F0),
           (0x208 if version >= 5 else 0x1F8, SIGNED_SIZE), (0x330, REPORT_SIZE)]
    for start, end in mbz:
        if any(raw[start:end]):
            raise EvidenceError(f"reserved bytes 0x{start:03X}-0x{end - 1:03X} are not zero")
    r_raw, s_raw = raw[0x2A0:0x2E8], raw[0x2E8:0x330]
    if any(r_raw[48:]) or any(s_raw[48:]):
        raise EvidenceError("signature r/s have non-zero bytes beyond the 48 a P-384 value needs")
    turin = cpuid is not None and cpuid[0] == 0x1A

    def tcb(offset: int) -> Tcb:
        return Tcb.parse(raw[offset:offset + 8], turin)

    return Report(
        raw=raw, version=version, guest_svn=guest_svn, policy=policy,
        family_id=raw[0x010:0x020], image_id=raw[0x020:0x030], vmpl=vmpl, signature_algo=algo,
        current_tcb=tcb(0x038), platform_info=platform_info, signer_info=signer_info,
        report_data=raw[0x050:0x090], measurement=raw[0x090:0x0C0], host_data=raw[0x0C0:0x0E0],
        id_key_digest=raw[0x0E0:0x110], author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160], report_id_ma=raw[0x160:0x180], reported_tcb=tcb(0x180),
        cpuid=cpuid, chip_id=raw[0x1A0:0x1E0], committed_tcb=tcb(0x1E0),  # type: ignore[arg-type]
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]), launch_tcb=tcb(0x1F0),
        launch_mit_vector=struct.unpack_from("<Q", raw, 0x1F8)[0] if version >= 5 else None,
        current_mit_vector=struct.unpack_from("<Q", raw, 0x200)[0] if version >= 5 else None,
        signature_r=int.from_bytes(r_raw, "little"), signature_s=int.from_bytes(s_raw, "little"),
    )


# -- SVSM service manifests -------------------------------------------------------------

GUID_SVSM_SERVICES = uuid.UUID("63849ebb-3d92-4670-a1ff-58f9c94b87bb")
GUID_SVSM_VTPM = uuid.UUID("c476f1eb-0123-45a5-9641-b4e7dde5bfe3")


def parse_services_manifest(manifest: bytes) -> dict[uuid.UUID, bytes]:
    """An SVSM "all services" manifest: GUID table header, entries, data (GUIDs little-endian)."""
    if len(manifest) < 24 or uuid.UUID(bytes_le=manifest[:16]) != GUID_SVSM_SERVICES:
        raise EvidenceError("SVSM manifest does not start with the services GUID table")
    total, count = struct.unpack_from("<II", manifest, 16)
    if total != len(manifest) or 24 + 24 * count > total:
        raise EvidenceError(f"SVSM manifest sizes are inconsistent (total {total}, {count} entries, "
                            f"{len(manifest)} bytes)")
    services = {}
    for i in range(count):
        pos = 24 + 24 * i
        guid = uuid.UUID(bytes_le=manifest[pos:pos + 16])
        offset, length = struct.unpack_from("<II", manifest, pos + 16)
        if offset < 24 + 24 * count or offset + length > total:
            raise EvidenceError(f"SVSM manifest entry {guid} points outside the manifest")
        services[guid] = manifest[offset:offset + length]
    return services


# -- AMD extensions of VCEK and VLEK certificates ---------------------------------------

AMD_OID = "1.3.6.1.4.1.3704.1"
SPL_OIDS = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}


@remembered
def vek_spl(cert: x509.Certificate, name: str) -> int | None:
    raw = extension(cert, f"{AMD_OID}.{SPL_OIDS[name]}")
    return None if raw is None else der_integer(raw)


@remembered
def vek_hwid(cert: x509.Certificate) -> bytes | None:
    """The hwID extension: raw bytes as AMD issues it; a DER OCTET STRING is accepted too."""
    raw = extension(cert, f"{AMD_OID}.4")
    if raw is not None and len(raw) in (66, 10) and raw[0] == 0x04:
        _tag, content, end = der_read(raw)
        if end == len(raw):
            return content
    return raw


@remembered
def vek_product_name(cert: x509.Certificate) -> str | None:
    raw = extension(cert, f"{AMD_OID}.2")
    if raw is None:
        return None
    tag, content, _ = der_read(raw)
    return content.decode("ascii", "replace") if tag == 0x16 else None
