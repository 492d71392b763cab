"""The agent's kept-alive connections (client.Links), against a real key server over TLS: keys under a
kept token cost no connection (nor TLS handshake) of their own; a connection is kept only after an
exchange that ended whole, without the round's session cookie, and never handed out idle too long or
closed by the server."""

from __future__ import annotations

import hashlib

import pytest

from keybroker.errors import ResourceMissing
from keybroker.guest.client import Links, RcarClient, _Http
from keybroker.guest.tsm import ReportRequest, TsmClient
from support.pki import authority, server_files

SECRET = hashlib.sha256(b"kept connection").digest()


@pytest.fixture
def tls(tsm_sim, kbs, tmp_path):
    """A key server over TLS holding default/disk/{a,b,c}, its CA, and the emulator's evidence."""
    root = tsm_sim("sev_guest")
    pki = tmp_path / "pki"
    pki.mkdir(mode=0o755)
    ca_key, ca_cert = authority(pki, "ca")
    cert, key = server_files(pki, ca_key, ca_cert)
    server = kbs("--tls-cert", cert, "--tls-key", key, "--rate-limit", "0")
    for name in "abc":
        server.put(f"default/disk/{name}", SECRET)
    tsm = TsmClient(root)
    return server, pki / "ca.pem", lambda inblob: tsm.get_report(ReportRequest(inblob))


def attested(server, ca, evidence, links: Links | None) -> dict:
    kept: dict = {}
    released = RcarClient(server.url, ca=ca, links=links).fetch(
        "default/disk/a", "snp", evidence, keep=lambda token, key: kept.update(token=token, key=key))
    assert bytes(released.value) == SECRET
    return kept


def kept_port(links: Links, url: str, ca) -> int:
    """The local port of the connection ``links`` keeps for ``url`` (kept again), which carries no cookie."""
    link = links.take(url, ca)
    assert link is not None and link.cookie is None
    port = link.conn.sock.getsockname()[1]
    links.keep(url, ca, link)
    return port


def test_keys_under_a_kept_token_reuse_the_rounds_connection(tls):
    server, ca, evidence = tls
    links = Links()
    kept = attested(server, ca, evidence, links)
    port = kept_port(links, server.url, ca)
    for name in "bc":
        client = RcarClient(server.url, ca=ca, links=links)
        assert bytes(client.fetch_with_token(f"default/disk/{name}", kept["token"], kept["key"]).value) == SECRET
    assert kept_port(links, server.url, ca) == port  # the three keys, one TCP connection and TLS handshake
    assert links.take(server.url, None) is None  # another CA setting (or server) is served by none of them


def test_an_exchange_that_did_not_end_whole_keeps_no_connection(tls):
    server, ca, evidence = tls
    kept = attested(server, ca, evidence, None)
    links = Links()
    with pytest.raises(ResourceMissing):
        RcarClient(server.url, ca=ca, links=links).fetch_with_token("default/disk/none", kept["token"], kept["key"])
    assert links.take(server.url, ca) is None


def test_a_connection_idle_too_long_or_closed_by_the_server_is_not_handed_out(tls):
    server, ca, evidence = tls
    links = Links()
    attested(server, ca, evidence, links)
    link = links.take(server.url, ca)
    assert link is not None
    links.keep(server.url, ca, link)
    links.IDLE = 0.0
    assert links.take(server.url, ca) is None and link.conn.sock is None  # closed, not handed out
    links.IDLE = Links.IDLE
    attested(server, ca, evidence, links)
    link = links.take(server.url, ca)
    assert link is not None
    links.keep(server.url, ca, link)
    links.IDLE = 0.0  # kept too long: closed by the next keep, whatever its server (the URL changed, say)
    links.keep("https://another.example", ca, _Http("https://another.example", ca))
    assert link.conn.sock is None
    links.IDLE = Links.IDLE
    attested(server, ca, evidence, links)
    link = links.take(server.url, ca)
    assert link is not None
    links.keep(server.url, ca, link)
    server.stop()  # it closes its connections, the kept one too
    server.start()
    attested(server, ca, evidence, links)  # a new connection, not an error from the closed one
    assert link.conn.sock is None
    assert server.requests_to("attest") == 1  # counted since the restart: one round, not one resent


def test_a_watchdog_that_fires_after_its_exchange_leaves_the_kept_connection_alone(tls):
    """Timer.cancel() is too late for a watchdog already running: when an exchange ended at its timeout,
    the watchdog's cut came after request() returned, shut the socket the link was kept with (or served
    another exchange on) and marked that exchange cut off. A cut is now for its own exchange only."""
    server, ca, evidence = tls
    links = Links()
    attested(server, ca, evidence, links)
    link = links.take(server.url, ca)
    assert link is not None
    link._cut(object())  # the watchdog of an exchange that has ended: not the one under way (none)
    assert link.reusable
    links.keep(server.url, ca, link)
    attested(server, ca, evidence, links)  # on that connection, whole
    assert links.take(server.url, ca) is link


def test_only_the_kbs_session_id_cookie_is_the_session_and_without_its_attributes():
    """A server (or a proxy before it) may set other cookies too, before or after the session's: the
    session is kbs-session-id's value alone, sent back without Path or HttpOnly."""
    import socket
    import threading

    from keybroker.guest.client import _Http

    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(2):
                seen.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: lb=node1; Path=/\r\n"
                             b"Set-Cookie: kbs-session-id=abc123; Path=/kbs/v0; HttpOnly\r\n"
                             b"Set-Cookie: tracker=zzz\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    link = _Http(f"http://127.0.0.1:{listener.getsockname()[1]}", None)
    try:
        link.request("GET", "/kbs/v0/auth", None, {}, 5)  # no body: one recv, one request
        assert link.cookie == "abc123"
        link.request("GET", "/kbs/v0/attest", None, {}, 5)
    finally:
        link.conn.close()
        listener.close()
    thread.join(5)
    assert b"\r\nCookie: kbs-session-id=abc123\r\n" in seen[1]
