"""Build SEV-SNP evidence to the spec (snp.md) for tests: any product, version and signing key.

Independent of keybroker's emulator: chains use fresh keys (RSA-2048 for speed; the
algorithms are AMD's), reports follow the ABI table field by field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD_OID = "1.3.6.1.4.1.3704.1"
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices")])


def _der_int(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return bytes([0x02, len(body)]) + body


def _cert(subject: str, issuer: str, key, signer, *, extensions=(), ca: bool) -> x509.Certificate:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start.replace(year=2049))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)


@dataclass
class Tcb:
    bootloader: int = 3
    tee: int = 0
    snp: int = 20
    microcode: int = 209
    fmc: int = 1

    def raw(self, product: str) -> bytes:
        if product == "Turin":
            return bytes([self.fmc, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode])
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])


@dataclass
class Platform:
    product: str
    kind: str  # "vcek" or "vlek"
    ark: x509.Certificate
    intermediate: x509.Certificate
    vek: x509.Certificate
    vek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: Tcb
    intermediate_key: rsa.RSAPrivateKey | None = None
    ark_key: rsa.RSAPrivateKey | None = None


def platform(product: str = "Milan", kind: str = "vcek", tcb: Tcb | None = None,
             ark_cn: str | None = None) -> Platform:
    ark_key, inter_key = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    ark_name = ark_cn or f"ARK-{product}"
    inter_name = f"SEV-{product}" if kind == "vcek" else f"SEV-VLEK-{product}"
    ark = _cert(ark_name, ark_name, ark_key, ark_key, ca=True)
    inter = _cert(inter_name, ark_name, inter_key, ark_key, ca=True)
    chip_id = bytes(range(1, 9)) + bytes(56) if product == "Turin" else bytes(range(1, 65))
    made = _issue(product, kind, ark, inter, inter_key, tcb or Tcb(), chip_id if kind == "vcek" else bytes(64))
    return dataclasses.replace(made, ark_key=ark_key)


def crl(p: Platform, revoked: tuple[int, ...] = (), *, signer: rsa.RSAPrivateKey | None = None,
        next_update: dt.datetime | None = None, issued: dt.datetime | None = None) -> x509.CertificateRevocationList:
    """The CRL of ``p``'s ARK (as AMD's KDS serves it, RSA-PSS SHA-384), revoking the ``revoked`` serials."""
    issued = issued or dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(p.ark.subject).last_update(issued)
               .next_update(next_update or dt.datetime(2100, 1, 1, tzinfo=dt.UTC)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build())
    key = signer or p.ark_key
    assert key is not None
    return builder.sign(key, hashes.SHA384(), rsa_padding=PSS)


def issue_vek(p: Platform, tcb: Tcb, chip_id: bytes | None = None) -> Platform:
    """``p`` with a new VEK (fresh key) for ``tcb`` (and ``chip_id``), issued by ``p``'s intermediate."""
    assert p.intermediate_key is not None
    return dataclasses.replace(_issue(p.product, p.kind, p.ark, p.intermediate, p.intermediate_key, tcb,
                                      p.chip_id if chip_id is None else chip_id), ark_key=p.ark_key)


def _issue(product: str, kind: str, ark: x509.Certificate, inter: x509.Certificate, inter_key: rsa.RSAPrivateKey,
           tcb: Tcb, chip_id: bytes) -> Platform:
    turin = product == "Turin"
    vek_key = ec.generate_private_key(ec.SECP384R1())
    ext = [(f"{AMD_OID}.1", _der_int(1 if turin else 0)),
           (f"{AMD_OID}.2", bytes([0x16, len(product)]) + product.encode()),
           (f"{AMD_OID}.3.1", _der_int(tcb.bootloader)), (f"{AMD_OID}.3.2", _der_int(tcb.tee)),
           (f"{AMD_OID}.3.3", _der_int(tcb.snp)), (f"{AMD_OID}.3.8", _der_int(tcb.microcode))]
    if turin:
        ext.append((f"{AMD_OID}.3.9", _der_int(tcb.fmc)))
    if kind == "vcek":
        ext.append((f"{AMD_OID}.4", chip_id[:8] if turin else chip_id))
    else:
        ext.append((f"{AMD_OID}.5", bytes([0x16, 9]) + b"csp.cloud"))
    inter_name = str(inter.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    vek = _cert("SEV-VCEK" if kind == "vcek" else "SEV-VLEK", inter_name, vek_key, inter_key,
                extensions=ext, ca=False)
    return Platform(product, kind, ark, inter, vek, vek_key, chip_id, tcb, inter_key)


def report(p: Platform, *, version: int = 5, report_data: bytes = bytes(64), vmpl: int = 0,
           policy: int = 0x30000, measurement: bytes = b"\x42" * 48) -> bytes:
    r = bytearray(0x4A0)
    tcb = p.tcb.raw(p.product)
    struct.pack_into("<IIQ", r, 0, version, 1, policy)
    struct.pack_into("<II", r, 0x30, vmpl, 1)
    r[0x38:0x40] = tcb
    struct.pack_into("<Q", r, 0x40, 0x1 | (0x40 if p.product == "Turin" else 0))  # Turin sets bit 6
    struct.pack_into("<I", r, 0x48, (0 if p.kind == "vcek" else 1) << 2)
    r[0x50:0x90] = report_data
    r[0x90:0xC0] = measurement
    r[0x160:0x180] = b"\xff" * 32
    r[0x180:0x188] = tcb
    if version >= 3:
        r[0x188:0x18B] = bytes(CPUID[p.product])
    r[0x1A0:0x1E0] = p.chip_id
    r[0x1E0:0x1E8] = tcb
    r[0x1E8:0x1EB] = bytes([61, 55, 1])
    r[0x1F0:0x1F8] = tcb
    if version >= 5:
        struct.pack_into("<QQ", r, 0x1F8, 1, 1)
    sig_r, sig_s = decode_dss_signature(p.vek_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
    r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
    return bytes(r)


def cert_table(entries: list[tuple[str, bytes]]) -> bytes:
    """The GHCB certificate table from (GUID string, DER) pairs."""
    import uuid

    offset = 24 * (len(entries) + 1)
    head, body = bytearray(), bytearray()
    for guid, der in entries:
        head += uuid.UUID(guid).bytes + struct.pack("<II", offset + len(body), len(der))
        body += der
    return bytes(head) + bytes(24) + bytes(body)
