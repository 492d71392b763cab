"""RCAR by hand against key servers (auth, attest and resource may go to different replicas),
and the ``keybroker`` command for the server-side subcommands."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests
from jwcrypto import jwe, jwk

from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.wire import envelope
from keybroker.wire import rcar as p


def keybroker(*args: str, data: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keybroker", *args], input=data, capture_output=True,
                          timeout=60, env=env)


@dataclass
class Attested:
    http: requests.Session  # holds the session cookie
    key: jwk.JWK            # the TEE's private key: decrypts what is released
    token: str              # the attestation token (Bearer)
    session: str            # the session cookie value

    @property
    def session_ref(self) -> str:
        """How the audit log names the session: a digest of its id (the cookie's first part)."""
        return hashlib.sha256(self.session.split(".")[0].encode()).hexdigest()[:16]

    def fetch(self, url: str, path: str, *, bearer: bool = False, timeout: float = 30) -> requests.Response:
        if bearer:
            return requests.get(f"{url}/kbs/v0/resource/{path}", headers={"Authorization": f"Bearer {self.token}"},
                                timeout=timeout)
        return self.http.get(f"{url}/kbs/v0/resource/{path}", timeout=timeout)

    def decrypt(self, response: requests.Response) -> bytes:
        token = jwe.JWE()
        token.deserialize(json.dumps(response.json()), key=self.key)
        return token.payload


def challenge(url: str, tee: str = "snp") -> tuple[requests.Session, str]:
    http = requests.Session()
    response = http.post(f"{url}/kbs/v0/auth", json=p.AuthRequest(tee).to_json(), timeout=30)
    response.raise_for_status()
    return http, response.json()["nonce"]


def attestation(root: Path, nonce: str) -> tuple[jwk.JWK, dict]:
    """A fresh TEE key and the /attest body whose evidence binds it to ``nonce``."""
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    public = json.loads(key.export_public()) | {"alg": "ECDH-ES+A256KW"}
    report = TsmClient(root).get_report(ReportRequest(p.report_data(nonce, public)))
    return key, p.Attestation(nonce, public, envelope.to_json(report)).to_json()


def attest(root: Path, auth_url: str, attest_url: str | None = None) -> Attested:
    """/auth on ``auth_url``, /attest on ``attest_url`` (the same by default), with the same cookie."""
    http, nonce = challenge(auth_url)
    key, body = attestation(root, nonce)
    response = http.post(f"{attest_url or auth_url}/kbs/v0/attest", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return Attested(http, key, response.json()["token"], http.cookies[p.SESSION_COOKIE])


def audit_records(db: str) -> list[dict]:
    out = keybroker("audit", "list", "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.decode().splitlines()]
