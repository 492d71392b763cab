"""Simulated configfs-tsm providers: evidence in the vendors' real binary layouts.

* ``sev_guest``: the 1184-byte SEV-SNP ATTESTATION_REPORT (version 5) signed by the
  simulated VCEK, and the GHCB certificate table (VCEK, ASK, ARK) as ``auxblob``; under an
  SVSM (``--svsm``) also service attestation: REPORT_DATA = SHA-512(nonce || manifest).
* ``tdx_guest``: a DCAP quote version 4 (TDX 1.0 body), the QE report and PCK chain in
  certification data type 6/5.
* ``arm_cca_guest``: a CCA attestation token (tag 399 collection of the platform token,
  signed by the CPAK, and the realm token, signed by the RAK).

Each provider checks its inputs as the kernel driver does (EINVAL) and can be told to
fail (``Fault``) the way real hosts fail.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno as E
import hashlib
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Protocol

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..wire import ghcb
from .ccel import BootLog, Registers, boot_log, registers
from .roots import CcaIdentity, SimState, SnpIdentity, TdxIdentity

# configfs-tsm attribute visibility per provider (drivers' is_visible callbacks, v6.11+).
COMMON = frozenset({"generation", "provider", "inblob", "outblob"})
SERVICE_ATTRS = frozenset({"service_provider", "service_guid", "service_manifest_version", "manifestblob"})
ALL_ATTRS = COMMON | {"auxblob", "privlevel", "privlevel_floor"} | SERVICE_ATTRS

FAULT_ERRNOS = {"eio": E.EIO, "ebusy": E.EBUSY, "etimedout": E.ETIMEDOUT, "enxio": E.ENXIO}
FAULT_NAMES = (*FAULT_ERRNOS, "empty-outblob", "corrupt-signature", "debug", "slow=SECONDS")

# SVSM manifest GUIDs, stored little-endian (mixed-endian) as the SVSM writes them.
GUID_SVSM_SERVICES = uuid.UUID("63849ebb-3d92-4670-a1ff-58f9c94b87bb")
GUID_SVSM_VTPM = uuid.UUID("c476f1eb-0123-45a5-9641-b4e7dde5bfe3")

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


@dataclass(frozen=True)
class Request:
    """The state of a report entry when its report is generated."""

    inblob: bytes
    privlevel: int = 0
    service_provider: str | None = None
    service_guid: str | None = None  # None: the null GUID (all services)
    service_manifest_version: int = 0


@dataclass(frozen=True)
class Blobs:
    outblob: bytes
    auxblob: bytes = b""
    manifestblob: bytes = b""


@dataclass(frozen=True)
class Faults:
    """Failures to inject when a report is generated (``--fault``)."""

    errno: int | None = None
    empty_outblob: bool = False
    corrupt_signature: bool = False
    debug: bool = False
    slow: float = 0.0

    @classmethod
    def parse(cls, names: list[str]) -> Faults:
        fields: dict[str, object] = {}
        for name in names:
            if name in FAULT_ERRNOS:
                fields["errno"] = FAULT_ERRNOS[name]
            elif name in ("empty-outblob", "corrupt-signature", "debug"):
                fields[name.replace("-", "_")] = True
            elif name.startswith("slow="):
                try:
                    fields["slow"] = float(name[5:])
                except ValueError:
                    raise ValueError(f"bad fault {name!r}: slow=SECONDS needs a number") from None
            else:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
        return cls(**fields)  # type: ignore[arg-type]


class Provider(Protocol):
    name: str
    visible: frozenset[str]
    privlevel_floor: int

    def report(self, request: Request) -> Blobs: ...

    def interrupt(self) -> None: ...


class _Base:
    name = ""
    visible: frozenset[str] = COMMON
    privlevel_floor = 0
    inblob_sizes = (64, 64)

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._stopping = threading.Event()

    def interrupt(self) -> None:
        """Cut short any slow report generation (the emulator is stopping)."""
        self._stopping.set()

    def report(self, request: Request) -> Blobs:
        lo, hi = self.inblob_sizes
        if not lo <= len(request.inblob) <= hi:
            raise OSError(E.EINVAL, "inblob size")
        self.check(request)
        if self.faults.slow and self._stopping.wait(self.faults.slow):
            raise OSError(E.EINTR, "emulator stopping")
        if self.faults.errno is not None:
            raise OSError(self.faults.errno, "injected fault")
        blobs = self.generate(request)
        return Blobs(b"", blobs.auxblob, blobs.manifestblob) if self.faults.empty_outblob else blobs

    def check(self, request: Request) -> None:
        """Driver-specific input checks (EINVAL)."""

    def generate(self, request: Request) -> Blobs:
        raise NotImplementedError


class SevGuest(_Base):
    name = "sev_guest"
    visible = COMMON | {"auxblob", "privlevel", "privlevel_floor"}

    def __init__(self, faults: Faults, identity: SnpIdentity, *, svsm: bool = False) -> None:
        super().__init__(faults)
        self.identity = identity
        self.svsm = svsm
        if svsm:
            # Linux under an SVSM runs at VMPL2 and uses VMPCK2: privlevel_floor is 2, and the
            # service attributes become visible.
            self.visible = self.visible | SERVICE_ATTRS
            self.privlevel_floor = 2

    def check(self, request: Request) -> None:
        if request.service_provider is not None:
            if request.service_provider != "svsm":
                raise OSError(E.EINVAL, "unknown service provider")
            if request.service_guid not in (None, str(GUID_SVSM_VTPM)):
                raise OSError(E.EINVAL, "unknown SVSM service")
            if request.service_guid is not None and request.service_manifest_version != 0:
                raise OSError(E.EINVAL, "unsupported manifest version")
        elif request.privlevel < self.privlevel_floor:
            raise OSError(E.EINVAL, "report requested below the guest's VMPL")

    def generate(self, request: Request) -> Blobs:
        ident = self.identity
        certs = snp_cert_table(ident)
        if request.service_provider == "svsm":
            if request.service_guid is None:
                manifest = svsm_services_manifest({GUID_SVSM_VTPM: ident.ek_public})
            else:
                manifest = ident.ek_public
            report_data = hashlib.sha512(request.inblob + manifest).digest()
            # The SVSM asks the firmware for the report itself, at VMPL0.
            report = snp_report(ident, report_data=report_data, vmpl=0, debug=self.faults.debug,
                                corrupt=self.faults.corrupt_signature)
            return Blobs(report, certs, manifest)
        report = snp_report(ident, report_data=request.inblob, vmpl=request.privlevel,
                            debug=self.faults.debug, corrupt=self.faults.corrupt_signature)
        return Blobs(report, certs)


class TdxGuest(_Base):
    """A TD booted with the emulated firmware's log (``boot``): its quotes report the live ``registers``."""

    name = "tdx_guest"
    visible = COMMON

    def __init__(self, faults: Faults, identity: TdxIdentity) -> None:
        super().__init__(faults)
        self.identity = identity
        self.boot: BootLog = boot_log(identity.value("mrtd"))
        self.registers: Registers = registers(identity.values, self.boot)

    def generate(self, request: Request) -> Blobs:
        current = dataclasses.replace(self.identity, values=self.identity.values | self.registers.hex_values())
        return Blobs(tdx_quote_v4(current, report_data=request.inblob, debug=self.faults.debug,
                                  corrupt=self.faults.corrupt_signature))


class ArmCcaGuest(_Base):
    name = "arm_cca_guest"
    visible = ALL_ATTRS  # the driver registers no visibility callbacks: all attributes show
    inblob_sizes = (32, 64)

    def __init__(self, faults: Faults, identity: CcaIdentity) -> None:
        super().__init__(faults)
        self.identity = identity

    def generate(self, request: Request) -> Blobs:
        challenge = request.inblob.ljust(64, b"\0")  # the driver zero-pads the challenge
        return Blobs(cca_token(self.identity, challenge=challenge, debug=self.faults.debug,
                               corrupt=self.faults.corrupt_signature))


def make_provider(name: str, state: SimState, faults: Faults, *, svsm: bool = False,
                  launch_digest: bytes | None = None) -> Provider:
    """The emulated provider; ``launch_digest`` is what the host bound at launch (an init-data
    digest): HOST_DATA, MRCONFIGID or the realm personalization value, zero-padded or cut to size."""
    def fit(size: int) -> str:
        assert launch_digest is not None
        return launch_digest[:size].ljust(size, b"\0").hex()

    if name == "sev_guest":
        snp = state.snp()
        if launch_digest is not None:
            snp = dataclasses.replace(snp, host_data=bytes.fromhex(fit(32)))
        return SevGuest(faults, snp, svsm=svsm)
    if svsm:
        raise ValueError("--svsm applies to the sev_guest provider only")
    if name == "tdx_guest":
        tdx = state.tdx()
        if launch_digest is not None:
            tdx = dataclasses.replace(tdx, values=tdx.values | {"mrconfigid": fit(48)})
        return TdxGuest(faults, tdx)
    if name == "arm_cca_guest":
        cca = state.cca()
        if launch_digest is not None:
            cca = dataclasses.replace(cca, values=cca.values | {"personalization": fit(64)})
        return ArmCcaGuest(faults, cca)
    raise ValueError(f"unknown provider {name!r}")


# -- AMD SEV-SNP ------------------------------------------------------------------------

SNP_REPORT_SIZE = 0x4A0
SNP_POLICY_BASE = (1 << 17) | (1 << 16)  # reserved bit 17 (must be one), SMT allowed
SNP_POLICY_DEBUG = 1 << 19


def snp_report(ident: SnpIdentity, *, report_data: bytes, vmpl: int, debug: bool = False,
               corrupt: bool = False) -> bytes:
    """An ATTESTATION_REPORT, version 5 (Genoa), signed over bytes 0x000-0x29F."""
    r = bytearray(SNP_REPORT_SIZE)
    policy = SNP_POLICY_BASE | (SNP_POLICY_DEBUG if debug else 0)
    tcb = ident.tcb.to_bytes()
    struct.pack_into("<IIQ", r, 0x000, 5, 0, policy)            # VERSION, GUEST_SVN, POLICY
    struct.pack_into("<II", r, 0x030, vmpl, 1)                  # VMPL, SIGNATURE_ALGO (ECDSA P-384)
    r[0x038:0x040] = tcb                                        # CURRENT_TCB
    struct.pack_into("<Q", r, 0x040, 0b100011)                  # PLATFORM_INFO: SMT, TSME, ALIAS_CHECK
    struct.pack_into("<I", r, 0x048, 0)                         # SIGNER_INFO: VCEK, no author key
    r[0x050:0x090] = report_data
    r[0x090:0x0C0] = ident.measurement
    r[0x0C0:0x0E0] = ident.host_data
    r[0x140:0x160] = ident.report_id
    r[0x160:0x180] = b"\xff" * 32                               # REPORT_ID_MA: no migration agent
    r[0x180:0x188] = tcb                                        # REPORTED_TCB
    r[0x188:0x18B] = bytes([0x19, 0x11, 0x01])                  # CPUID family, model, stepping: Genoa
    r[0x1A0:0x1E0] = ident.chip_id
    r[0x1E0:0x1E8] = tcb                                        # COMMITTED_TCB
    r[0x1E8:0x1EB] = bytes([43, 55, 1])                         # CURRENT build, minor, major: 1.55.43
    r[0x1EC:0x1EF] = bytes([43, 55, 1])                         # COMMITTED
    r[0x1F0:0x1F8] = tcb                                        # LAUNCH_TCB
    der = ident.vcek_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    sig_r, sig_s = decode_dss_signature(der)
    r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
    r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
    if corrupt:
        r[0x2A0] ^= 0x01
    return bytes(r)


def snp_cert_table(ident: SnpIdentity) -> bytes:
    """The GHCB certificate table the host hands over with an extended report: VCEK, ASK, ARK."""
    return ghcb.build([(ghcb.GUIDS[name], cert.public_bytes(serialization.Encoding.DER))
                       for name, cert in (("VCEK", ident.vcek), ("ASK", ident.ask), ("ARK", ident.ark))])


def snp_crl(ident: SnpIdentity, ark_key: rsa.RSAPrivateKey, revoked: tuple[int, ...] = (), *, days: int = 7) -> bytes:
    """AMD's CRL as KDS serves it (DER, signed by the ARK's ``ark_key``), revoking the ``revoked`` serials."""
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ident.ark.subject)
               .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=days)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - dt.timedelta(days=1)).build())
    crl = builder.sign(ark_key, hashes.SHA384(),
                       rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48))
    return crl.public_bytes(serialization.Encoding.DER)


def svsm_services_manifest(services: dict[uuid.UUID, bytes]) -> bytes:
    """The SVSM "all services" manifest: a GUID table header, entries, then the data."""
    header = 16 + 8
    offset = header + 24 * len(services)
    entries, data = bytearray(), bytearray()
    for guid, blob in services.items():
        entries += guid.bytes_le + struct.pack("<II", offset + len(data), len(blob))
        data += blob
    total = offset + len(data)
    return GUID_SVSM_SERVICES.bytes_le + struct.pack("<II", total, len(services)) + bytes(entries) + bytes(data)


# -- Intel TDX --------------------------------------------------------------------------

def tdx_quote_v4(ident: TdxIdentity, *, report_data: bytes, debug: bool = False, corrupt: bool = False) -> bytes:
    """A DCAP quote v4 with a TDX 1.0 body; certification data type 6 holding type 5 (PEM chain)."""
    v = ident.value
    header = struct.pack("<HHIHH", 4, 2, 0x81, 0, 0) + INTEL_QE_VENDOR_ID + bytes(20)
    attributes = bytearray(v("tdattributes"))
    if debug:
        attributes[0] |= 0x01
    body = b"".join([v("tee_tcb_svn"), v("mrseam"), v("mrsignerseam"), bytes(8), bytes(attributes),
                     v("xfam"), v("mrtd"), v("mrconfigid"), v("mrowner"), v("mrownerconfig"),
                     v("rtmr0"), v("rtmr1"), v("rtmr2"), v("rtmr3"), report_data])
    assert len(header) == 48 and len(body) == 584
    signed = header + body
    signature = bytearray(_raw_ecdsa_p256(ident.attestation_key, signed))
    if corrupt:
        signature[0] ^= 0x01
    ak = ident.attestation_key.public_key().public_numbers()
    ak_raw = ak.x.to_bytes(32, "big") + ak.y.to_bytes(32, "big")
    auth_data = v("qe_auth_data")
    qe_report = _qe_report(ident, hashlib.sha256(ak_raw + auth_data).digest() + bytes(32))
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ident.pck, ident.pck_ca, ident.root))
    chain += b"\0"
    inner = struct.pack("<HI", 5, len(chain)) + chain
    qe_cert_data = (qe_report + _raw_ecdsa_p256(ident.pck_key, qe_report)
                    + struct.pack("<H", len(auth_data)) + auth_data + inner)
    sig_data = bytes(signature) + ak_raw + struct.pack("<HI", 6, len(qe_cert_data)) + qe_cert_data
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def _qe_report(ident: TdxIdentity, report_data: bytes) -> bytes:
    """The TD quoting enclave's SGX REPORTBODY (384 bytes)."""
    v = ident.values
    cpusvn = bytes.fromhex(v["cpusvn"])
    attributes = bytes.fromhex("1100000000000000e700000000000000")  # INIT|MODE64BIT, XFRM
    body = (cpusvn + bytes(4) + bytes(28) + attributes + bytes.fromhex(v["qe_mrenclave"]) + bytes(32)
            + bytes.fromhex(v["qe_mrsigner"]) + bytes(96) + struct.pack("<HH", v["qe_isvprodid"], v["qe_isvsvn"])
            + bytes(60) + report_data)
    assert len(body) == 384
    return body


def _raw_ecdsa_p256(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# -- Arm CCA ----------------------------------------------------------------------------

CCA_TAG_COLLECTION = 399
CCA_PLATFORM_TOKEN = 44234
CCA_REALM_TOKEN = 44241
CCA_LIFECYCLE_SECURED = 0x3000
CCA_LIFECYCLE_DEBUG = 0x5000  # recoverable PSA RoT debug


def cca_token(ident: CcaIdentity, *, challenge: bytes, debug: bool = False, corrupt: bool = False) -> bytes:
    """A CCA attestation token, RMM 1.0 profiles, RAK as a COSE_Key."""
    v = ident.value
    rak = ident.rak.public_key().public_numbers()
    rak_cose = cbor2.dumps({1: 2, -1: 2, -2: rak.x.to_bytes(48, "big"), -3: rak.y.to_bytes(48, "big")})
    realm_claims = {
        265: "tag:arm.com,2023:realm#1.0.0",
        10: challenge,
        44235: v("personalization"),
        44236: "sha-256",
        44238: v("rim"),
        44239: [v("rem0"), v("rem1"), v("rem2"), v("rem3")],
        44237: rak_cose,
        44240: "sha-256",
    }
    platform_claims = {
        265: "tag:arm.com,2023:cca_platform#1.0.0",
        10: hashlib.sha256(rak_cose).digest(),
        2396: v("implementation_id"),
        256: v("instance_id"),
        2401: v("platform_config"),
        2395: CCA_LIFECYCLE_DEBUG if debug else CCA_LIFECYCLE_SECURED,
        2399: [{1: "BL", 2: v("bl_measurement"), 4: "2.12.0", 5: v("signer_id"), 6: "sha-256"},
               {1: "RMM", 2: v("rmm_measurement"), 4: "0.6.0", 5: v("signer_id"), 6: "sha-256"}],
        2400: "https://veraison.example/.well-known/veraison/verification",
        2402: "sha-256",
    }
    platform = _cose_sign1_es384(ident.cpak, cbor2.dumps(platform_claims))
    realm = _cose_sign1_es384(ident.rak, cbor2.dumps(realm_claims), corrupt=corrupt)
    return cbor2.dumps(cbor2.CBORTag(CCA_TAG_COLLECTION, {CCA_PLATFORM_TOKEN: platform, CCA_REALM_TOKEN: realm}))


def _cose_sign1_es384(key: ec.EllipticCurvePrivateKey, payload: bytes, *, corrupt: bool = False) -> bytes:
    protected = cbor2.dumps({1: -35})  # alg: ES384
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    signature = bytearray(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    if corrupt:
        signature[-1] ^= 0x01
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, bytes(signature)]))
