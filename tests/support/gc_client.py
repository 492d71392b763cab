"""A guest that behaves as guest-components' ``kbs_protocol`` with its attesters, for keybroker's server.

Written from guest-components' sources (kbs_protocol/src/client/rcar_client.rs, keypair.rs,
attester/src/{snp,tdx,cca,sample_device}, kbs-types 0.18), not from keybroker's client:

* ``/auth``: ``{"version": "0.4.0", "tee", "extra-params": {"supported-hash-algorithms": [...]}}``;
  the challenge's ``selected-hash-algorithm`` (default SHA-384) hashes the runtime data;
* the tee key is EC P-256 (``ECDH-ES+A256KW``) or RSA-2048 (``RSA-OAEP-256``), as TeePubKey;
* device evidence (Trustee's sample device) binds the hash of JCS({nonce, tee-pubkey}); the
  primary evidence binds the hash of JCS({tee-pubkey, nonce, additional-evidence}), zero-padded
  to the 64-byte configfs-tsm inblob, and goes in Trustee's per-TEE form;
* an error body is read only on 401 (as ``ErrorInformation``: ``type`` and ``detail``
  strings); any other status is "KBS Server Internal Failed";
* the JWE answer is decrypted with the AAD written again from the parsed protected header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from keybroker.wire import trustee
from support import jose
from support.jose import b64url, unb64url

HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


class Refused(Exception):
    """A 401 whose body parsed as ErrorInformation."""

    def __init__(self, where: str, error: dict[str, str]) -> None:
        super().__init__(f"{where}: {error['type']}: {error['detail']}")
        self.where, self.type, self.detail = where, error["type"], error["detail"]


class InternalFailure(Exception):
    """Any other status: what guest-components reports as "KBS Server Internal Failed"."""


@dataclass
class TeeKey:
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @classmethod
    def new(cls, algorithm: str) -> TeeKey:
        if algorithm == "RSA-OAEP-256":
            return cls(rsa.generate_private_key(65537, 2048))
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def export(self) -> dict[str, str]:
        """TeePubKey as kbs-types writes it: kty first, then the variant's members."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            numbers = self.private.public_key().public_numbers()
            return {"kty": "RSA", "alg": "RSA-OAEP-256", "n": b64url(numbers.n.to_bytes(256, "big")),
                    "e": b64url(numbers.e.to_bytes(3, "big"))}
        point = self.private.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": b64url(point.x.to_bytes(32, "big")),
                "y": b64url(point.y.to_bytes(32, "big"))}

    def decrypt(self, response: dict[str, Any]) -> bytes:
        header = json.loads(unb64url(response["protected"]))
        aad = jose.protected(header).encode()  # ProtectedHeader::generate_aad: the header parsed and written again
        wrapped = unb64url(response["encrypted_key"])
        if header["alg"] == "RSA-OAEP-256":
            assert isinstance(self.private, rsa.RSAPrivateKey), "Unmatched key. Must be RSA key"
            cek = self.private.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        elif header["alg"] == "ECDH-ES+A256KW":
            assert isinstance(self.private, ec.EllipticCurvePrivateKey), "Unmatched key. Must be EC key"
            epk = header["epk"]
            assert epk["crv"] == "P-256", f"Unmatched curve: {epk['crv']}"
            sender = ec.EllipticCurvePublicNumbers(int.from_bytes(unb64url(epk["x"]), "big"),
                                                   int.from_bytes(unb64url(epk["y"]), "big"),
                                                   ec.SECP256R1()).public_key()
            cek = aes_key_unwrap(jose.kek(self.private.exchange(ec.ECDH(), sender)), wrapped)
        else:
            raise AssertionError(f"Unsupported algorithm: {header['alg']}")
        assert header["enc"] == "A256GCM"
        return AESGCM(cek).decrypt(unb64url(response["iv"]),
                                   unb64url(response["ciphertext"]) + unb64url(response["tag"]), aad)


def tsm_report(root: Path, inblob: bytes) -> tuple[str, bytes, bytes]:
    """(provider, outblob, auxblob) from configfs-tsm, as guest-components' tsm_report module gets them."""
    entry = root / f"gc-{uuid.uuid4().hex[:12]}"
    os.mkdir(entry)
    try:
        (entry / "inblob").write_bytes(inblob)
        outblob = (entry / "outblob").read_bytes()
        auxblob = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
        return (entry / "provider").read_text().strip(), outblob, auxblob
    finally:
        os.rmdir(entry)


@dataclass
class GuestComponents:
    url: str
    tee: str                       # snp, tdx or cca
    tsm_root: Path
    key_algorithm: str = "ECDH-ES+A256KW-P256"
    init_data: str | None = None   # the init-data TOML this guest was given
    sample_device: bool = False    # attach Trustee's sample device
    device_binding: bytes | None = None  # test hook: what the sample device binds instead
    mutate: Any = None             # test hook: changes the primary evidence before it is sent

    def __post_init__(self) -> None:
        self.http = requests.Session()
        self.key = TeeKey.new(self.key_algorithm)
        self.challenges: list[dict[str, Any]] = []

    def _post(self, where: str, body: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.url}/kbs/v0/{where}", json=body, timeout=60)
        if response.status_code == 401:
            error = response.json()
            assert isinstance(error.get("type"), str) and isinstance(error.get("detail"), str), error
            raise Refused(where, error)
        if response.status_code != 200:
            raise InternalFailure(f"KBS Server Internal Failed, Response: {response.text[:500]}")
        return response.json()

    def rcar_handshake(self, *, nonce_from: GuestComponents | None = None) -> None:
        request = {"version": "0.4.0", "tee": self.tee,
                   "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}}
        challenge = self._post("auth", request)
        self.challenges.append(challenge)
        assert set(challenge) >= {"nonce", "extra-params"}, challenge
        extra = challenge["extra-params"]
        algorithm = extra.get("selected-hash-algorithm", "sha384") if isinstance(extra, dict) else "sha384"
        nonce = challenge["nonce"] if nonce_from is None else nonce_from.challenges[-1]["nonce"]
        runtime = {"nonce": nonce, "tee-pubkey": self.key.export()}
        additional = ""
        if self.sample_device:
            bound = self.device_binding or HASHES[algorithm](rfc8785.dumps(runtime)).digest()
            additional = json.dumps({"sampledevice": {"svn": "1", "report_data": base64.b64encode(bound).decode()}},
                                    separators=(",", ":"))
        primary_runtime = {"tee-pubkey": runtime["tee-pubkey"], "nonce": nonce, "additional-evidence": additional}
        digest = HASHES[algorithm](rfc8785.dumps(primary_runtime)).digest()
        provider, outblob, auxblob = tsm_report(self.tsm_root, digest.ljust(64, b"\0"))
        primary = trustee.to_json(provider, outblob, auxblob)
        if self.mutate:
            self.mutate(primary)
        attestation = {"init-data": {"format": "toml", "body": self.init_data} if self.init_data else None,
                       "runtime-data": {"nonce": challenge["nonce"], "tee-pubkey": runtime["tee-pubkey"]},
                       "tee-evidence": {"primary_evidence": primary, "additional_evidence": additional}}
        answer = self._post("attest", attestation)
        assert answer["token"].count(".") == 2
        claims = json.loads(unb64url(answer["token"].split(".")[1]))
        assert isinstance(claims.get("exp"), int)

    def get_resource(self, path: str, query: str | None = None) -> bytes:
        self.rcar_handshake()
        url = f"{self.url}/kbs/v0/resource/{path}" + (f"?{query}" if query else "")
        response = self.http.get(url, timeout=60)
        if response.status_code == 200:
            return self.key.decrypt(response.json())
        error = response.json()
        assert isinstance(error.get("type"), str) and isinstance(error.get("detail"), str), error
        if response.status_code == 401:
            raise Refused("resource", error)
        raise InternalFailure(f"KBS resource: HTTP {response.status_code}: {error}")
