"""Hostile clients against a key server while legitimate guests keep fetching keys
(``python bench/server.py --hostile``).

Each scenario runs for a while against the server under a steady legitimate load; at the end
the benchmark prints whether the server stayed up, the legitimate releases' failures and
worst latency, the server's RSS growth, and the 5xx answers it gave.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server import RESOURCES, load, rss_bytes, servers

from keybroker.sim.roots import SimState


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _send(port: int, data: bytes, *, read: bool = True) -> bytes:
    with _connect(port) as s:
        try:
            s.sendall(data)
            return s.recv(65536) if read else b""
        except OSError:
            return b""


def abandoned_upload(port: int) -> None:
    """Declare 20 MB with Expect: 100-continue, send a little, hang up."""
    with _connect(port) as s:
        s.sendall(b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 20000000\r\nExpect: 100-continue\r\n\r\n" + b"{" * 4096)


def hang_up_before_answer(port: int) -> None:
    """A complete /auth, closed (with a reset) before the answer is read."""
    s = _connect(port)
    s.sendall(b'POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n'
              b'{"version":"0.4.0","tee":"snp","extra-params":{}}'.ljust(60))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def bad_chunking(port: int) -> None:
    _send(port, b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")


def malformed_http(port: int) -> None:
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                 b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
                 b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 99\r\n\r\n{}",
                 b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        _send(port, data)


def flood(port: int) -> None:
    """Cookie-less POST /attest: work that proves nothing, and must leave no audit record."""
    body = json.dumps({"tee-pubkey": {}, "tee-evidence": {}}).encode()
    _send(port, b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def mutated_evidence(port: int, sim: SimState, statuses: dict[int, int]) -> None:
    """A session whose evidence is a real report, bound and signed, with random bytes changed."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from server import Guest

    from keybroker.sim.providers import snp_report
    from keybroker.wire import envelope, jwe
    from keybroker.wire import rcar as p

    guest = Guest(sim.snp(), [port])
    _, cookie, body = guest._call(0, "POST", f"{p.PREFIX}/auth", p.AuthRequest("snp").to_json(), None)
    nonce = json.loads(body)["nonce"]
    public = jwe.public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()) | {"alg": jwe.ALGORITHM}
    binding = p.report_data(nonce, public)
    report = bytearray(snp_report(guest.ident, report_data=binding, vmpl=0))
    table = bytearray(guest.table)
    for _ in range(random.randint(1, 4)):
        blob = random.choice((report, table))
        blob[random.randrange(len(blob))] ^= 1 << random.randrange(8)
    evidence = envelope.to_json(envelope.TsmReport("sev_guest", 1, binding, bytes(report), bytes(table),
                                                   privlevel=0))
    status, _, _ = guest._call(0, "POST", f"{p.PREFIX}/attest", p.Attestation(nonce, public, evidence).to_json(),
                               cookie)
    statuses[status] = statuses.get(status, 0) + 1


def slowloris(port: int, stop: threading.Event, report: list[str]) -> None:
    """Many connections, each sending a header byte now and then."""
    conns = []
    for _ in range(200):
        try:
            s = _connect(port)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            conns.append(s)
        except OSError:
            break
    opened, start = len(conns), time.monotonic()
    while not stop.is_set():
        for s in list(conns):
            try:
                s.sendall(b"X-a: b\r\n")
            except OSError:
                conns.remove(s)
        stop.wait(1)
    report.append(f"slowloris: {opened} connections sending a header line a second; after "
                  f"{time.monotonic() - start:.0f} s {len(conns)} still open (the server closes requests that do "
                  "not arrive whole in time)")
    for s in conns:
        s.close()


def non_readers(port: int, stop: threading.Event, report: list[str]) -> None:
    """Connections that pipeline requests and read none of the answers (a small receive buffer)."""
    conns = []
    for _ in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        conns.append(s)  # counted before it asks: a reset while it sends is one of the outcomes
        with contextlib.suppress(OSError):
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 6000)
    opened, start = len(conns), time.monotonic()
    while not stop.is_set():
        conns = [s for s in conns if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_CLOSE]
        stop.wait(1)
    report.append(f"non-readers: {opened} connections pipelining requests, reading no answer; after "
                  f"{time.monotonic() - start:.0f} s {len(conns)} still open (the server resets them)")
    for s in conns:
        s.close()


TCP_CLOSE = 7  # tcpi_state of a connection the peer reset


def hostile(args, work: Path, sim: SimState, db: str) -> None:
    scenarios: list[tuple[str, Callable[[int], None], int]] = [
        ("abandoned 20 MB uploads (Expect: 100-continue)", abandoned_upload, 200),
        ("clients hanging up before the answer", hang_up_before_answer, 500),
        ("malformed chunk sizes", bad_chunking, 500),
        ("malformed HTTP (bad start lines, 1 MB headers, bad Content-Length)", malformed_http, 100),
        ("cookie-less POST /attest flood", flood, 2000),
        ("attestations with mutated evidence", lambda port: mutated_evidence(port, sim, mutated), 1000),
    ]
    mutated: dict[int, int] = {}
    with servers(work, sim, db, 1, args.workers) as fleet:
        server = fleet[0]
        assert server.proc is not None
        rss0 = rss_bytes(server.proc.pid)
        audit0 = server.metric("keybroker_http_requests_total")
        stop = threading.Event()
        report: list[str] = []
        loris = threading.Thread(target=slowloris, args=(server.port, stop, report))
        loris.start()
        readers = threading.Thread(target=non_readers, args=(server.port, stop, report))
        readers.start()
        legit: list = []
        background = threading.Thread(target=lambda: legit.append(
            load(sim.path, fleet, args.releases, 2, [next(iter(RESOURCES))])))
        background.start()
        errors: dict[str, int] = {}
        for name, scenario, count in scenarios:
            start = time.perf_counter()
            for _ in range(count):
                try:
                    scenario(server.port)
                except Exception as exc:
                    errors[name] = errors.get(name, 0) + 1
                    errors[f"{name}: {type(exc).__name__}"] = 1
            alive = server.proc.poll() is None
            print(f"{name}: {count} in {time.perf_counter() - start:.1f} s; server "
                  f"{'up' if alive else 'DOWN'}")
        background.join()
        stop.set()
        loris.join()
        readers.join()
        print("\n".join(report))
        run = legit[0]
        alive = server.proc.poll() is None
        fives = sum(server.metric("keybroker_http_requests_total", status=str(code)) for code in range(500, 505)) \
            if alive else float("nan")
        print(f"server {'alive' if alive else 'DEAD'}; legitimate releases: {run.releases} ok, "
              f"{len(run.failures)} failed, p99 {run.percentile(0.99) * 1e3:.0f} ms, "
              f"max {max(run.latencies, default=0) * 1e3:.0f} ms")
        if alive:
            print(f"server RSS {rss0 / 2**20:.0f} MiB -> {rss_bytes(server.proc.pid) / 2**20:.0f} MiB; "
                  f"5xx answers: {fives:.0f}; requests answered: "
                  f"{server.metric('keybroker_http_requests_total') - audit0:.0f}")
        print(f"mutated evidence answered: {dict(sorted(mutated.items()))}")
        for name, n in errors.items():
            print(f"  client-side errors in {name}: {n}")
