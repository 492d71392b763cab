"""The handler over TLS: the key server's certificate is checked against the configured CA."""

from __future__ import annotations

import hashlib

from support.keyctl import keyctl_session
from support.pki import authority, server_files
from support.servers import raw_server

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


def test_a_ca_bundle_that_cannot_be_loaded_is_named(tmp_path):
    """server.ca is a file the operator points at: one with no certificate, or a folder, is a
    configuration error naming it, not ssl's exception escaping as an internal error."""
    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ConfigError
    from keybroker.guest.client import RcarClient

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    for ca in (garbage, tmp_path):
        client = RcarClient("https://127.0.0.1:1", ca=ca, attempts=1)
        with pytest.raises(ConfigError, match=f"CA bundle {ca} "):
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))


def test_a_server_that_closes_during_the_handshake_is_unreachable_not_a_refusal(tmp_path):
    """A key server that closes a connection before its handshake ends (restarting, or its handshake
    deadline under a boot storm) is away for now (ECONNRESET: the requester's retry and the disk
    unlock wait it out), not a TLS failure (EPROTO, which ends a volume's wait at once)."""
    import socket

    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ServerUnreachable
    from keybroker.guest.client import RcarClient

    pki = tmp_path / "pki"
    pki.mkdir()
    authority(pki, "ca")

    def hang_up(conn: socket.socket) -> None:
        conn.recv(1024)  # the ClientHello, then the connection closes
        conn.close()

    with raw_server(hang_up) as port:
        client = RcarClient(f"https://127.0.0.1:{port}", ca=pki / "ca.pem", attempts=1)
        with pytest.raises(ServerUnreachable) as failure:
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
        assert failure.value.errno == 104 and "during the TLS handshake" in str(failure.value)


def test_the_client_checks_the_server_s_certificate_and_name_in_process(tmp_path):
    """RcarClient itself (the test above goes through the installed handler): a certificate of another CA,
    or of the configured CA for another name (127.0.0.1, asked as localhost), fails the handshake."""
    import socket
    import ssl

    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ServerError
    from keybroker.guest.client import RcarClient

    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_cert = authority(pki, "ca")
    authority(pki, "other")
    cert, key = server_files(pki, ca_key, ca_cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate

    with raw_server(serve) as port:
        for url, ca in ((f"https://127.0.0.1:{port}", pki / "other.pem"),
                        (f"https://localhost:{port}", pki / "ca.pem")):
            client = RcarClient(url, ca=ca, attempts=1)
            with pytest.raises(ServerError, match=r"TLS with .* failed: .*certificate verify failed"):
                client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
