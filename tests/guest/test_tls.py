"""The handler over TLS: the key server's certificate is checked against the configured CA."""

from __future__ import annotations

import hashlib

from support.keyctl import keyctl_session
from support.pki import authority, server_files

SECRET = hashlib.sha256(b"tls key").digest()




def test_release_over_tls_and_refusal_of_an_unknown_server(tsm_sim, kbs, handler, tmp_path):
    root = tsm_sim("sev_guest")
    pki = tmp_path / "pki"
    pki.mkdir(mode=0o755)
    ca_key, ca_cert = authority(pki, "ca")
    authority(pki, "other")
    cert, key = server_files(pki, ca_key, ca_cert)
    server = kbs("--tls-cert", cert, "--tls-key", key)
    server.put("default/disk/root", SECRET)
    https = server.url
    handler(https, root, ca=pki / "ca.pem")
    out = keyctl_session('keyctl pipe $(keyctl request2 user keybroker:default/disk/root "" @s) | sha256sum')
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout, out.stderr
    handler(https, root, ca=pki / "other.pem")
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s')
    assert out.returncode != 0 and "Protocol error" in out.stderr  # EPROTO: TLS with the server failed
    assert server.requests_to("auth") == 1
