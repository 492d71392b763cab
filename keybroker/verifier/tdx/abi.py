"""Intel TDX, parsed: a DCAP quote (v4, v5) into frozen records.

Layout follows tdx.md (Intel TDX DCAP Quoting Library API): a 48-byte header, in v5 a
6-byte body descriptor, a TD report body (TDX 1.0: 584 bytes, TDX 1.5: 648), then the
signature data: the attestation key's signature and public key, and certification data
type 6 holding the quoting enclave's report, its signature, the QE authentication data and
certification data type 5, the PEM PCK chain. Every length is checked against the buffer.
Bytes after the declared signature data (zero padding, test strings) are unsigned and
counted, not parsed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509

from ...errors import EvidenceError
from ..certs import load_certs

QUOTE_MAX = 1024 * 1024  # real quotes are ~5 KB; kernels hand out at most a few pages of padding




ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_TD10, BODY_TD15 = 2, 3
BODY_SIZES = {BODY_TD10: 584, BODY_TD15: 648}
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
QE_REPORT_SIZE = 384
CHAIN_CERTS_MAX = 8


@dataclass(frozen=True)
class TdReport:
    """The TD report body: TDX 1.0 fields, plus TEE_TCB_SVN_2 and MRSERVICETD for TDX 1.5."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn_2: bytes | None = None
    mrservicetd: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> TdReport:
        def at(offset: int, size: int) -> bytes:
            return raw[offset:offset + size]

        extra = {}
        if len(raw) == BODY_SIZES[BODY_TD15]:
            extra = {"tee_tcb_svn_2": at(584, 16), "mrservicetd": at(600, 48)}
        return cls(tee_tcb_svn=at(0, 16), mrseam=at(16, 48), mrsignerseam=at(64, 48),
                   seam_attributes=at(112, 8), td_attributes=at(120, 8), xfam=at(128, 8),
                   mrtd=at(136, 48), mrconfigid=at(184, 48), mrowner=at(232, 48), mrownerconfig=at(280, 48),
                   rtmrs=(at(328, 48), at(376, 48), at(424, 48), at(472, 48)), report_data=at(520, 64), **extra)

    @property
    def td_attributes_value(self) -> int:
        return int.from_bytes(self.td_attributes, "little")


@dataclass(frozen=True)
class QeReport:
    """The TD quoting enclave's SGX REPORTBODY (384 bytes)."""

    raw: bytes
    cpusvn: bytes
    miscselect: bytes
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> QeReport:
        isvprodid, isvsvn = struct.unpack_from("<HH", raw, 256)
        return cls(raw=raw, cpusvn=raw[0:16], miscselect=raw[16:20], attributes=raw[48:64],
                   mrenclave=raw[64:96], mrsigner=raw[128:160], isvprodid=isvprodid, isvsvn=isvsvn,
                   report_data=raw[320:384])


@dataclass(frozen=True)
class Quote:
    version: int
    body_type: int
    user_data: bytes
    body: TdReport
    signed: bytes               # header || [descriptor] || body: what the AK signed
    signature: bytes            # r || s
    attestation_key: bytes      # X || Y
    qe_report: QeReport
    qe_report_signature: bytes  # r || s, by the PCK leaf
    qe_auth_data: bytes
    certs: tuple[x509.Certificate, ...]  # the PCK chain from certification data type 5
    trailing: int               # unsigned bytes after the signature data


class _Reader:
    """Bounded reads from a hostile buffer: every length is checked before use."""

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, start, end, what

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise EvidenceError(f"TDX quote truncated while reading {field} in {self.what} "
                                f"(need {size} bytes at offset {self.pos}, have {max(self.end - self.pos, 0)})")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def u16(self, field: str) -> int:
        return struct.unpack("<H", self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return struct.unpack("<I", self.take(4, field))[0]


def parse_quote(raw: bytes) -> Quote:
    """Parse a TDX quote v4 or v5 (body type 2 or 3) with QE report certification data."""
    if len(raw) > QUOTE_MAX:
        raise EvidenceError(f"TDX quote is {len(raw)} bytes, more than the {QUOTE_MAX} accepted")
    r = _Reader(raw, 0, len(raw), "the quote")
    version, key_type, tee_type = struct.unpack("<HHI", r.take(8, "header"))
    r.take(4, "header")  # reserved for TDX (QE/PCE SVN in SGX v3 quotes)
    vendor, user_data = r.take(16, "QE vendor ID"), r.take(20, "user data")
    if version not in (4, 5):
        raise EvidenceError(f"unsupported TDX quote version {version} (known: 4 and 5)")
    if tee_type != TEE_TYPE_TDX:
        raise EvidenceError(f"TEE type 0x{tee_type:08x} is not TDX (0x00000081)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise EvidenceError(f"attestation key type {key_type} is not 2 (ECDSA P-256)")
    if vendor != INTEL_QE_VENDOR_ID:
        raise EvidenceError(f"QE vendor ID {vendor.hex()} is not Intel's {INTEL_QE_VENDOR_ID.hex()}")
    body_type = BODY_TD10
    if version == 5:
        body_type, body_size = r.u16("body type"), r.u32("body size")
        if body_type not in BODY_SIZES:
            raise EvidenceError(f"quote v5 body type {body_type} is not a TD report (2: TDX 1.0, 3: TDX 1.5)")
        if body_size != BODY_SIZES[body_type]:
            raise EvidenceError(f"quote v5 body type {body_type} has size {body_size}, "
                                f"expected {BODY_SIZES[body_type]}")
    body = TdReport.parse(r.take(BODY_SIZES[body_type], "TD report body"))
    signed = raw[:r.pos]

    sig_len = r.u32("signature data length")
    sig = _Reader(raw, r.pos, r.pos + sig_len, "the signature data")
    if sig.end > len(raw):
        raise EvidenceError(f"TDX quote truncated: the signature data needs {sig_len} bytes at offset "
                            f"{r.pos}, have {len(raw) - r.pos}")
    signature, attestation_key = sig.take(64, "quote signature"), sig.take(64, "attestation key")
    cert_type, cert_size = sig.u16("certification data type"), sig.u32("certification data size")
    if cert_type != CERT_DATA_QE_REPORT:
        raise EvidenceError(f"certification data type {cert_type} is not 6 (QE report certification data)")
    qe = _Reader(raw, sig.pos, sig.pos + cert_size, "the QE report certification data")
    sig.take(cert_size, "QE report certification data")
    qe_report = QeReport.parse(qe.take(QE_REPORT_SIZE, "QE report"))
    qe_report_signature = qe.take(64, "QE report signature")
    qe_auth_data = qe.take(qe.u16("QE authentication data size"), "QE authentication data")
    inner_type, inner_size = qe.u16("PCK certification data type"), qe.u32("PCK certification data size")
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise EvidenceError(f"PCK certification data type {inner_type} is not 5 (PEM PCK chain); types 1-4 "
                            "need the PCK certificate from Intel's PCS, which keybroker does not fetch")
    pem = qe.take(inner_size, "PCK certificate chain")
    if b"-----BEGIN CERTIFICATE-----" not in pem or pem.count(b"-----BEGIN") > CHAIN_CERTS_MAX:
        raise EvidenceError(f"the PCK chain must be 1 to {CHAIN_CERTS_MAX} PEM certificates")
    certs = load_certs(pem.rstrip(b"\0"))
    return Quote(version=version, body_type=body_type, user_data=user_data, body=body, signed=signed,
                 signature=signature, attestation_key=attestation_key, qe_report=qe_report,
                 qe_report_signature=qe_report_signature, qe_auth_data=qe_auth_data, certs=tuple(certs),
                 trailing=len(raw) - sig.end)
