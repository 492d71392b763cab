"""AMD SEV / SEV-ES (pre-SNP), parsed: AMD's CA certificates, platform certificates, the ATTESTATION report.

Layouts follow the SEV API specification (AMD publication 55766, appendix "certificate
formats" and the ATTESTATION command), checked against AMD's published certificates and a
real Naples platform's (tests/verifier/test_sev_legacy.py). All integers are little-endian,
and so are keys and signatures.

* CA certificate (ARK, ASK): a 64-byte header (version 1, key id, certifying id, usage,
  reserved, exponent and modulus sizes in bits), then exponent, modulus and signature, each
  as long as the modulus: 832 bytes for RSA-2048 (Naples), 1600 for RSA-4096 (Rome on).
* Platform certificate (CEK, PEK, OCA, PDH), 2084 bytes: version 1, the firmware API
  version, the key's usage and algorithm, the key (1028 bytes), two signature slots.
* ATTESTATION report, 208 bytes: MNONCE, LAUNCH_DIGEST, POLICY, SIG_USAGE, SIG_ALGO, SIG1.
* The Attestation Evidence Broker's evidence (Linux proposal "Allow guest to query AMD
  SEV(-ES) runtime attestation evidence", 2022): report, CEK, PEK, OCA packed, 6460 bytes.

Bytes in, frozen records out; nothing is verified here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...errors import EvidenceError

# Key usages (55766, "key usage" table).
ARK, ASK, INVALID, OCA, PEK, PDH, CEK = 0x0, 0x13, 0x1000, 0x1001, 0x1002, 0x1003, 0x1004
USAGES = {ARK: "ARK", ASK: "ASK", INVALID: "none", OCA: "OCA", PEK: "PEK", PDH: "PDH", CEK: "CEK"}
# Algorithms (55766, "algorithm" table); the suffix names the hash a signature uses.
RSA_SHA256, ECDSA_SHA256, ECDH_SHA256 = 0x1, 0x2, 0x3
RSA_SHA384, ECDSA_SHA384, ECDH_SHA384 = 0x101, 0x102, 0x103
ALGOS = {0: "none", RSA_SHA256: "RSA-SHA256", ECDSA_SHA256: "ECDSA-SHA256", ECDH_SHA256: "ECDH-SHA256",
         RSA_SHA384: "RSA-SHA384", ECDSA_SHA384: "ECDSA-SHA384", ECDH_SHA384: "ECDH-SHA384"}
ECDSA_ALGOS = (ECDSA_SHA256, ECDSA_SHA384)
RSA_ALGOS = (RSA_SHA256, RSA_SHA384)
CURVES = {1: ("P-256", 32), 2: ("P-384", 48)}

CA_HEADER_SIZE = 64
CA_MODULUS_BITS = (2048, 4096)
PLATFORM_CERT_SIZE = 2084
PLATFORM_BODY_SIZE = 1044  # what both signature slots sign: everything before the first slot
SIG_SLOT_SIZE = 520
KEY_SIZE = 1028
COORD_SIZE = 72
REPORT_SIZE = 208
# SIG1 signs bytes 0x00-0x33 (MNONCE, LAUNCH_DIGEST, POLICY) with the PEK: SEV API 55766,
# ATTESTATION command, and virtee/sev's LegacyAttestationReport::measurable_bytes.
REPORT_SIGNED_SIZE = 0x34
EVIDENCE_SIZE = REPORT_SIZE + 3 * PLATFORM_CERT_SIZE  # 6460: the AEB's {report, cek, pek, oca}

# POLICY bits (55766, "guest policy"); bits 6-15 are reserved, zero.
POLICY_BITS = {"nodbg": 0, "noks": 1, "es": 2, "nosend": 3, "domain": 4, "sev": 5}
POLICY_RESERVED = 0xFFC0


def usage_name(usage: int) -> str:
    return USAGES.get(usage, f"0x{usage:x}")


def algo_hash(algo: int) -> hashes.HashAlgorithm:
    return hashes.SHA384() if algo >> 8 else hashes.SHA256()


@dataclass(frozen=True)
class CaCert:
    """An ARK or ASK: RSA, RSASSA-PSS with SHA-256 (2048-bit) or SHA-384 (4096-bit), salt = hash length."""

    raw: bytes
    key_id: bytes
    certifying_id: bytes
    usage: int
    modulus_bits: int
    pubexp: int
    modulus: int
    signature: bytes  # big-endian, as RSA verification takes it

    @property
    def body(self) -> bytes:
        return self.raw[:CA_HEADER_SIZE + 2 * (self.modulus_bits // 8)]

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.modulus_bits == 2048 else hashes.SHA384()

    @property
    def self_issued(self) -> bool:
        return self.key_id == self.certifying_id

    @property
    def name(self) -> str:
        return f"{usage_name(self.usage)} {self.key_id.hex()[:8]}"

    def public_key(self) -> rsa.RSAPublicKey:
        return rsa.RSAPublicNumbers(self.pubexp, self.modulus).public_key()


def ca_cert_size(data: bytes, pos: int = 0) -> int:
    """The size of the CA certificate at ``pos``, from its header."""
    if len(data) - pos < CA_HEADER_SIZE:
        raise EvidenceError(f"AMD CA certificate is truncated: {len(data) - pos} bytes, the header alone "
                            f"is {CA_HEADER_SIZE}")
    version, = struct.unpack_from("<I", data, pos)
    pubexp_bits, modulus_bits = struct.unpack_from("<II", data, pos + 56)
    if version != 1:
        raise EvidenceError(f"AMD CA certificate version is {version}, expected 1: not a SEV ARK/ASK")
    if modulus_bits not in CA_MODULUS_BITS or pubexp_bits != modulus_bits:
        raise EvidenceError(f"AMD CA certificate has a {pubexp_bits}-bit exponent and a {modulus_bits}-bit "
                            "modulus; AMD's are 2048/2048 (Naples) or 4096/4096 (Rome and later)")
    return CA_HEADER_SIZE + 3 * (modulus_bits // 8)


def parse_ca_cert(raw: bytes) -> CaCert:
    size = ca_cert_size(raw)
    if len(raw) != size:
        raise EvidenceError(f"AMD CA certificate is {len(raw)} bytes, its header says {size}")
    key_id, certifying_id = raw[4:20], raw[20:36]
    usage, = struct.unpack_from("<I", raw, 36)
    if usage not in (ARK, ASK):
        raise EvidenceError(f"AMD CA certificate has key usage {usage_name(usage)}, expected ARK (0x0) or "
                            "ASK (0x13)")
    if any(raw[40:56]):
        raise EvidenceError("AMD CA certificate has non-zero reserved bytes 40-55")
    n = (size - CA_HEADER_SIZE) // 3
    fields = [raw[CA_HEADER_SIZE + i * n:CA_HEADER_SIZE + (i + 1) * n] for i in range(3)]
    pubexp, modulus = (int.from_bytes(f, "little") for f in fields[:2])
    cert = CaCert(raw, key_id, certifying_id, usage, n * 8, pubexp, modulus, fields[2][::-1])
    try:
        if modulus.bit_length() != n * 8:
            raise ValueError("modulus too short")
        cert.public_key()
    except ValueError:
        raise EvidenceError(f"AMD CA certificate {key_id.hex()[:8]} does not hold an RSA-{n * 8} "
                            "public key") from None
    return cert


def parse_ca_certs(data: bytes, most: int | None = None) -> list[CaCert]:
    """Concatenated CA certificates, as AMD publishes ask_ark_<product>.cert (ASK, then ARK); at most ``most``."""
    certs: list[CaCert] = []
    pos = 0
    if not data:
        raise EvidenceError("no AMD CA certificate: the data is empty")
    while pos < len(data):
        if most is not None and len(certs) == most:
            raise EvidenceError(f"more than {most} AMD CA certificates")
        size = ca_cert_size(data, pos)
        if pos + size > len(data):
            raise EvidenceError(f"AMD CA certificate at byte {pos} is truncated: {len(data) - pos} of {size} bytes")
        certs.append(parse_ca_cert(data[pos:pos + size]))
        pos += size
    return certs


@dataclass(frozen=True)
class SigSlot:
    usage: int  # the signer's key usage
    algo: int
    raw: bytes  # 512 bytes

    @property
    def empty(self) -> bool:
        return self.algo == 0

    def ecdsa_rs(self) -> tuple[int, int]:
        return int.from_bytes(self.raw[:COORD_SIZE], "little"), int.from_bytes(self.raw[COORD_SIZE:144], "little")


@dataclass(frozen=True)
class PlatformCert:
    """A CEK, PEK, OCA or PDH: an EC key (P-256 or P-384) and two signature slots over ``body``."""

    raw: bytes
    api_major: int
    api_minor: int
    usage: int
    algo: int
    curve: int
    x: int
    y: int
    slots: tuple[SigSlot, SigSlot]

    @property
    def body(self) -> bytes:
        return self.raw[:PLATFORM_BODY_SIZE]

    @property
    def name(self) -> str:
        return usage_name(self.usage)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        curve = ec.SECP256R1() if self.curve == 1 else ec.SECP384R1()
        return ec.EllipticCurvePublicNumbers(self.x, self.y, curve).public_key()

    def signed_by(self, usage: int) -> SigSlot | None:
        return next((s for s in self.slots if not s.empty and s.usage == usage), None)


def parse_platform_cert(raw: bytes, expect: int | None = None) -> PlatformCert:
    """A platform certificate; ``expect`` is the key usage its place requires."""
    what = usage_name(expect) if expect is not None else "platform"
    if len(raw) != PLATFORM_CERT_SIZE:
        raise EvidenceError(f"SEV {what} certificate is {len(raw)} bytes, expected {PLATFORM_CERT_SIZE}")
    version, api_major, api_minor, reserved, usage, algo, curve = struct.unpack_from("<IBBHIII", raw, 0)
    if version != 1:
        raise EvidenceError(f"SEV {what} certificate version is {version}, expected 1")
    if reserved:
        raise EvidenceError(f"SEV {what} certificate has a non-zero reserved field")
    if expect is not None and usage != expect:
        raise EvidenceError(f"the {what} certificate's key usage is {usage_name(usage)}, expected "
                            f"{what} (0x{expect:x}): the evidence is not report, CEK, PEK, OCA in that order")
    if usage not in (OCA, PEK, PDH, CEK):
        raise EvidenceError(f"SEV platform certificate has key usage {usage_name(usage)}")
    want = (ECDH_SHA256, ECDH_SHA384) if usage == PDH else ECDSA_ALGOS
    if algo not in want:
        raise EvidenceError(f"SEV {usage_name(usage)} key algorithm is {ALGOS.get(algo, hex(algo))}, expected "
                            f"{' or '.join(ALGOS[a] for a in want)}")
    if curve not in CURVES:
        raise EvidenceError(f"SEV {usage_name(usage)} key is on curve {curve}, expected 1 (P-256) or 2 (P-384)")
    size = CURVES[curve][1]
    qx, qy = raw[20:20 + COORD_SIZE], raw[92:92 + COORD_SIZE]
    if any(qx[size:]) or any(qy[size:]) or any(raw[164:16 + KEY_SIZE]):
        raise EvidenceError(f"SEV {usage_name(usage)} key has non-zero bytes beyond its {CURVES[curve][0]} point")
    slots = []
    for i in range(2):
        pos = PLATFORM_BODY_SIZE + i * SIG_SLOT_SIZE
        s_usage, s_algo = struct.unpack_from("<II", raw, pos)
        slot = SigSlot(s_usage, s_algo, raw[pos + 8:pos + SIG_SLOT_SIZE])
        if slot.empty:
            if s_usage not in (INVALID, 0) or any(slot.raw):
                raise EvidenceError(f"SEV {usage_name(usage)} signature slot {i + 1} has no algorithm but content")
        elif s_algo not in ECDSA_ALGOS + RSA_ALGOS:
            raise EvidenceError(f"SEV {usage_name(usage)} signature slot {i + 1} has algorithm "
                                f"{ALGOS.get(s_algo, hex(s_algo))}, expected RSA or ECDSA")
        elif s_algo in ECDSA_ALGOS and any(slot.raw[144:]):
            raise EvidenceError(f"SEV {usage_name(usage)} signature slot {i + 1} has bytes beyond r and s")
        slots.append(slot)
    cert = PlatformCert(raw, api_major, api_minor, usage, algo, curve, int.from_bytes(qx, "little"),
                        int.from_bytes(qy, "little"), (slots[0], slots[1]))
    try:
        cert.public_key()
    except ValueError:
        raise EvidenceError(f"SEV {usage_name(usage)} key is not a point on {CURVES[curve][0]}") from None
    return cert


@dataclass(frozen=True)
class AttestationReport:
    """The ATTESTATION command's report. It names no firmware build and carries no guest data."""

    raw: bytes
    mnonce: bytes
    launch_digest: bytes
    policy: int
    sig_usage: int
    sig_algo: int
    signature_r: int
    signature_s: int

    @property
    def signed(self) -> bytes:
        return self.raw[:REPORT_SIGNED_SIZE]

    def policy_bit(self, name: str) -> bool:
        return bool(self.policy >> POLICY_BITS[name] & 1)


def parse_report(raw: bytes) -> AttestationReport:
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"SEV attestation report is {len(raw)} bytes, expected {REPORT_SIZE}")
    policy, sig_usage, sig_algo, reserved = struct.unpack_from("<IIII", raw, 0x30)
    if policy & POLICY_RESERVED:
        raise EvidenceError(f"POLICY 0x{policy:08x} has reserved bits 6-15 set")
    if reserved:
        raise EvidenceError("the report's reserved field (0x3C) is not zero")
    if sig_algo not in ECDSA_ALGOS:
        raise EvidenceError(f"SIG_ALGO is {ALGOS.get(sig_algo, hex(sig_algo))}, expected ECDSA-SHA256 (0x2) "
                            "or ECDSA-SHA384 (0x102)")
    sig = raw[0x40:0x40 + 144]
    return AttestationReport(raw, raw[0:0x10], raw[0x10:0x30], policy, sig_usage, sig_algo,
                             int.from_bytes(sig[:COORD_SIZE], "little"), int.from_bytes(sig[COORD_SIZE:], "little"))


@dataclass(frozen=True)
class SevEvidence:
    report: AttestationReport
    cek: PlatformCert
    pek: PlatformCert
    oca: PlatformCert


def parse_evidence(raw: bytes) -> SevEvidence:
    """The AEB's evidence: the report, then the CEK, PEK and OCA certificates, packed."""
    if len(raw) != EVIDENCE_SIZE:
        raise EvidenceError(f"SEV AEB evidence is {len(raw)} bytes, expected {EVIDENCE_SIZE} (a {REPORT_SIZE}-byte "
                            f"report and the CEK, PEK and OCA certificates of {PLATFORM_CERT_SIZE} bytes each)")
    certs = [raw[REPORT_SIZE + i * PLATFORM_CERT_SIZE:REPORT_SIZE + (i + 1) * PLATFORM_CERT_SIZE] for i in range(3)]
    return SevEvidence(parse_report(raw[:REPORT_SIZE]), parse_platform_cert(certs[0], CEK),
                       parse_platform_cert(certs[1], PEK), parse_platform_cert(certs[2], OCA))
