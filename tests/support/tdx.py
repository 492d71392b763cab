"""Build TDX quotes and Intel collateral to the spec (tdx.md) for tests: any version and body.

Independent of keybroker's emulator: a fresh P-256 chain (a look-alike "Intel SGX Root CA",
a PCK Platform or Processor CA, a PCK leaf with the SGX extension, a TCB signing
certificate), quotes laid out field by field, TCB info and QE identity signed over their
exact bytes, CRLs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

SGX = "1.2.840.113741.1.13.1"
INTEL_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
ISSUED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NEXT_UPDATE = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
AT = dt.datetime(2026, 1, 15, tzinfo=dt.UTC)  # inside the collateral's validity


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _der(0x30, _oid(oid) + value)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation")])


def _cert(cn: str, issuer: str, key, signer, *, ca: bool, extensions=()) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(START).not_valid_after(START.replace(year=2049))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA256())


def raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class Platform:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    signing: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    ak: ec.EllipticCurvePrivateKey
    fmspc: bytes
    components: tuple[int, ...]
    pcesvn: int


def _platform_fields(ca_name: str) -> bytes:
    """PlatformInstanceID and Configuration: what a PCK from the Platform CA carries, and only it."""
    if "Platform" not in ca_name:
        return b""
    config = b"".join(_pair(f"{SGX}.7.{i}", _der(0x01, b"\xff" if on else b"\0"))
                      for i, on in ((1, False), (2, True), (3, False)))
    return _pair(f"{SGX}.6", _der(0x04, bytes(range(16)))) + _pair(f"{SGX}.7", _der(0x30, config))


def platform(*, ca_name: str = "Intel SGX PCK Platform CA", components=(4, 4, 2, 2, 4, 1, 0, 5) + (0,) * 8,
             pcesvn: int = 13, fmspc: bytes = bytes.fromhex("b0c06f000000")) -> Platform:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]
    root_key, ca_key, pck_key, signing_key, ak = keys
    root = _cert("Intel SGX Root CA", "Intel SGX Root CA", root_key, root_key, ca=True)
    ca = _cert(ca_name, "Intel SGX Root CA", ca_key, root_key, ca=True)
    tcb = b"".join(_pair(f"{SGX}.2.{i + 1}", _int(svn)) for i, svn in enumerate(components))
    tcb += _pair(f"{SGX}.2.17", _int(pcesvn)) + _pair(f"{SGX}.2.18", _der(0x04, bytes(components)))
    sgx = _der(0x30, _pair(f"{SGX}.1", _der(0x04, bytes(16))) + _pair(f"{SGX}.2", _der(0x30, tcb))
               + _pair(f"{SGX}.3", _der(0x04, b"\0\0")) + _pair(f"{SGX}.4", _der(0x04, fmspc))
               + _pair(f"{SGX}.5", _der(0x0A, b"\0")) + _platform_fields(ca_name))
    pck = _cert("Intel SGX PCK Certificate", ca_name, pck_key, ca_key, ca=False,
                extensions=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX), sgx)])
    signing = _cert("Intel SGX TCB Signing", "Intel SGX Root CA", signing_key, root_key, ca=False)
    return Platform(root, root_key, ca, ca_key, pck, pck_key, signing, signing_key, ak, fmspc,
                    tuple(components), pcesvn)


@dataclass
class Td:
    """The TD report fields a test sets; the rest are recognisable filler."""

    report_data: bytes = bytes(range(64))
    tee_tcb_svn: bytes = bytes([6, 1, 4]) + bytes(13)
    tee_tcb_svn_2: bytes = bytes([6, 1, 4]) + bytes(13)
    td_attributes: bytes = (1 << 28).to_bytes(8, "little")
    mrsignerseam: bytes = bytes(48)
    mrtd: bytes = field(default_factory=lambda: hashlib.sha384(b"mrtd").digest())
    rtmrs: tuple[bytes, ...] = tuple(hashlib.sha384(b"rtmr%d" % i).digest() for i in range(4))
    mrservicetd: bytes = bytes(48)
    qe_isvsvn: int = 7


def body(td: Td, body_type: int) -> bytes:
    out = b"".join([td.tee_tcb_svn, hashlib.sha384(b"mrseam").digest(), td.mrsignerseam, bytes(8),
                    td.td_attributes, (0x602E7).to_bytes(8, "little"), td.mrtd, hashlib.sha384(b"cfg").digest(),
                    bytes(48), bytes(48), *td.rtmrs, td.report_data])
    if body_type == 3:
        out += td.tee_tcb_svn_2 + td.mrservicetd
    return out


def quote(p: Platform, td: Td | None = None, *, version: int = 4, body_type: int = 2, trailing: bytes = b"",
          chain: bytes | None = None) -> bytes:
    td = td or Td()
    header = struct.pack("<HHIHH", version, 2, 0x81, 0, 0) + INTEL_VENDOR + bytes(20)
    descriptor = struct.pack("<HI", body_type, {2: 584, 3: 648}[body_type]) if version == 5 else b""
    signed = header + descriptor + body(td, body_type)
    numbers = p.ak.public_key().public_numbers()
    ak = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    auth = bytes(range(32))
    qe_report = (bytes(p.components) + bytes(4) + bytes(28) + bytes.fromhex("1500000000000000e700000000000000")
                 + hashlib.sha256(b"qe").digest() + bytes(32) + QE_MRSIGNER + bytes(96)
                 + struct.pack("<HH", 2, td.qe_isvsvn) + bytes(60) + hashlib.sha256(ak + auth).digest() + bytes(32))
    chain = (pem(p.pck, p.ca, p.root) + b"\0") if chain is None else chain
    cert_data = (qe_report + raw_sig(p.pck_key, qe_report) + struct.pack("<H", len(auth)) + auth
                 + struct.pack("<HI", 5, len(chain)) + chain)
    sig_data = raw_sig(p.ak, signed) + ak + struct.pack("<HI", 6, len(cert_data)) + cert_data
    return signed + struct.pack("<I", len(sig_data)) + sig_data + trailing


# -- collateral ----------------------------------------------------------------------------

def stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def level(sgx, pcesvn, tdx, status="UpToDate", date="2025-05-14T00:00:00Z", advisories=()) -> dict:
    out = {"tcb": {"sgxtcbcomponents": [{"svn": s} for s in sgx], "pcesvn": pcesvn,
                   "tdxtcbcomponents": [{"svn": s} for s in tdx]}, "tcbDate": date, "tcbStatus": status}
    if advisories:
        out["advisoryIDs"] = list(advisories)
    return out


def isv_level(isvsvn, status="UpToDate", advisories=()) -> dict:
    out = {"tcb": {"isvsvn": isvsvn}, "tcbDate": "2025-05-14T00:00:00Z", "tcbStatus": status}
    if advisories:
        out["advisoryIDs"] = list(advisories)
    return out


def tcb_info(p: Platform, *, levels=None, module_levels=None, module_id="TDX_01") -> dict:
    """A TDX TCB info for ``p`` whose one level matches its PCK and the default TD exactly."""
    module = {"mrsigner": "00" * 48, "attributes": "0000000000000000", "attributesMask": "FFFFFFFFFFFFFFFF"}
    return {"id": "TDX", "version": 3, "issueDate": stamp(ISSUED), "nextUpdate": stamp(NEXT_UPDATE),
            "fmspc": p.fmspc.hex().upper(), "pceId": "0000", "tcbType": 0, "tcbEvaluationDataNumber": 19,
            "tdxModule": module,
            "tdxModuleIdentities": [{"id": module_id, **module,
                                     "tcbLevels": module_levels or [isv_level(6)]}],
            "tcbLevels": levels or [level(p.components, p.pcesvn, [6, 0, 4] + [0] * 13)]}


def qe_identity(*, levels=None, mrsigner: bytes = QE_MRSIGNER) -> dict:
    return {"id": "TD_QE", "version": 2, "issueDate": stamp(ISSUED), "nextUpdate": stamp(NEXT_UPDATE),
            "tcbEvaluationDataNumber": 19, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000", "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": mrsigner.hex().upper(), "isvprodid": 2, "tcbLevels": levels or [isv_level(7)]}


def signed_json(member: str, obj: dict, key: ec.EllipticCurvePrivateKey, *, pretty: bool = False) -> bytes:
    """Intel's form; ``pretty`` puts whitespace around the member, which the signature must ignore."""
    body_bytes = json.dumps(obj, separators=(",", ":")).encode()
    sig = raw_sig(key, body_bytes).hex().encode()
    if pretty:
        return b'{\n  "' + member.encode() + b'" : ' + body_bytes + b',\n  "signature": "' + sig + b'"\n}\n'
    return b'{"' + member.encode() + b'":' + body_bytes + b',"signature":"' + sig + b'"}'


def crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked=()) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(ISSUED).next_update(NEXT_UPDATE))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(ISSUED).build())
    return builder.sign(key, hashes.SHA256())


def collateral(folder: Path, p: Platform, *, tcb=None, qe=None, crls: bool = True, revoked=()) -> Path:
    """Write a complete collateral folder for ``p``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tcbinfo.json").write_bytes(signed_json("tcbInfo", tcb or tcb_info(p), p.signing_key))
    (folder / "qe_identity.json").write_bytes(signed_json("enclaveIdentity", qe or qe_identity(), p.signing_key))
    (folder / "tcb_signing_chain.pem").write_bytes(pem(p.signing, p.root))
    if crls:
        der = serialization.Encoding.DER
        (folder / "pck_crl.der").write_bytes(crl(p.ca, p.ca_key, revoked).public_bytes(der))
        (folder / "root_crl.der").write_bytes(crl(p.root, p.root_key).public_bytes(der))
    return folder
