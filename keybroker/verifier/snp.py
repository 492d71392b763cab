"""AMD SEV-SNP: parse the ATTESTATION_REPORT, verify it under AMD's chain, appraise its claims.

Layout and checks follow snp.md (AMD SEV-SNP ABI 56860, GHCB 2.03): the 1184-byte report
(versions 2 to 5, little-endian), its ECDSA P-384 signature over bytes 0x000-0x29F (r and
s little-endian), the chain ARK -> ASK -> VCEK or ARK -> ASVK -> VLEK (RSASSA-PSS SHA-384,
salt 48) with the ARK pinned by fingerprint, the VCEK's TCB and hwID extensions against
REPORTED_TCB and CHIP_ID, and SVSM service manifests.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import EvidenceError
from . import Checks, Context, Evidence, check_freshness
from .trust import TrustStore
from .certs import (common_name, der_integer, der_read, extension, fingerprint, is_ec_key,
                    load_cert_dir, load_certs, signed_by_rsa_pss_sha384, valid_at, validity)

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
VERSIONS = (2, 3, 4, 5)
PRODUCTS = ("Milan", "Genoa", "Turin")

# -- the report (abi) -------------------------------------------------------------------


@dataclass(frozen=True)
class Tcb:
    """A TCB_VERSION, decoded with the product's layout (Turin puts FMC first)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def parse(cls, raw: bytes, turin: bool) -> "Tcb":
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


# -- the certificate table (auxblob) ----------------------------------------------------

GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CERT_GUIDS = {GUID_VCEK, GUID_VLEK, GUID_ASK, GUID_ARK}
CERT_TABLE_MAX_ENTRIES = 64


def parse_cert_table(blob: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """The GHCB certificate table: 24-byte entries to an all-zero terminator, then the certs.

    GUIDs are RFC 4122 byte order; a table written in the mixed-endian order is accepted
    too. Entries with unknown GUIDs are kept (they are checked by what they contain).
    """
    if not blob:
        return []
    entries, pos = [], 0
    while True:
        if pos + 24 > len(blob):
            raise EvidenceError("certificate table in auxblob has no terminator")
        raw_guid = blob[pos:pos + 16]
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        if not any(blob[pos:pos + 24]):
            break
        guid = uuid.UUID(bytes=raw_guid)
        if guid not in CERT_GUIDS and uuid.UUID(bytes_le=raw_guid) in CERT_GUIDS:
            guid = uuid.UUID(bytes_le=raw_guid)
        entries.append((guid, offset, length))
        pos += 24
        if len(entries) > CERT_TABLE_MAX_ENTRIES:
            raise EvidenceError(f"certificate table has more than {CERT_TABLE_MAX_ENTRIES} entries")
    header_end = pos + 24
    out = []
    for guid, offset, length in entries:
        if offset < header_end or offset + length > len(blob) or length == 0:
            raise EvidenceError(f"certificate table entry {guid} points outside the table "
                                f"(offset {offset}, length {length}, table {len(blob)} bytes)")
        out.append((guid, blob[offset:offset + length]))
    return out


# -- appraisal: claims ------------------------------------------------------------------

POLICY_BITS = {"smt": 16, "migrate_ma": 18, "debug": 19, "single_socket": 20, "cxl_allow": 21,
               "mem_aes_256_xts": 22, "rapl_dis": 23, "ciphertext_hiding_dram": 24, "page_swap_disable": 25}
PLATFORM_BITS = {"smt_en": 0, "tsme_en": 1, "ecc_en": 2, "rapl_dis": 3, "ciphertext_hiding_dram_en": 4,
                 "alias_check_complete": 5, "iommu_write_safe": 6, "tio_en": 7}


def claims(report: Report, product: str | None) -> dict[str, Any]:
    """The report as flat claims for the release policy."""
    c: dict[str, Any] = {
        "tee": "snp", "provider": "sev_guest",
        "debug": bool(report.policy >> 19 & 1),
        "measurement": report.measurement.hex(),
        "snp.version": report.version,
        "snp.product": product,
        "snp.vmpl": report.vmpl,
        "snp.guest_svn": report.guest_svn,
        "snp.policy": report.policy,
        "snp.policy.abi_major": report.policy >> 8 & 0xFF,
        "snp.policy.abi_minor": report.policy & 0xFF,
        "snp.platform_info": report.platform_info,
        "snp.signing_key": {0: "vcek", 1: "vlek"}.get(report.signing_key, "none"),
        "snp.author_key_en": bool(report.signer_info & 1),
        "snp.mask_chip_key": bool(report.signer_info >> 1 & 1),
        "snp.measurement": report.measurement.hex(),
        "snp.host_data": report.host_data.hex(),
        "snp.id_key_digest": report.id_key_digest.hex(),
        "snp.author_key_digest": report.author_key_digest.hex(),
        "snp.family_id": report.family_id.hex(),
        "snp.image_id": report.image_id.hex(),
        "snp.report_id": report.report_id.hex(),
        "snp.report_id_ma": report.report_id_ma.hex(),
        "snp.chip_id": report.chip_id.hex(),
        "snp.report_data": report.report_data.hex(),
        "snp.firmware.current": "%d.%d.%d" % report.current_version,
        "snp.firmware.committed": "%d.%d.%d" % report.committed_version,
    }
    for name, bit in POLICY_BITS.items():
        c[f"snp.policy.{name}"] = bool(report.policy >> bit & 1)
    for name, bit in PLATFORM_BITS.items():
        c[f"snp.platform_info.{name}"] = bool(report.platform_info >> bit & 1)
    for which in ("reported_tcb", "current_tcb", "committed_tcb", "launch_tcb"):
        for part, value in getattr(report, which).as_dict().items():
            c[f"snp.{which}.{part}"] = value
    if report.cpuid:
        c["snp.cpuid"] = "%02x/%02x/%02x" % report.cpuid
    if report.launch_mit_vector is not None:
        c["snp.launch_mit_vector"] = report.launch_mit_vector
        c["snp.current_mit_vector"] = report.current_mit_vector
    return c


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


def _manifest_claims(manifest: bytes, service_guid: str | None) -> dict[str, Any]:
    c: dict[str, Any] = {"snp.svsm.manifest": manifest.hex()}
    if service_guid is None:
        services = parse_services_manifest(manifest)
        c["snp.svsm.services"] = sorted(str(g) for g in services)
        ek = services.get(GUID_SVSM_VTPM)
    else:
        c["snp.svsm.services"] = [service_guid]
        ek = manifest if uuid.UUID(service_guid) == GUID_SVSM_VTPM else None
    if ek is not None:
        c["snp.svsm.vtpm.ek_public"] = ek.hex()  # TPMT_PUBLIC of the vTPM endorsement key
    return c


# -- verification -----------------------------------------------------------------------

AMD_OID = "1.3.6.1.4.1.3704.1"
SPL_OIDS = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}


@dataclass(frozen=True)
class Chain:
    ark: x509.Certificate
    intermediate: x509.Certificate  # ASK or ASVK
    vek: x509.Certificate


def _product_of(cn: str, prefix: str) -> str | None:
    if cn.startswith(prefix) and cn[len(prefix):] in PRODUCTS:
        return cn[len(prefix):]
    return None


def vek_spl(cert: x509.Certificate, name: str) -> int | None:
    raw = extension(cert, f"{AMD_OID}.{SPL_OIDS[name]}")
    return None if raw is None else der_integer(raw)


def vek_hwid(cert: x509.Certificate) -> bytes | None:
    """The hwID extension: raw bytes as AMD issues it; a DER OCTET STRING is accepted too."""
    raw = extension(cert, f"{AMD_OID}.4")
    if raw is not None and len(raw) in (66, 10) and raw[0] == 0x04:
        tag, content, end = der_read(raw)
        if end == len(raw):
            return content
    return raw


def vek_product_name(cert: x509.Certificate) -> str | None:
    raw = extension(cert, f"{AMD_OID}.2")
    if raw is None:
        return None
    tag, content, _ = der_read(raw)
    return content.decode("ascii", "replace") if tag == 0x16 else None


def _candidates(evidence: Evidence, context: Context) -> list[x509.Certificate]:
    """Certificates from the host's auxblob table, then the operator's folders and anchors."""
    certs = [cert for _, der in parse_cert_table(evidence.auxblob) for cert in load_certs(der)]
    for folder in context.certs:
        certs.extend(load_cert_dir(folder))
    certs.extend(context.trust.anchors())
    return certs


def find_chain(report: Report, certs: list[x509.Certificate], kind: str, trust: TrustStore) -> Chain | str:
    """Pick VEK, intermediate and ARK among ``certs``; a string says what is missing."""
    vek_cn = "SEV-VCEK" if kind == "vcek" else "SEV-VLEK"
    veks = [c for c in certs if common_name(c.subject) == vek_cn]
    if kind == "vcek":
        # Prefer the VCEK of this chip and this TCB (a folder may hold many).
        veks.sort(key=lambda c: (vek_hwid(c) != report.significant_chip_id,
                                 vek_spl(c, "microcode") != report.reported_tcb.microcode))
    if not veks:
        return (f"no {kind.upper()} certificate: the host supplied none in auxblob and none was found "
                "in the certificate folders or AMD's KDS")
    vek = veks[0]
    # The VEK's own issuer; failing that, any AMD intermediate offered, so that the signature
    # check can say which certificate does not sign the VEK.
    intermediates = [c for c in certs if c.subject == vek.issuer] or \
        [c for c in certs if _product_of(common_name(c.subject), "SEV-") or
         _product_of(common_name(c.subject), "SEV-VLEK-")]
    if not intermediates:
        return f"no certificate for the VEK's issuer {common_name(vek.issuer)!r}"
    intermediate = intermediates[0]
    # Among look-alike ARKs (the host fills auxblob), prefer a trusted one.
    arks = sorted((c for c in certs if c.subject == intermediate.issuer), key=lambda c: not trust.is_trusted(c))
    if not arks:
        return f"no ARK certificate {common_name(intermediate.issuer)!r}"
    return Chain(arks[0], intermediate, vek)


def verify(evidence: Evidence, context: Context, checks: Checks, claims_out: dict[str, Any]) -> None:
    report = parse_report(evidence.outblob)
    claims_out.update(claims(report, report.cpuid_product))
    if evidence.manifestblob:
        claims_out.update(_manifest_claims(evidence.manifestblob, evidence.service_guid))
    checks.passed("format", f"SEV-SNP report version {report.version}, {REPORT_SIZE} bytes, reserved fields zero")

    kind = {0: "vcek", 1: "vlek"}.get(report.signing_key)
    if kind is None:
        checks.failed("signer_consistent", f"SIGNING_KEY is {report.signing_key}: the report is not signed "
                                           "by a VCEK or VLEK")
    certs = _candidates(evidence, context)
    chain = find_chain(report, certs, kind, context.trust)  # type: ignore[arg-type]
    if isinstance(chain, str) and context.kds_url is not None:
        from .kds import fetch_chain
        try:
            certs += fetch_chain(report, kind, context)  # type: ignore[arg-type]
        except EvidenceError as exc:
            checks.failed("certificates", f"{chain}; {exc}")
        chain = find_chain(report, certs, kind, context.trust)  # type: ignore[arg-type]
    if isinstance(chain, str):
        checks.failed("certificates", chain)
    assert isinstance(chain, Chain)
    ark, inter, vek = chain.ark, chain.intermediate, chain.vek
    ark_fp = fingerprint(ark)
    checks.require(ark_fp in context.trust.roots, "ark_pinned",
                   f"sha256 {ark_fp[:16]}... of {common_name(ark.subject)} is a trusted root",
                   f"ARK {common_name(ark.subject)!r} (sha256 {ark_fp}) is not a trusted AMD root")
    checks.require(signed_by_rsa_pss_sha384(ark, ark), "ark_self_signed",
                   "RSA-PSS SHA-384 salt 48", "the ARK's self-signature does not verify")
    checks.require(signed_by_rsa_pss_sha384(inter, ark), "ask_signed_by_ark",
                   f"{common_name(inter.subject)} by {common_name(ark.subject)} (RSA-PSS SHA-384 salt 48)",
                   f"{common_name(inter.subject)} is not signed by {common_name(ark.subject)}")
    checks.require(signed_by_rsa_pss_sha384(vek, inter), "vek_signed_by_ask",
                   f"{common_name(vek.subject)} by {common_name(inter.subject)}",
                   f"{common_name(vek.subject)} is not signed by {common_name(inter.subject)}")

    inter_cn = common_name(inter.subject)
    want_prefix = "SEV-" if kind == "vcek" else "SEV-VLEK-"
    product = _product_of(inter_cn, want_prefix)
    checks.require(product is not None, "signer_consistent",
                   f"SIGNING_KEY={report.signing_key} ({kind.upper()}), intermediate {inter_cn}",
                   f"SIGNING_KEY={report.signing_key} ({kind.upper()}) needs an intermediate {want_prefix}<product>, "
                   f"got {inter_cn!r}")
    ark_product = _product_of(common_name(ark.subject), "ARK-")
    name = vek_product_name(vek)
    vek_product = name.split("-")[0] if name else None
    cpuid_product = report.cpuid_product
    consistent = (ark_product == product and vek_product in (None, product)
                  and (report.cpuid is None or cpuid_product == product))
    checks.require(consistent, "product_consistent",
                   f"{product}: ARK, intermediate, VEK productName {name!r}"
                   + (f", CPUID {claims_out['snp.cpuid']}" if report.cpuid else " (v2 report: no CPUID)"),
                   f"products disagree: ARK {ark_product}, intermediate {product}, VEK productName {name!r}, "
                   f"report CPUID {cpuid_product or claims_out.get('snp.cpuid', 'n/a')}")
    claims_out["snp.product"] = product

    checks.require(is_ec_key(vek, ec.SECP384R1), "vek_key", "EC P-384", "the VEK key is not EC P-384")
    expired = [f"{common_name(c.subject)} ({validity(c)})" for c in (ark, inter, vek) if not valid_at(c, context.at)]
    checks.require(not expired, "certificates_valid", f"at {context.at:%Y-%m-%dT%H:%M:%SZ}",
                   f"not valid at {context.at:%Y-%m-%dT%H:%M:%SZ}: {', '.join(expired)}")

    cert_tcb = {part: vek_spl(vek, part) for part in report.reported_tcb.as_dict()}
    checks.require(cert_tcb == report.reported_tcb.as_dict(), "tcb_matches_vek",
                   f"{kind.upper()} SPLs equal REPORTED_TCB {report.reported_tcb.as_dict()}",
                   f"{kind.upper()} SPLs {cert_tcb} differ from REPORTED_TCB {report.reported_tcb.as_dict()}")
    if kind == "vcek":
        hwid = vek_hwid(vek)
        checks.require(any(report.chip_id) and hwid == report.significant_chip_id, "chip_id_matches",
                       f"hwID {report.significant_chip_id.hex()[:16]}... equals CHIP_ID",
                       f"VCEK hwID {(hwid or b'').hex()[:16]}... does not match CHIP_ID "
                       f"{report.significant_chip_id.hex()[:16]}...")
    else:
        checks.require(vek_hwid(vek) is None, "chip_id_matches", "VLEK: not bound to a chip",
                       "a VLEK must not carry a hwID")

    try:
        vek.public_key().verify(encode_dss_signature(report.signature_r, report.signature_s),  # type: ignore[union-attr]
                                report.raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
        checks.passed("report_signature", "ECDSA P-384 SHA-384 over 0x000-0x29F")
    except InvalidSignature:
        checks.failed("report_signature", f"the report signature does not verify under the "
                                          f"{kind.upper()}")

    if evidence.manifestblob:
        manifest = evidence.manifestblob
        check_freshness(report.report_data, evidence, context, checks, what="REPORT_DATA",
                        derive=lambda nonce: hashlib.sha512(nonce + manifest).digest(),
                        rule="SHA-512(nonce || manifest)", name="svsm_manifest_binding")
    else:
        check_freshness(report.report_data, evidence, context, checks, what="REPORT_DATA")
