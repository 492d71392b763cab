"""A key server that behaves as Trustee's KBS does, for keybroker's client to meet in tests.

Written from Trustee's sources (kbs/src/attestation/backend.rs, kbs/src/error.rs,
kbs/src/jwe, deps/verifier/src/{snp,tdx,cca}, kbs-types 0.18), not from keybroker's server:

* ``/auth`` reads kbs-types' ``Request`` (``extra-params`` required, any value), checks the
  version against ``=0.4.0`` as semver does, answers a 32-byte base64 nonce with
  ``"extra-params": ""`` (it knows nothing of keybroker's envelope) and the session cookie;
* with ``binding_hash`` set (Trustee appraising TDX through Intel Trust Authority: "sha512"),
  ``/auth`` answers ``{"selected-hash-algorithm": ...}`` when the Request's ``supported-hash-algorithms``
  offers it, and falls back to ``""`` when none is offered (kbs/src/attestation/intel_trust_authority),
  while the appraisal requires that hash either way;
* ``/attest`` reads ``Attestation``, hashes ``{"tee-pubkey", "nonce", "additional-evidence"}``
  (tee-pubkey as ``TeePubKey`` writes it) with SHA-384 (or ``binding_hash``) into the expected REPORT_DATA, reads
  the primary evidence in Trustee's per-TEE form only, and verifies it as Trustee's verifiers
  do: SEV-SNP report version 3 to 5 at VMPL 0, REPORT_DATA and HOST_DATA (init-data)
  compared after zero-padding or cutting to size, TDX REPORTDATA and MRCONFIGID, CCA
  challenge and personalization value;
* ``/resource/<repo>/<type>/<tag>``, for an attested session's cookie or the token /attest gave
  (``Authorization: Bearer``), answers a JWE as Trustee's kbs/src/jwe makes it
  (tests/support/jose.py): RSA-OAEP-256, or ECDH-ES+A256KW on P-256 and P-521 only;
* every error is 401 with ``{"type": "https://github.com/confidential-containers/kbs/errors/
  <Variant>", "detail": ...}``, except an invalid path (404).

The signatures, chains and TCBs are checked with keybroker's verifier (the emulator's roots
are this server's "vendor certificates"); the JSON forms are read with keybroker.wire.trustee,
which tests/wire/test_oracle.py holds to the sev crate that Trustee uses.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from keybroker.errors import EvidenceError
from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.wire import trustee
from support import jose
from support.jose import b64url, unb64url

ERRORS = "https://github.com/confidential-containers/kbs/errors/"
TEES = {"snp", "tdx", "cca", "az-snp-vtpm", "az-tdx-vtpm", "sgx", "csv", "se", "tpm", "sample", "sampledevice",
        "nvidia", "hygondcu", "nvidia-dpu"}
RESOURCE = re.compile(r"[a-zA-Z0-9_\-]+[a-zA-Z0-9_\-\.]*")
SEMVER_0_4_0 = re.compile(r"0\.4\.0(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?")


class Refusal(Exception):
    def __init__(self, variant: str, detail: str, status: int = 401) -> None:
        super().__init__(detail)
        self.variant, self.detail, self.status = variant, detail, status


@dataclass
class Session:
    tee: str
    nonce: str
    tee_pubkey: dict[str, str] | None = None


@dataclass
class TrusteeKbs:
    """The server's state; ``resources`` and ``policy_allows`` may be changed by a test."""

    trust_dir: Path
    resources: dict[str, bytes] = field(default_factory=dict)
    policy_allows: bool = True
    binding_hash: str | None = None  # the hash the appraisal requires and the challenge selects if offered
    sessions: dict[str, Session] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> the session it attested
    seen: list[dict[str, Any]] = field(default_factory=list)  # the /auth and /attest bodies received
    url: str = ""

    # -- the protocol -------------------------------------------------------------------

    def auth(self, body: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(body, dict) or not {"version", "tee", "extra-params"} <= set(body):
            raise Refusal("AttestationError", "Attestation error: RCAR handshake Auth failed: deserialize Request")
        if not isinstance(body["version"], str) or not SEMVER_0_4_0.fullmatch(body["version"]):
            raise Refusal("AttestationError", "KBS Client Protocol Version Mismatch: expect =0.4.0")
        if body["tee"] not in TEES:
            raise Refusal("AttestationError", f"unknown variant `{body['tee']}`")
        session = uuid.uuid4().hex
        self.sessions[session] = Session(body["tee"], base64.b64encode(secrets.token_bytes(32)).decode())
        offered = body["extra-params"].get("supported-hash-algorithms") if isinstance(body["extra-params"], dict) \
            else None
        extra: Any = ""
        if self.binding_hash is not None and isinstance(offered, list) and self.binding_hash in offered:
            extra = {"selected-hash-algorithm": self.binding_hash}
        return session, {"nonce": self.sessions[session].nonce, "extra-params": extra}

    def attest(self, session_id: str | None, body: Any) -> dict[str, str]:
        session = self.sessions.get(session_id or "")
        if session is None:
            raise Refusal("AttestationError", "session not found")
        try:
            runtime, evidence = body["runtime-data"], body["tee-evidence"]
            nonce, key = runtime["nonce"], _tee_pubkey(runtime["tee-pubkey"])
            primary, additional = evidence["primary_evidence"], evidence["additional_evidence"]
            init_data = body.get("init-data")
            assert isinstance(additional, str) and isinstance(nonce, str)
        except (KeyError, TypeError, AssertionError):
            raise Refusal("AttestationError", "deserialize Attestation") from None
        if nonce != session.nonce:
            raise Refusal("AttestationError", "the nonce in the handshake session is different")
        expected = hashlib.new(self.binding_hash or "sha384", rfc8785.dumps(
            {"tee-pubkey": key, "nonce": nonce, "additional-evidence": additional})).digest()
        init_digest = _init_data_digest(init_data) if init_data is not None else None
        try:
            blobs = trustee.from_json(session.tee, primary)
        except EvidenceError as exc:
            raise Refusal("AttestationError", f"verify TEE evidence failed: Deserialize Evidence failed: {exc}") \
                from None
        self._verify(session.tee, blobs, expected, init_digest)
        session.tee_pubkey = key
        token = _token(session.tee)
        self.tokens[token] = session_id or ""
        return {"token": token}

    def _verify(self, tee: str, blobs: trustee.Blobs, report_data: bytes, init_digest: bytes | None) -> None:
        """Trustee's checks: the vendor's signature and chain, then its own rules."""
        if tee == "snp":
            version, vmpl = int.from_bytes(blobs.outblob[0:4], "little"), int.from_bytes(blobs.outblob[0x30:0x34],
                                                                                        "little")
            if not 3 <= version <= 5:
                raise Refusal("AttestationError", "Attestation Report version is too old")
            if vmpl != 0:
                raise Refusal("AttestationError", "VMPL Check Failed")
        trust = TrustStore.default().with_dirs([self.trust_dir])
        context = Context(trust, at=dt.datetime.now(dt.UTC), report_data=_fit(report_data, 64), init_data=init_digest)
        verdict = verify(Evidence(blobs.provider, blobs.outblob, blobs.auxblob), context)
        if not verdict.ok:
            raise Refusal("AttestationError", f"verify TEE evidence failed: {verdict.reason()}")
        if verdict.claims.get("debug"):
            raise Refusal("PolicyDeny", "Access denied by policy")

    def resource(self, session_id: str | None, bearer: str | None, path: str) -> dict[str, Any]:
        if bearer is not None:
            if bearer not in self.tokens:
                raise Refusal("TokenVerifierError", "Token Verifier error")
            session_id = self.tokens[bearer]
        session = self.sessions.get(session_id or "")
        if session is None or session.tee_pubkey is None:
            raise Refusal("TokenNotFound", "Attestation Token not found")
        if len(path.split("/")) != 3 or not all(RESOURCE.fullmatch(part) for part in path.split("/")):
            raise Refusal("PluginInternalError", "Plugin internal error")
        if not self.policy_allows:
            raise Refusal("PolicyDeny", "Access denied by policy")
        if path not in self.resources:
            raise Refusal("PluginInternalError", "Plugin internal error")
        return _jwe(self.resources[path], session.tee_pubkey)


def _tee_pubkey(key: Any) -> dict[str, str]:
    """kbs-types' TeePubKey: tagged by kty, the variant's members (strings), others dropped."""
    members = {"EC": ("crv", "alg", "x", "y"), "RSA": ("alg", "n", "e")}[key["kty"]]
    out = {"kty": key["kty"], **{name: key[name] for name in members}}
    assert all(isinstance(value, str) for value in out.values())
    return out


def _init_data_digest(init_data: Any) -> bytes:
    import tomllib

    if init_data.get("format") != "toml":
        raise Refusal("AttestationError", f"Unsupported initdata format: {init_data.get('format')}")
    algorithm = tomllib.loads(init_data["body"])["algorithm"]
    return hashlib.new(algorithm, init_data["body"].encode()).digest()


def _fit(data: bytes, size: int) -> bytes:
    """Trustee's regularize_data: zero-padded or cut to ``size``."""
    return data[:size].ljust(size, b"\0")


def _token(tee: str) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {"iat": now, "exp": now + 300, "tee": tee, "jti": uuid.uuid4().hex}
    return f"{part({'alg': 'ES256'})}.{part(claims)}.c2ln"


def _jwe(payload: bytes, key: dict[str, str]) -> dict[str, Any]:
    """Trustee's JWE answer (kbs/src/jwe): RSA-OAEP-256, or ECDH-ES+A256KW on P-256 or P-521 with
    the ephemeral key in the protected header, A256GCM with the kbs-types header as AAD."""
    cek = AESGCM.generate_key(256)
    if key["kty"] == "RSA":
        public = rsa.RSAPublicNumbers(int.from_bytes(unb64url(key["e"]), "big"),
                                      int.from_bytes(unb64url(key["n"]), "big")).public_key()
        header: dict[str, Any] = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
        encrypted_key = public.encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    else:
        curve, size = {"P-256": (ec.SECP256R1(), 32), "P-521": (ec.SECP521R1(), 66)}.get(key["crv"], (None, 0))
        if curve is None:
            raise Refusal("JweError", "JWE failed")
        recipient = ec.EllipticCurvePublicNumbers(int.from_bytes(unb64url(key["x"]), "big"),
                                                  int.from_bytes(unb64url(key["y"]), "big"), curve).public_key()
        ephemeral = ec.generate_private_key(curve)
        point = ephemeral.public_key().public_numbers()
        header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM",
                  "epk": {"crv": key["crv"], "kty": "EC", "x": b64url(point.x.to_bytes(size, "big")),
                          "y": b64url(point.y.to_bytes(size, "big"))}}
        encrypted_key = aes_key_wrap(jose.kek(ephemeral.exchange(ec.ECDH(), recipient)), cek)
    aad = jose.protected(header)
    iv = secrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(iv, payload, aad.encode())
    return {"protected": aad, "encrypted_key": b64url(encrypted_key), "iv": b64url(iv),
            "ciphertext": b64url(sealed[:-16]), "tag": b64url(sealed[-16:])}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any, cookie: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if cookie:
            self.send_header("Set-Cookie", f"kbs-session-id={cookie}; Path=/kbs/v0; HttpOnly")
        self.end_headers()
        self.wfile.write(data)

    def _session(self) -> str | None:
        match = re.search(r"kbs-session-id=([0-9a-f]+)", self.headers.get("Cookie", ""))
        return match[1] if match else None

    def _run(self, work: Any) -> None:
        try:
            work()
        except Refusal as refusal:
            self._answer(refusal.status, {"type": ERRORS + refusal.variant, "detail": refusal.detail})

    def do_POST(self) -> None:
        kbs = self.server.kbs
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        except ValueError:
            body = None

        def auth() -> None:
            kbs.seen.append({"auth": body})
            session, challenge = kbs.auth(body)
            self._answer(200, challenge, cookie=session)

        def attest() -> None:
            kbs.seen.append({"attest": body})
            self._answer(200, kbs.attest(self._session(), body), cookie=self._session())

        if self.path == "/kbs/v0/auth":
            self._run(auth)
        elif self.path == "/kbs/v0/attest":
            self._run(attest)
        else:
            self._answer(404, {"type": ERRORS + "InvalidRequestPath", "detail": f"Request path {self.path} is invalid"})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if not path.startswith("/kbs/v0/resource/"):
            self._answer(404, {"type": ERRORS + "InvalidRequestPath", "detail": f"Request path {path} is invalid"})
            return
        authorization = self.headers.get("Authorization", "")
        bearer = authorization[7:] if authorization.startswith("Bearer ") else None
        self._run(lambda: self._answer(200, self.server.kbs.resource(self._session(), bearer,
                                                                     path[len("/kbs/v0/resource/"):])))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    kbs: TrusteeKbs


@contextmanager
def running(trust_dir: Path) -> Iterator[TrusteeKbs]:
    """A Trustee-shaped KBS on a loopback port, trusting the emulator's roots; stopped after."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.kbs = TrusteeKbs(trust_dir, url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.kbs
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
