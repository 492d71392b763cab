"""Hostile HTTP clients against ``keybroker serve`` (workers and all): slow senders, huge heads,
bogus framing, abandoned uploads, floods. The server stays up, answers what it can with a
4xx, closes what it must, and keeps releasing keys to legitimate guests meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import ssl
import time

import requests

from keybroker.server.serve import HEAD_MAX, PIPELINE_MAX, REQUEST_TIMEOUT
from support import policies
from support.kbs import attest, audit_records
from support.pki import authority, server_files

TCP_CLOSE = 7  # tcpi_state of a connection the peer reset

SECRET = b"\x01hostile-proof key\xfe"


def exchange(port: int, data: bytes, *, wait: float = 5) -> bytes:
    """Send ``data`` and read until the server closes or ``wait`` passes; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def still_releases(root, server) -> None:
    assert server.proc.poll() is None, f"the server died: {server.log()[-2000:]}"
    assert server.metric("keybroker_http_requests_total", status="500") == 0
    assert "Traceback" not in server.log()
    guest = attest(root, server.url)
    released = guest.fetch(server.url, "default/key/a")
    assert released.status_code == 200 and guest.decrypt(released) == SECRET


def test_malformed_http_gets_4xx_and_the_server_goes_on(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    auth = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = {
        b"GARBAGE\r\n\r\n": {400},
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n": {200, 400, 505},  # h11 reads it as HTTP/1.1
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * HEAD_MAX) + b"\r\n\r\n": {431},
        auth + b"Content-Length: 10\r\nContent-Length: 99\r\n\r\n{}": {400},
        auth + b"Content-Length: -5\r\n\r\n": {400},
        auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n": {400},
        auth + b"Content-Length: 20000000\r\n\r\n{": {413},  # refused from its declared size, unread
    }
    for request, expected in cases.items():
        answer = exchange(server.port, request)
        assert status(answer) in expected, (request[:80], answer[:200])
    still_releases(root, server)


def test_a_huge_header_sent_in_pieces_is_cut_off(tsm_sim, kbs):
    """One header value streamed without end: refused once it passes the limit, not buffered to the end."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(b"a" * 8192)
                sent += 8192
        except OSError:
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert sent < 16 * 1024 * 1024, f"the server took {sent} bytes of one header (socket buffers hold a few MiB)"
    assert status(answer) in (431, 0), answer[:200]  # 0: the reset overtook the answer
    still_releases(root, server)


def test_a_request_must_arrive_whole_in_time(tsm_sim, kbs):
    """Slowloris: a head sent a line every second is cut off after REQUEST_TIMEOUT; so is a body."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    slow_head = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow_body.sendall(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\n")
    start = time.monotonic()
    closed: dict[str, float] = {}
    while len(closed) < 2 and time.monotonic() - start < REQUEST_TIMEOUT + 10:
        for name, sock in (("head", slow_head), ("body", slow_body)):
            if name in closed:
                continue
            try:
                sock.sendall(b"X-a: b\r\n" if name == "head" else b" ")
            except OSError:
                closed[name] = time.monotonic() - start
        still_releases(root, server)  # meanwhile, legitimate guests are served
        time.sleep(1)
    slow_head.close()
    slow_body.close()
    assert set(closed) == {"head", "body"}, "a slow request kept its connection"
    assert all(REQUEST_TIMEOUT - 1 <= t <= REQUEST_TIMEOUT + 5 for t in closed.values()), closed


def test_a_client_that_reads_no_answer_is_reset_after_the_timeout(tsm_sim, kbs):
    """Eight requests for a policy of a megabyte, none of the answers read: more than the socket
    buffers hold, so answers wait in the worker; after REQUEST_TIMEOUT the connection is reset (a
    close would wait for a reader that never comes). Eight: no pipeline limit is involved. (The
    reset comes from the deadline after the last answer sent; an answer the kernel's buffers
    cannot take whole, which pauses the worker's writes, has its own deadline of the same length,
    which these buffers, autotuned to megabytes on loopback, do not let a test reach.)"""
    root = tsm_sim("sev_guest")
    rule = policies.ANY_GUEST_DOCUMENT["rules"][0]
    big = {"version": 1, "rules": [rule | {"resources": [f"default/key/r{n:05d}" + "x" * 150]} for n in range(1500)]
           + [rule]}
    server = kbs(policy=big)
    server.put("default/key/a", SECRET)
    request = (b"GET /admin/v1/policy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
               % server.secrets.admin_token.encode())
    unread = socket.socket()
    unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    unread.connect(("127.0.0.1", server.port))
    unread.sendall(request * 8)
    assert PIPELINE_MAX >= 8
    start = time.monotonic()
    closed = None
    while closed is None and time.monotonic() - start < REQUEST_TIMEOUT + 10:
        if unread.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE:
            closed = time.monotonic() - start
        still_releases(root, server)  # meanwhile, legitimate guests are served
        time.sleep(0.5)
    unread.close()
    assert closed is not None and REQUEST_TIMEOUT - 1 <= closed <= REQUEST_TIMEOUT + 5, closed


def test_a_deep_pipeline_is_reset_before_it_is_parsed(tsm_sim, kbs):
    """Thousands of requests in one read would each hold their parsed state while they wait: the
    connection is reset once PIPELINE_MAX wait behind the one being answered."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        answers = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answers += chunk
    assert answers.count(b"HTTP/1.1 200") <= PIPELINE_MAX + 1
    still_releases(root, server)


def test_abandoned_uploads_and_hang_ups_leave_the_server_serving(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n"
                         b"Expect: 100-continue\r\n\r\n" + b"[" * 4096)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 49\r\n\r\n"
                         b'{"version":"0.4.0","tee":"snp","extra-params":{}}')
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # reset, unread
    still_releases(root, server)


def test_a_flood_of_cookieless_attestations_is_not_audited(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs("--rate-limit", "0")
    server.put("default/key/a", SECRET)
    before = len(audit_records(server.db))
    body = json.dumps({"tee-pubkey": {}, "tee-evidence": "{}"}).encode()
    request = (b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answers = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for batch in range(1, 51):  # pipelined ten at a time (deeper pipelines are reset)
            sock.sendall(request * 10)
            while answers.count(b"HTTP/1.1 ") < 10 * batch:
                answers += sock.recv(65536)
    assert answers.count(b"HTTP/1.1 400 ") + answers.count(b"HTTP/1.1 401 ") == 500
    assert len(audit_records(server.db)) == before
    still_releases(root, server)


def test_workers_share_metrics_and_a_dead_worker_is_replaced(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs("--workers", "2")
    server.put("default/key/a", SECRET)
    workers = [int(pid) for pid in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
    assert len(workers) == 2
    for _ in range(6):
        still_releases(root, server)
    assert server.metric("keybroker_releases_total") == 6  # whichever worker answers /metrics, it sums all
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = [int(p) for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead worker was not replaced")
    for _ in range(4):
        still_releases(root, server)
    assert server.metric("keybroker_releases_total") == 10  # the dead worker's counts are kept
    assert "worker 0" in server.log() and "starting another" in server.log()


def test_workers_end_with_their_supervisor(kbs):
    server = kbs("--workers", "2")
    workers = [int(pid) for pid in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
    server.proc.kill()  # SIGKILL: the supervisor cannot tell them
    server.proc.wait()
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
              for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.1)


def test_tls_connections_that_never_shake_hands_are_closed_in_time(kbs, tmp_path):
    """A TLS connection is under the protocol's limits only once its handshake is done: the
    handshake itself must end within REQUEST_TIMEOUT too (asyncio's default was 60 s)."""
    ca_key, ca_cert = authority(tmp_path, "ca")
    cert, key = server_files(tmp_path, ca_key, ca_cert)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # systemd's default soft limit
    try:
        server = kbs("--workers", "1", "--tls-cert", cert, "--tls-key", key, trust=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    [worker] = server.workers()
    limits = next(line for line in open(f"/proc/{worker}/limits") if line.startswith("Max open files")).split()
    assert limits[3] == limits[4] == str(hard), limits  # the soft limit raised to the hard one
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(300)]
    try:
        start = time.monotonic()
        tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        assert requests.get(f"{server.url}/healthz", verify=str(tmp_path / "ca.pem"), timeout=5).ok  # served meanwhile
        for sock in silent:
            sock.settimeout(max(0.1, start + REQUEST_TIMEOUT + 5 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b"", "the server sent something to a client that said nothing"
        assert time.monotonic() - start < REQUEST_TIMEOUT + 5
    finally:
        for sock in silent:
            sock.close()
    with socket.create_connection(("127.0.0.1", server.port)) as raw, tls.wrap_socket(raw, server_hostname="127.0.0.1"):
        pass  # a handshake that is made still is



def _server_side(server_port: int, client_port: int) -> tuple[bool, int]:
    """Whether the server still holds this connection open (established, or the client's end
    seen), and the bytes its kernel holds unsent on it."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == server_port and int(fields[2].split(":")[1], 16) == client_port:
            return fields[3] in ("01", "08"), int(fields[4].split(":")[0], 16)  # ESTABLISHED, CLOSE_WAIT
    return False, 0


def test_tls_connections_are_let_go_at_the_deadline_whatever_the_client_does(kbs, tmp_path):
    """Over TLS a close waits for the client's close_notify (asyncio: up to 30 s), and once the client
    sent it, for the client to read what is left: a silent client held a connection 40 s (slowloris)
    or 35 s (idle keep-alive), and one that confirmed the close without reading its answers, for
    ever. Each now ends within REQUEST_TIMEOUT, as over plain HTTP."""
    ca_key, ca_cert = authority(tmp_path, "ca")
    cert, key = server_files(tmp_path, ca_key, ca_cert)
    # Not limited: /metrics, whose large answers fill the kernel's buffers, is limited per address.
    server = kbs("--workers", "1", "--tls-cert", cert, "--tls-key", key, "--rate-limit", "0", trust=False)
    tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    started: dict[str, float] = {}
    raws: dict[str, socket.socket] = {}

    # Answers asked for, never read, until the server's kernel holds no more of them: the next one
    # stays in the worker's buffer; then the client confirms a close (close_notify) it never reads.
    unread = socket.socket()
    unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    unread.connect(("127.0.0.1", server.port))
    inside, outside = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.wrap_bio(inside, outside, server_hostname="127.0.0.1")
    while True:
        try:
            session.do_handshake()
            break
        except ssl.SSLWantReadError:
            unread.sendall(outside.read())
            inside.write(unread.recv(65536))
    unread.sendall(outside.read())
    me, queued = unread.getsockname()[1], 0
    for _ in range(10000):
        session.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        unread.sendall(outside.read())
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and (now := _server_side(server.port, me))[1] == queued:
            assert now[0], "the server let go of a client that reads slowly"
            time.sleep(0.005)
        if now[1] == queued > 0:
            break  # the server's kernel holds no more: this answer waits in the worker
        queued = now[1]
    with contextlib.suppress(ssl.SSLWantReadError):
        session.unwrap()
    unread.sendall(outside.read())
    started["unread"], raws["unread"] = time.monotonic(), unread

    # The other two connect once the unread client's answers wait in the worker, and are watched from
    # then on: filling its buffers takes seconds (more than REQUEST_TIMEOUT on a loaded host).
    slow = tls.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="127.0.0.1")
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
    started["slow"], raws["slow"] = time.monotonic(), slow
    idle = tls.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="127.0.0.1")
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")  # then silent: a keep-alive close it never confirms
    started["idle"], raws["idle"] = time.monotonic(), idle

    ended: dict[str, float] = {}
    while len(ended) < 3 and time.monotonic() - min(started.values()) < REQUEST_TIMEOUT + 20:
        for name, sock in raws.items():
            gone = (not _server_side(server.port, sock.getsockname()[1])[0] if name == "unread"
                    else sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1)  # 1: established
            if gone and name not in ended:
                ended[name] = time.monotonic() - started[name]
        time.sleep(0.2)
    for sock in raws.values():
        sock.close()
    # The unread client's deadline began when its answers stopped going out, before it confirmed the close.
    assert set(ended) == set(started), ended
    assert all(REQUEST_TIMEOUT - 1 <= t <= REQUEST_TIMEOUT + 5 for n, t in ended.items() if n != "unread"), ended
    assert ended["unread"] <= REQUEST_TIMEOUT + 5, ended
    assert requests.get(f"{server.url}/healthz", verify=str(tmp_path / "ca.pem"), timeout=5).ok


def test_a_pipelined_request_is_answered_however_long_its_answer_takes(monkeypatch):
    """A request queued behind another (HTTP/1.1 pipelining, PIPELINE_MAX deep) has arrived whole
    when uvicorn starts it: the deadline for a request to arrive does not cut its answer short. It
    did, counted from the end of the answer before: a pipelined /attest or admin call that took
    longer than REQUEST_TIMEOUT had its connection dropped with no answer."""
    import asyncio
    import threading

    import uvicorn

    from keybroker.server import serve

    monkeypatch.setattr(serve, "REQUEST_TIMEOUT", 1.0)

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(2)  # past REQUEST_TIMEOUT
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=serve.guarded_protocol(), ws="none",
                            lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = exchange(sock.getsockname()[1], b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
