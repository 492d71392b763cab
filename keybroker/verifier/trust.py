"""Trust anchors: the vendor roots pinned by fingerprint, plus operator-given anchors.

Built in (facts, not fetched data): the SHA-256 fingerprints of AMD's ARKs for Milan,
Genoa and Turin, and of the Intel SGX Root CA; and of AMD's ARKs in the legacy SEV
certificate format (Naples to Turin), for SEV/SEV-ES evidence. No CCA platform key (CPAK)
is trusted by default. ``--trust-roots DIR`` adds anchors: root certificates (PEM/DER; their
fingerprints become pins), CPAK public keys (PEM SubjectPublicKeyInfo, a JWK, or a
Veraison trust-anchor list of ``{"pkey": JWK, "implementation-id", "instance-id"}``), and
legacy SEV certificates (``.cert``, one or an ask_ark file): an ARK's fingerprint becomes a
pin, an ASK is kept as an intermediate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk
from jwcrypto.common import JWException

from ..errors import ConfigError, EvidenceError
from ..files import check_held, root_or_self
from .certs import CERT_FILE_MAX, fingerprint, load_certs
from .sev.abi import ARK, parse_ca_certs

#: SHA-256 of the DER of AMD's ARK certificates (snp.md section 4.3).
AMD_ARKS = {
    "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd": "Milan",
    "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1": "Genoa",
    "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a": "Turin",
}
#: SHA-256 of AMD's ARK certificates in the legacy SEV format (the bytes of the ARK in
#: ask_ark_<product>.cert), from AMD's published certificates (vectors/sev-legacy/amd-builtin).
AMD_SEV_ARKS = {
    "dedabca561e1dece8cc00b7bda864cf5f20b95017864408cfe18eaee0dce24b9": "Naples",
    "865977b268c16d5b27772b00aaefb4e737ba9499e818ed8e9f65b0cecefbc529": "Rome",
    "1246469862b78a7a8625579b0378d1f8e975eb8b82a1623b579d7968a5969888": "Milan",
    "8f4e3fd36589c23f1fe0c8338465bac7e2e066d97fc92f228bbee4fd356fb674": "Genoa",
    "f6405e5096a6eee1eb7d5df75c49f9b9f7c8357a31c7fff150149d68588a7bf7": "Turin",
}
#: SHA-256 of the DER of the Intel SGX Root CA (tdx.md section 6).
INTEL_SGX_ROOT = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
#: Intel's TD quoting enclave (tdx.md section 3, Intel's TD_QE identity): the key that signs
#: it and its product ID. A PCK certifies any enclave its platform runs; only this one may
#: vouch for a TD's attestation key, whether or not QE identity collateral is at hand.
INTEL_TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
INTEL_TD_QE_ISVPRODID = 2
#: What a trust-roots folder holds, by file name suffix; files with other suffixes are ignored.
ANCHOR_SUFFIXES = (".pem", ".crt", ".cer", ".der", ".json", ".cert")
ANCHOR_KINDS = ("a root certificate (PEM or DER), a CCA platform key (PEM public key or JWK) or a Veraison "
                "trust-anchor list")
SEV_ANCHOR_SUFFIX = ".cert"


@dataclass(frozen=True)
class Cpak:
    """A trusted CCA platform attestation key, optionally bound to one platform."""

    key: ec.EllipticCurvePublicKey
    implementation_id: bytes | None = None
    instance_id: bytes | None = None
    source: str = ""


@dataclass(frozen=True)
class TrustStore:
    #: fingerprint -> the anchor certificate (None for a built-in pin without the certificate)
    roots: dict[str, x509.Certificate | None] = field(default_factory=dict)
    cpaks: tuple[Cpak, ...] = ()
    #: legacy SEV ARKs: SHA-256 of the certificate -> product (None for an operator's ARK)
    sev_arks: dict[str, str | None] = field(default_factory=dict)
    #: legacy SEV CA certificates (ARKs and ASKs) from trust-roots folders, as bytes
    sev_certs: tuple[bytes, ...] = ()

    @classmethod
    def default(cls) -> TrustStore:
        return cls(dict.fromkeys((*AMD_ARKS, INTEL_SGX_ROOT)), sev_arks=dict(AMD_SEV_ARKS))

    def is_trusted(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self.roots

    def anchors(self) -> list[x509.Certificate]:
        return [cert for cert in self.roots.values() if cert is not None]

    def with_dirs(self, folders: Iterable[Path]) -> TrustStore:
        roots, cpaks = dict(self.roots), list(self.cpaks)
        sev_arks, sev_certs = dict(self.sev_arks), list(self.sev_certs)
        for folder in folders:
            if not folder.is_dir():
                raise ConfigError(f"trust-roots folder {folder} does not exist")
            # Whoever could add a file here would choose the roots that vouch for a TEE.
            check_held(folder, "trust-roots folder", root_or_self())
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() == SEV_ANCHOR_SUFFIX:
                    check_held(path, "trust anchor", root_or_self())
                    _load_sev_anchor(path, sev_arks, sev_certs)
                elif path.is_file() and path.suffix.lower() in ANCHOR_SUFFIXES:
                    check_held(path, "trust anchor", root_or_self())
                    _load_anchor(path, roots, cpaks)
        return TrustStore(roots, tuple(cpaks), sev_arks, tuple(sev_certs))

    def with_cpak_file(self, path: Path) -> TrustStore:
        """This store and the CCA platform key(s) of ``path``; ConfigError for a certificate, which would
        otherwise be trusted as a root of SEV-SNP or TDX chains, not as the key of a CCA platform."""
        certificates: dict[str, x509.Certificate | None] = {}
        cpaks = list(self.cpaks)
        _load_anchor(path, certificates, cpaks)
        if certificates:
            raise ConfigError(f"--trust-cpak {path} holds a certificate, not a CCA platform key (a PEM public "
                              "key, a JWK or a Veraison trust-anchor list)")
        return TrustStore(self.roots, tuple(cpaks), self.sev_arks, self.sev_certs)


def _load_anchor(path: Path, roots: dict[str, x509.Certificate | None], cpaks: list[Cpak]) -> None:
    if path.stat().st_size > CERT_FILE_MAX:
        raise ConfigError(f"trust anchor {path} is larger than {CERT_FILE_MAX} bytes")
    data = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            cpaks.extend(_cpaks_from_json(json.loads(data), str(path)))
        elif b"PUBLIC KEY-----" in data:
            cpaks.append(Cpak(_ec_key(serialization.load_pem_public_key(data), path), source=str(path)))
        else:
            for cert in load_certs(data):
                roots[fingerprint(cert)] = cert
    except (ValueError, KeyError, TypeError, RecursionError, EvidenceError, JWException, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"trust anchor {path} is not {ANCHOR_KINDS}: {exc or type(exc).__name__}") from None


def _load_sev_anchor(path: Path, sev_arks: dict[str, str | None], sev_certs: list[bytes]) -> None:
    """Legacy SEV CA certificates: a self-issued ARK becomes a pin, an ASK an intermediate."""
    if path.stat().st_size > CERT_FILE_MAX:
        raise ConfigError(f"trust anchor {path} is larger than {CERT_FILE_MAX} bytes")
    try:
        certs = parse_ca_certs(path.read_bytes())
    except EvidenceError as exc:
        raise ConfigError(f"trust anchor {path} is not AMD's legacy SEV ARK/ASK certificate format: {exc}") from None
    for cert in certs:
        if cert.usage == ARK:
            if not cert.self_issued:
                raise ConfigError(f"trust anchor {path}: the ARK {cert.key_id.hex()} is not self-issued")
            digest = hashlib.sha256(cert.raw).hexdigest()
            sev_arks[digest] = AMD_SEV_ARKS.get(digest)
        if cert.raw not in sev_certs:
            sev_certs.append(cert.raw)


def _cpaks_from_json(obj: Any, source: str) -> list[Cpak]:
    entries = obj if isinstance(obj, list) else [obj]
    cpaks = []
    for entry in entries:
        key_json = entry.get("pkey", entry) if isinstance(entry, dict) else None
        if not isinstance(key_json, dict) or not isinstance(key_json.get("kty"), str):
            raise ValueError('JSON must be a JWK (with "kty") or a list of {"pkey": JWK, ...} entries')
        key = jwk.JWK(**key_json).get_op_key("verify")
        impl = entry.get("implementation-id")
        inst = entry.get("instance-id")
        cpaks.append(Cpak(_ec_key(key, source), bytes.fromhex(impl) if impl else None,
                          bytes.fromhex(inst) if inst else None, source))
    return cpaks


def _ec_key(key: Any, where: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{where}: a CPAK must be an EC public key")
    return key
