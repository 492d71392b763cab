"""A simulated AMD SEV / SEV-ES platform: AMD's legacy certificate chain and the AEB's evidence.

SEV and SEV-ES guests have no guest-side report: a host service, the Attestation Evidence
Broker, runs the firmware's ATTESTATION command and returns the report with the platform's
CEK, PEK and OCA certificates, packed (6460 bytes). This module makes such evidence under a
simulated chain in the real layouts (SEV API specification, AMD publication 55766):

* ARK (RSA-4096, self-signed) -> ASK (RSA-4096), RSASSA-PSS SHA-384, salt 48;
* CEK (ECDSA P-384) signed by the ASK; OCA (ECDSA P-384) self-signed; PEK (ECDSA P-384)
  signed by the OCA and by the CEK, all ECDSA with SHA-256 as AMD's firmware signs;
* the report signed by the PEK (ECDSA SHA-256 over bytes 0x00-0x33).

Everything lives in ``<state>/sev/`` (private keys 0600), created once under the state's lock
and reused; the ASK and ARK, as AMD publishes them (ASK then ARK), go to the state's trust
folder as ``sev-ask_ark.cert``, so that ``keybroker serve --trust-roots <state>/trust``
accepts the simulated platform. The byte layouts are written here again on purpose: the
emulator may not import the verifier, and the tests check that both agree.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .roots import SimState, _load_key, _save_key, _write_json

ARK, ASK, INVALID, OCA, PEK, CEK = 0x0, 0x13, 0x1000, 0x1001, 0x1002, 0x1004
RSA_SHA384, ECDSA_SHA256, P384 = 0x101, 0x2, 2
API_VERSION = (0, 24)
TRUST_FILE = "sev-ask_ark.cert"
_BODY_SIZE = 1044


@dataclass(frozen=True)
class SevPlatform:
    """The simulated platform's certificates (AMD's layouts, as bytes) and its PEK."""

    ark: bytes
    ask: bytes
    cek: bytes
    pek: bytes
    oca: bytes
    pek_key: ec.EllipticCurvePrivateKey
    rogue_cek: bytes  # this chip's CEK signed by another ASK: a chain that must not verify

    @property
    def ask_ark(self) -> bytes:
        """What AMD publishes as ask_ark_<product>.cert (and a guest may send as auxblob)."""
        return self.ask + self.ark

    def evidence(self, mnonce: bytes, launch_digest: bytes, policy: int, *, corrupt_signature: bool = False,
                 broken_chain: bool = False) -> bytes:
        """The AEB's evidence: the ATTESTATION report for ``mnonce``, then CEK, PEK and OCA."""
        if len(mnonce) != 16 or len(launch_digest) != 32 or not 0 <= policy < 1 << 32:
            raise ValueError("MNONCE is 16 bytes, LAUNCH_DIGEST 32, POLICY a 32-bit value")
        signed = mnonce + launch_digest + struct.pack("<I", policy)
        r, s = decode_dss_signature(self.pek_key.sign(signed, ec.ECDSA(hashes.SHA256())))
        if corrupt_signature:
            r ^= 1
        report = (signed + struct.pack("<III", PEK, ECDSA_SHA256, 0)
                  + r.to_bytes(72, "little") + s.to_bytes(72, "little"))
        return report + (self.rogue_cek if broken_chain else self.cek) + self.pek + self.oca


def platform(state: SimState) -> SevPlatform:
    """The state's simulated SEV platform, created on first use."""
    with state.locked():
        d = state.path / "sev"
        if not (d / "values.json").exists():
            _create(state, d)
        certs = {name: (d / f"{name}.cert").read_bytes() for name in ("ark", "ask", "cek", "pek", "oca",
                                                                       "rogue-cek")}
        return SevPlatform(certs["ark"], certs["ask"], certs["cek"], certs["pek"], certs["oca"],
                           _load_key(d / "pek.key"), certs["rogue-cek"])


def _create(state: SimState, d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ark_key, ask_key, rogue_key = (rsa.generate_private_key(65537, 4096) for _ in range(3))
    cek_key, oca_key, pek_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    ark_id, ask_id = secrets.token_bytes(16), secrets.token_bytes(16)
    ark = _ca_cert(ark_id, ark_id, ARK, ark_key.public_key(), ark_key)
    ask = _ca_cert(ask_id, ark_id, ASK, ask_key.public_key(), ark_key)
    cek_body = _platform_body(CEK, cek_key)
    cek = cek_body + _rsa_slot(ask_key, cek_body) + _empty_slot()
    rogue_cek = cek_body + _rsa_slot(rogue_key, cek_body) + _empty_slot()
    oca_body = _platform_body(OCA, oca_key)
    oca = oca_body + _ecdsa_slot(OCA, oca_key, oca_body) + _empty_slot()
    pek_body = _platform_body(PEK, pek_key)
    pek = pek_body + _ecdsa_slot(OCA, oca_key, pek_body) + _ecdsa_slot(CEK, cek_key, pek_body)
    for name, key in (("ark", ark_key), ("ask", ask_key), ("cek", cek_key), ("oca", oca_key), ("pek", pek_key)):
        _save_key(d / f"{name}.key", key)
    for name, cert in (("ark", ark), ("ask", ask), ("cek", cek), ("oca", oca), ("pek", pek),
                       ("rogue-cek", rogue_cek)):
        (d / f"{name}.cert").write_bytes(cert)
    trust = state.trust_dir
    trust.mkdir(mode=0o700, exist_ok=True)
    (trust / TRUST_FILE).write_bytes(ask + ark)
    _write_json(d / "values.json", {"ark_id": ark_id.hex(), "ask_id": ask_id.hex(), "api": list(API_VERSION)})


def _pss(signer: rsa.RSAPrivateKey, body: bytes) -> bytes:
    """RSASSA-PSS SHA-384, salt 48, as AMD signs with a 4096-bit key; little-endian."""
    return signer.sign(body, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())[::-1]


def _ca_cert(key_id: bytes, certifying_id: bytes, usage: int, public: rsa.RSAPublicKey,
             signer: rsa.RSAPrivateKey) -> bytes:
    numbers = public.public_numbers()
    size = public.key_size // 8
    body = (struct.pack("<I16s16sI16sII", 1, key_id, certifying_id, usage, bytes(16), public.key_size,
                        public.key_size)
            + numbers.e.to_bytes(size, "little") + numbers.n.to_bytes(size, "little"))
    return body + _pss(signer, body)


def _platform_body(usage: int, key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_numbers()
    body = (struct.pack("<IBBHIII", 1, *API_VERSION, 0, usage, ECDSA_SHA256, P384)
            + point.x.to_bytes(72, "little") + point.y.to_bytes(72, "little"))
    return body.ljust(_BODY_SIZE, b"\0")


def _rsa_slot(signer: rsa.RSAPrivateKey, body: bytes) -> bytes:
    return struct.pack("<II", ASK, RSA_SHA384) + _pss(signer, body).ljust(512, b"\0")


def _ecdsa_slot(usage: int, signer: ec.EllipticCurvePrivateKey, body: bytes) -> bytes:
    r, s = decode_dss_signature(signer.sign(body, ec.ECDSA(hashes.SHA256())))
    return struct.pack("<II", usage, ECDSA_SHA256) + (r.to_bytes(72, "little") + s.to_bytes(72, "little")).ljust(
        512, b"\0")


def _empty_slot() -> bytes:
    return struct.pack("<II", INVALID, 0) + bytes(512)
