"""Simulated vendor roots and platform identities for the configfs-tsm emulator.

Each vendor's chain uses the real certificate shapes and algorithms, under simulated
roots that nothing trusts by default:

* AMD SEV-SNP: ARK (RSA-4096, self-signed) -> ASK -> VCEK (EC P-384), every link
  RSASSA-PSS SHA-384 with salt 48; the VCEK carries AMD's extensions (hwID = CHIP_ID,
  SPLs = REPORTED_TCB, product name).
* Intel TDX: "Intel SGX Root CA" -> "Intel SGX PCK Platform CA" -> PCK leaf (all EC P-256,
  ECDSA SHA-256) with the SGX extension (FMSPC, PCE-ID, TCB); a quoting-enclave
  attestation key; and the collateral Intel's PCS would serve for that platform, in
  ``tdx/collateral/``: TCB info and QE identity signed by a simulated "Intel SGX TCB
  Signing" certificate, a PCK CRL and a Root CA CRL.
* Arm CCA: a platform attestation key (CPAK) and a realm attestation key (RAK), P-384.

Everything lives below ``--state DIR``, created on first use and reused after:
``keys/`` (private keys, 0600), ``certs/``, ``values.json`` (the simulated platform's
identity and measurements) and ``trust/`` (the public anchors a key server is given with
``--trust-roots``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

SNP_PRODUCT = "Genoa"
_AMD_OID = "1.3.6.1.4.1.3704.1"
_SGX_OID = "1.2.840.113741.1.13.1"
_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class SnpTcb:
    """A Milan/Genoa TCB_VERSION: SPLs of the boot loader, TEE, SNP firmware and microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    def to_bytes(self) -> bytes:
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])


@dataclass(frozen=True)
class SnpIdentity:
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: SnpTcb
    measurement: bytes
    host_data: bytes
    report_id: bytes
    ek_public: bytes  # TPMT_PUBLIC of the vTPM endorsement key (SVSM manifest)


@dataclass(frozen=True)
class TdxIdentity:
    root: x509.Certificate
    pck_ca: x509.Certificate
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey
    values: dict[str, Any]  # hex strings: mrseam, mrtd, tee_tcb_svn, fmspc, ... (rtmr0..3: the boot log's)

    def value(self, name: str) -> bytes:
        return bytes.fromhex(self.values[name])


@dataclass(frozen=True)
class CcaIdentity:
    cpak: ec.EllipticCurvePrivateKey
    rak: ec.EllipticCurvePrivateKey
    values: dict[str, Any]

    def value(self, name: str) -> bytes:
        return bytes.fromhex(self.values[name])


class SimState:
    """The emulator's persistent state folder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def trust_dir(self) -> Path:
        return self.path / "trust"

    @property
    def tdx_collateral(self) -> Path:
        """The simulated Intel collateral (TCB info, QE identity, CRLs, TCB signing chain)."""
        return self.path / "tdx" / "collateral"

    def snp(self) -> SnpIdentity:
        with self.locked():
            if not (self.path / "snp" / "values.json").exists() or not (self.path / "snp" / "ark.key").exists():
                self._create_snp()  # (states made before the ARK's key was kept are renewed)
            return self._load_snp()

    def snp_ark_key(self) -> rsa.RSAPrivateKey:
        """The simulated ARK's private key, which signs its CRL (loaded apart: an RSA-4096 key takes
        tens of milliseconds to load, and the identity is loaded for every report)."""
        self.snp()
        key = _load_key(self.path / "snp" / "ark.key")
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    def tdx(self) -> TdxIdentity:
        with self.locked():
            if not (self.path / "tdx" / "values.json").exists() or not self.tdx_collateral.is_dir():
                self._create_tdx()  # (states made before simulated collateral existed are renewed)
            d = self.path / "tdx"
            return TdxIdentity(root=_load_cert(d / "root.pem"), pck_ca=_load_cert(d / "pck-ca.pem"),
                               pck=_load_cert(d / "pck.pem"), pck_key=_load_key(d / "pck.key"),
                               attestation_key=_load_key(d / "attestation.key"),
                               values=json.loads((d / "values.json").read_text()))

    def cca(self) -> CcaIdentity:
        with self.locked():
            if not (self.path / "cca" / "values.json").exists():
                self._create_cca()
            d = self.path / "cca"
            return CcaIdentity(cpak=_load_key(d / "cpak.key"), rak=_load_key(d / "rak.key"),
                               values=json.loads((d / "values.json").read_text()))

    # -- creation ------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the state folder: a platform is created once, by one process."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _dir(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def _create_snp(self) -> None:
        d = self._dir("snp")
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        amd = [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"), (NameOID.COUNTRY_NAME, "US"),
               (NameOID.LOCALITY_NAME, "Santa Clara"), (NameOID.STATE_OR_PROVINCE_NAME, "CA"),
               (NameOID.ORGANIZATION_NAME, "Advanced Micro Devices")]
        ark_key = rsa.generate_private_key(65537, 4096)
        ask_key = rsa.generate_private_key(65537, 4096)
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        ark_name = _name(amd + [(NameOID.COMMON_NAME, f"ARK-{SNP_PRODUCT}")])
        ask_name = _name(amd + [(NameOID.COMMON_NAME, f"SEV-{SNP_PRODUCT}")])
        ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        ark = (_builder(ark_name, ark_name, ark_key.public_key(), 0x20000, years=25)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
               .add_extension(ca_usage, critical=True)
               .sign(ark_key, hashes.SHA384(), rsa_padding=pss))
        ask = (_builder(ask_name, ark_name, ask_key.public_key(), 0x20002, years=25)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=False)
               .add_extension(ca_usage, critical=True)
               .sign(ark_key, hashes.SHA384(), rsa_padding=pss))
        chip_id = secrets.token_bytes(64)
        tcb = SnpTcb(bootloader=9, tee=0, snp=23, microcode=72)
        vcek_builder = _builder(_name(amd + [(NameOID.COMMON_NAME, "SEV-VCEK")]), ask_name,
                                vcek_key.public_key(), 1, years=7)
        amd_ext = [("1", _der_int(0)), ("2", _der(0x16, SNP_PRODUCT.encode())),
                   ("3.1", _der_int(tcb.bootloader)), ("3.2", _der_int(tcb.tee)),
                   ("3.3", _der_int(tcb.snp)), ("3.4", _der_int(0)), ("3.5", _der_int(0)),
                   ("3.6", _der_int(0)), ("3.7", _der_int(0)), ("3.8", _der_int(tcb.microcode)),
                   ("4", chip_id)]  # hwID is raw bytes, without a DER tag, as AMD issues it
        for suffix, value in amd_ext:
            vcek_builder = vcek_builder.add_extension(
                x509.UnrecognizedExtension(ObjectIdentifier(f"{_AMD_OID}.{suffix}"), value), critical=False)
        vcek = vcek_builder.sign(ask_key, hashes.SHA384(), rsa_padding=pss)

        _save_key(d / "vcek.key", vcek_key)
        _save_key(d / "ark.key", ark_key)
        for name, cert in (("ark", ark), ("ask", ask), ("vcek", vcek)):
            _save_cert(d / f"{name}.pem", cert)
        ek = ec.generate_private_key(ec.SECP256R1())
        values = {"chip_id": chip_id.hex(), "tcb": tcb.__dict__,
                  "measurement": secrets.token_hex(48), "host_data": secrets.token_hex(32),
                  "report_id": secrets.token_hex(32), "ek_public": _tpmt_public_ecc(ek).hex()}
        _save_cert(self._dir("trust") / f"snp-ark-{SNP_PRODUCT.lower()}.pem", ark)
        _write_json(d / "values.json", values)

    def _load_snp(self) -> SnpIdentity:
        d = self.path / "snp"
        v = json.loads((d / "values.json").read_text())
        return SnpIdentity(ark=_load_cert(d / "ark.pem"), ask=_load_cert(d / "ask.pem"),
                           vcek=_load_cert(d / "vcek.pem"), vcek_key=_load_key(d / "vcek.key"),
                           chip_id=bytes.fromhex(v["chip_id"]), tcb=SnpTcb(**v["tcb"]),
                           measurement=bytes.fromhex(v["measurement"]),
                           host_data=bytes.fromhex(v["host_data"]),
                           report_id=bytes.fromhex(v["report_id"]),
                           ek_public=bytes.fromhex(v["ek_public"]))

    def _create_tdx(self) -> None:
        d = self._dir("tdx")
        intel = [(NameOID.ORGANIZATION_NAME, "Intel Corporation"), (NameOID.LOCALITY_NAME, "Santa Clara"),
                 (NameOID.STATE_OR_PROVINCE_NAME, "CA"), (NameOID.COUNTRY_NAME, "US")]
        root_key = ec.generate_private_key(ec.SECP256R1())
        ca_key = ec.generate_private_key(ec.SECP256R1())
        pck_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name([(NameOID.COMMON_NAME, "Intel SGX Root CA")] + intel)
        ca_name = _name([(NameOID.COMMON_NAME, "Intel SGX PCK Platform CA")] + intel)
        ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        root = (_builder(root_name, root_name, root_key.public_key(), secrets.randbits(120) + 1, years=25)
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(ca_usage, critical=True)
                .sign(root_key, hashes.SHA256()))
        pck_ca = (_builder(ca_name, root_name, ca_key.public_key(), secrets.randbits(120) + 1, years=15)
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .add_extension(ca_usage, critical=True)
                  .sign(root_key, hashes.SHA256()))
        values: dict[str, Any] = {"fmspc": "00906ed50000", "pce_id": "0000", "pcesvn": 13,
                  "cpusvn": bytes([3, 3, 2, 2, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).hex(),
                  "ppid": secrets.token_hex(16), "platform_instance_id": secrets.token_hex(16),
                  "tee_tcb_svn": bytes([3, 1, 2] + [0] * 13).hex(),
                  "mrseam": secrets.token_hex(48), "mrsignerseam": "00" * 48,
                  "tdattributes": (1 << 28).to_bytes(8, "little").hex(),  # SEPT_VE_DISABLE
                  "xfam": (0x602E7).to_bytes(8, "little").hex(),
                  "mrtd": secrets.token_hex(48), "mrconfigid": "00" * 48, "mrowner": "00" * 48,
                  "mrownerconfig": "00" * 48,
                  "rtmr0": secrets.token_hex(48), "rtmr1": secrets.token_hex(48),
                  "rtmr2": secrets.token_hex(48), "rtmr3": "00" * 48,
                  "qe_mrenclave": secrets.token_hex(32),
                  "qe_mrsigner": "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5",
                  "qe_isvprodid": 2, "qe_isvsvn": 4, "qe_auth_data": bytes(range(32)).hex()}
        tcb_components = list(bytes.fromhex(values["cpusvn"]))
        tcb = [_der_seq(_der_oid(f"{_SGX_OID}.2.{i + 1}"), _der_int(svn)) for i, svn in enumerate(tcb_components)]
        tcb += [_der_seq(_der_oid(f"{_SGX_OID}.2.17"), _der_int(values["pcesvn"])),
                _der_seq(_der_oid(f"{_SGX_OID}.2.18"), _der(0x04, bytes(tcb_components)))]
        sgx = _der_seq(
            _der_seq(_der_oid(f"{_SGX_OID}.1"), _der(0x04, bytes.fromhex(values["ppid"]))),
            _der_seq(_der_oid(f"{_SGX_OID}.2"), _der_seq(*tcb)),
            _der_seq(_der_oid(f"{_SGX_OID}.3"), _der(0x04, bytes.fromhex(values["pce_id"]))),
            _der_seq(_der_oid(f"{_SGX_OID}.4"), _der(0x04, bytes.fromhex(values["fmspc"]))),
            _der_seq(_der_oid(f"{_SGX_OID}.5"), _der(0x0A, b"\x01")),  # SGX type: Scalable
            # What a PCK from the Platform CA carries besides (Trustee requires both):
            _der_seq(_der_oid(f"{_SGX_OID}.6"), _der(0x04, bytes.fromhex(values["platform_instance_id"]))),
            _der_seq(_der_oid(f"{_SGX_OID}.7"), _der_seq(
                *(_der_seq(_der_oid(f"{_SGX_OID}.7.{i}"), _der(0x01, b"\xff" if on else b"\x00"))
                  for i, on in ((1, True), (2, False), (3, True))))),  # dynamicPlatform, cachedKeys, SMTEnabled
        )
        pck = (_builder(_name([(NameOID.COMMON_NAME, "Intel SGX PCK Certificate")] + intel), ca_name,
                        pck_key.public_key(), secrets.randbits(120) + 1, years=7)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                              critical=True)
               .add_extension(x509.UnrecognizedExtension(ObjectIdentifier(_SGX_OID), sgx), critical=False)
               .sign(ca_key, hashes.SHA256()))
        _save_key(d / "pck.key", pck_key)
        _save_key(d / "attestation.key", ec.generate_private_key(ec.SECP256R1()))
        for name, cert in (("root", root), ("pck-ca", pck_ca), ("pck", pck)):
            _save_cert(d / f"{name}.pem", cert)
        _save_cert(self._dir("trust") / "tdx-sgx-root.pem", root)
        _write_tdx_collateral(self._dir("tdx/collateral"), values, root, root_key, pck_ca, ca_key)
        _write_json(d / "values.json", values)

    def _create_cca(self) -> None:
        d = self._dir("cca")
        cpak = ec.generate_private_key(ec.SECP384R1())
        _save_key(d / "cpak.key", cpak)
        _save_key(d / "rak.key", ec.generate_private_key(ec.SECP384R1()))
        impl_id = secrets.token_bytes(32)
        values = {"implementation_id": impl_id.hex(), "instance_id": (b"\x01" + secrets.token_bytes(32)).hex(),
                  "platform_config": "cfcfcfcf", "rim": secrets.token_hex(32),
                  "rem0": secrets.token_hex(32), "rem1": secrets.token_hex(32),
                  "rem2": "00" * 32, "rem3": "00" * 32, "personalization": "00" * 64,
                  "rmm_measurement": secrets.token_hex(32), "bl_measurement": secrets.token_hex(32),
                  "signer_id": secrets.token_hex(32)}
        (self._dir("trust") / "cca-cpak.pem").write_bytes(cpak.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        _write_json(d / "values.json", values)


# -- simulated Intel collateral ---------------------------------------------------------

_COLLATERAL_DAYS = 365  # Intel's documents live 30 days; a simulated state lives longer


def _write_tdx_collateral(d: Path, values: dict[str, Any], root: x509.Certificate, root_key: Any,
                          pck_ca: x509.Certificate, ca_key: Any) -> None:
    """What Intel's PCS serves for the simulated platform, signed under the simulated root:
    TDX TCB info and TD_QE identity (all UpToDate) signed by a simulated "Intel SGX TCB
    Signing" certificate, an empty PCK CRL and an empty Root CA CRL."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued, next_update = now.strftime("%Y-%m-%dT%H:%M:%SZ"), (now + dt.timedelta(days=_COLLATERAL_DAYS))
    dates = {"issueDate": issued, "nextUpdate": next_update.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "tcbEvaluationDataNumber": 17}
    level = {"tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate"}
    tee_tcb_svn = bytes.fromhex(values["tee_tcb_svn"])
    module = {"mrsigner": values["mrsignerseam"].upper(), "attributes": "0000000000000000",
              "attributesMask": "FFFFFFFFFFFFFFFF"}
    tdx_components = [tee_tcb_svn[0], 0] + list(tee_tcb_svn[2:])
    tcb_info = {"id": "TDX", "version": 3, **dates, "fmspc": values["fmspc"].upper(),
                "pceId": values["pce_id"].upper(), "tcbType": 0, "tdxModule": module,
                "tdxModuleIdentities": [{"id": f"TDX_{tee_tcb_svn[1]:02X}", **module,
                                         "tcbLevels": [{"tcb": {"isvsvn": tee_tcb_svn[0]}, **level}]}],
                "tcbLevels": [{"tcb": {"sgxtcbcomponents": [{"svn": s} for s in bytes.fromhex(values["cpusvn"])],
                                       "pcesvn": values["pcesvn"],
                                       "tdxtcbcomponents": [{"svn": s} for s in tdx_components]}, **level}]}
    qe_identity = {"id": "TD_QE", "version": 2, **dates, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
                   "attributes": "11000000000000000000000000000000",
                   "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000", "mrsigner": values["qe_mrsigner"].upper(),
                   "isvprodid": values["qe_isvprodid"],
                   "tcbLevels": [{"tcb": {"isvsvn": values["qe_isvsvn"]}, **level}]}
    signing_key = ec.generate_private_key(ec.SECP256R1())
    intel = [(NameOID.ORGANIZATION_NAME, "Intel Corporation"), (NameOID.LOCALITY_NAME, "Santa Clara"),
             (NameOID.STATE_OR_PROVINCE_NAME, "CA"), (NameOID.COUNTRY_NAME, "US")]
    signing = (_builder(_name([(NameOID.COMMON_NAME, "Intel SGX TCB Signing")] + intel), root.subject,
                        signing_key.public_key(), secrets.randbits(120) + 1, years=7)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .sign(root_key, hashes.SHA256()))
    (d / "tcbinfo.json").write_bytes(_signed_json("tcbInfo", tcb_info, signing_key))
    (d / "qe_identity.json").write_bytes(_signed_json("enclaveIdentity", qe_identity, signing_key))
    (d / "tcb_signing_chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                      for c in (signing, root)))
    for name, issuer, key in (("pck_crl.der", pck_ca, ca_key), ("root_crl.der", root, root_key)):
        crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(now)
               .next_update(next_update).sign(key, hashes.SHA256()))
        (d / name).write_bytes(crl.public_bytes(serialization.Encoding.DER))


def _signed_json(member: str, body: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    """Intel's form: the member's exact bytes signed with ECDSA P-256, r||s in hex."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    raw = json.dumps(body, separators=(",", ":")).encode()
    r, s = decode_dss_signature(key.sign(raw, ec.ECDSA(hashes.SHA256())))
    signature = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    return b'{"' + member.encode() + b'":' + raw + b',"signature":"' + signature.encode() + b'"}'


# -- helpers ----------------------------------------------------------------------------

def _name(attrs: list[tuple[ObjectIdentifier, str]]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any, serial: int, *, years: int
             ) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(serial)
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_BEFORE.replace(year=_NOT_BEFORE.year + years)))


def _save_key(path: Path, key: Any) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _save_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.rename(path)  # last: its presence marks a complete identity


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _tpmt_public_ecc(key: ec.EllipticCurvePrivateKey) -> bytes:
    """TPMT_PUBLIC of an ECC P-256 endorsement key (TCG EK profile template L-2), big-endian."""
    numbers = key.public_key().public_numbers()
    policy = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    return b"".join([
        (0x0023).to_bytes(2, "big"),          # type TPM_ALG_ECC
        (0x000B).to_bytes(2, "big"),          # nameAlg TPM_ALG_SHA256
        # fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | restricted | decrypt
        (0x000300B2).to_bytes(4, "big"),
        len(policy).to_bytes(2, "big"), policy,
        (0x0006).to_bytes(2, "big"), (128).to_bytes(2, "big"), (0x0043).to_bytes(2, "big"),  # AES-128-CFB
        (0x0010).to_bytes(2, "big"),          # scheme TPM_ALG_NULL
        (0x0003).to_bytes(2, "big"),          # curveID TPM_ECC_NIST_P256
        (0x0010).to_bytes(2, "big"),          # kdf TPM_ALG_NULL
        len(x).to_bytes(2, "big"), x, len(y).to_bytes(2, "big"), y,
    ])
