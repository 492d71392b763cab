"""A hostile report cannot make the verifier hammer AMD's KDS or tie up the key server.

A stand-in KDS on loopback counts what it is asked; reports are built to the specification
with random chip identities, so that nothing but the KDS could hold their VCEKs.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from keybroker.errors import EvidenceError
from keybroker.verifier import Context, Evidence, Fetcher, TrustStore, verify
from keybroker.verifier.fetch import WouldFetch
from support import snp as sb
from support.stub import QuietHandler, StubServer


class StandInKds(StubServer):
    """Answers 404 to everything, after ``delay`` seconds; counts requests and the most in flight at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.paths: list[str] = []
        self.in_flight = self.most = 0
        lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.paths.append(self.path)
                    outer.in_flight += 1
                    outer.most = max(outer.most, outer.in_flight)
                time.sleep(delay)
                with lock:
                    outer.in_flight -= 1
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)


@pytest.fixture
def kds():
    stand_in = StandInKds()
    yield stand_in
    stand_in.close()


def random_chip_report(nonce: bytes) -> bytes:
    p = sb.platform("Genoa")
    p.chip_id = os.urandom(64)
    return sb.report(p, report_data=nonce)


def test_an_unbound_report_fetches_nothing(kds):
    report = random_chip_report(bytes(64))
    verdict = verify(Evidence("sev_guest", report), Context(TrustStore.default(), nonce=b"\x01" * 64,
                                                            kds_url=kds.url, fetcher=Fetcher()))
    assert verdict.failures[0].name == "nonce_binding" and kds.paths == []


def test_a_failure_is_remembered_instead_of_asked_again(kds):
    fetcher = Fetcher()
    nonce = b"\x02" * 64
    report = random_chip_report(nonce)
    for _ in range(5):
        verdict = verify(Evidence("sev_guest", report), Context(TrustStore.default(), nonce=nonce, kds_url=kds.url,
                                                                fetcher=fetcher))
        assert verdict.failures[0].name == "certificates"
    assert len(kds.paths) == 1  # the VCEK's 404, once; the other four came from memory


def test_the_offline_view_never_asks_but_knows_what_failed(kds):
    """The key server's event loop verifies offline: WouldFetch, not a verdict, when the network is needed."""
    fetcher = Fetcher()
    nonce = b"\x03" * 64
    report = random_chip_report(nonce)
    context = Context(TrustStore.default(), nonce=nonce, kds_url=kds.url, fetcher=fetcher.offline())
    with pytest.raises(WouldFetch):
        verify(Evidence("sev_guest", report), context)
    assert kds.paths == []
    online = verify(Evidence("sev_guest", report), Context(TrustStore.default(), nonce=nonce, kds_url=kds.url,
                                                           fetcher=fetcher))
    assert online.failures[0].name == "certificates" and len(kds.paths) == 1
    remembered = verify(Evidence("sev_guest", report), context)  # the 404 is remembered: a verdict, offline
    assert remembered.failures[0].name == "certificates" and len(kds.paths) == 1


def verify_many(stand_in: StandInKds, fetcher: Fetcher, count: int) -> list[tuple[float, str]]:
    """``count`` verifications at once, each of a report with a chip nobody else has: (seconds, reason)."""
    results: list[tuple[float, str]] = []

    def one() -> None:
        nonce = os.urandom(64)
        start = time.monotonic()
        verdict = verify(Evidence("sev_guest", random_chip_report(nonce)),
                         Context(TrustStore.default(), nonce=nonce, kds_url=stand_in.url, fetcher=fetcher))
        results.append((time.monotonic() - start, verdict.reason()))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_fetches_in_flight_are_bounded():
    stand_in = StandInKds(delay=0.5)
    try:
        results = verify_many(stand_in, Fetcher(concurrency=2), 8)
    finally:
        stand_in.close()
    assert len(results) == 8 and len(stand_in.paths) == 8
    assert stand_in.most == 2  # eight at once asked two at a time


def test_a_stalling_service_costs_each_verification_its_budget_at_most():
    stand_in = StandInKds(delay=10)
    try:
        results = verify_many(stand_in, Fetcher(budget=2.0, concurrency=2), 6)
    finally:
        stand_in.close()
    assert len(results) == 6 and max(seconds for seconds, _ in results) < 2.0 + 1.0
    assert all("AMD KDS" in reason for _, reason in results)
    assert len(stand_in.paths) <= 4  # those that got no slot within the budget gave up without asking


class RawServer:
    """Answers every connection with ``head`` at once, then ``drip`` a byte every ``pause`` seconds
    (over TLS with ``tls``: an ssl.SSLContext)."""

    def __init__(self, head: bytes, drip: bytes, pause: float, tls: Any = None) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}/x"

        def serve() -> None:
            while True:
                try:
                    conn, _ = self.listener.accept()
                    if tls is not None:
                        conn = tls.wrap_socket(conn, server_side=True)
                except OSError:
                    return
                with conn:
                    try:
                        conn.recv(65536)
                        conn.sendall(head)
                        for byte in drip:
                            conn.sendall(bytes([byte]))
                            time.sleep(pause)
                    except OSError:  # the fetcher gave up and hung up
                        pass
        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def cut_off(url: str, match: str | None = None) -> None:
    """A fetch of ``url`` with a budget of 1.5 s fails (EvidenceError, matching ``match``) within it."""
    start = time.monotonic()
    with pytest.raises(EvidenceError, match=match):
        Fetcher(budget=1.5).get(url, service="Intel PCS", limit=1024)
    assert time.monotonic() - start < 1.5 + 0.5


@pytest.mark.parametrize("head, drip", [
    (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Padding: " + b"y" * 100),  # headers dripped
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;", b"e" * 200),  # a chunk's size line
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 100000\r\n\r\n\x1f\x8b\x08\x00\x00\x00"
     b"\x00\x00\x00\xff", b"\x00\x00\x00\xff\xff" * 40),  # gzip that decodes to nothing, dripped
])
def test_an_exchange_dripped_anywhere_is_cut_off_at_the_budget(head, drip):
    """A service (or whoever is in the path to a plain-HTTP PCCS) that sends a byte now and then
    holds no fetch, nor its slot, past the budget: not in its headers, a chunk's size line, or a
    compressed body that decodes to nothing."""
    server = RawServer(head, drip, pause=0.1)
    try:
        cut_off(server.url)
    finally:
        server.close()


def test_an_https_exchange_dripped_is_cut_off_at_the_budget(tmp_path, monkeypatch):
    """TLS takes the connection over from the socket first made (detaching its descriptor): the
    watchdog must still reach it."""
    import ssl

    from support.pki import authority, server_files

    ca_key, ca_cert = authority(tmp_path, "ca")
    cert, key = server_files(tmp_path, ca_key, ca_cert)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = RawServer(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Padding: " + b"y" * 100, 0.1, tls)
    try:
        cut_off(server.url, r"gave no answer .* within 1.5 s")
    finally:
        server.close()


def test_a_body_cut_off_at_the_budget_is_no_answer():
    """A body that ends with its connection (no length, not chunked) looks whole when the watchdog
    shuts the connection: it is a timeout all the same, not a shorter answer."""
    server = RawServer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"0123456789" * 10, 0.1)
    try:
        with pytest.raises(EvidenceError, match=r"gave no answer .* within 1.5 s"):
            Fetcher(budget=1.5).get(server.url, service="Intel PCS", limit=1024)
    finally:
        server.close()


def test_a_dripping_answer_is_cut_off_at_the_budget():
    """requests' timeout is per socket read: a body sent a byte at a time must not hold a fetch
    (and its slot) past its budget. This one would take 5 s; the budget is 1.5 s."""
    dripping = RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100, pause=0.05)
    try:
        cut_off(dripping.url, r"gave no answer .* within 1.5 s")
    finally:
        dripping.close()
