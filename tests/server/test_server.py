"""The key server's RCAR endpoints, spoken to with the project's client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.errors import ProtocolError, ServerError
from keybroker.guest import client
from keybroker.guest.client import RcarClient, TokenRefused
from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.wire import envelope
from keybroker.wire import rcar as p
from support.servers import raw_server

SECRET = b"\x00resource bytes\xff"


def evidence_from(root):
    client = TsmClient(root)
    return lambda inblob: client.get_report(ReportRequest(inblob))


def test_release_and_errors_through_the_client(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    released = RcarClient(server.url).fetch("default/key/a", "snp", evidence_from(root))
    assert bytes(released.value) == SECRET and released.lease is None
    kept = []
    with pytest.raises(ServerError) as info:
        RcarClient(server.url).fetch("default/key/none", "snp", evidence_from(root),
                                     keep=lambda *held: kept.append(held))
    assert info.value.status == 404 and info.value.problem == "ResourceNotFound"
    (token, key), = kept  # handed over at /attest, before the resource was refused: it serves the next one
    # It names its session; the claims stay on the server: a TDX event log's tens of kilobytes of
    # claims would not fit in a request head (HEAD_MAX) as a Bearer token.
    assert len(token) < 600
    again = RcarClient(server.url).fetch_with_token("default/key/a", token, key)
    assert bytes(again.value) == SECRET
    with pytest.raises(TokenRefused):
        RcarClient(server.url).fetch_with_token("default/key/a", token[:-4] + "AAAA", key)


@pytest.mark.parametrize("lease", ["0", "4294967296", "9999999999", "60s", "-1", "9" * 5000])
def test_a_lease_the_keyring_cannot_hold_is_a_protocol_error(lease):
    headers = http.client.HTTPMessage()
    headers[p.LEASE_HEADER] = lease
    with pytest.raises(ProtocolError, match="Keybroker-Lease"):
        client._released(client._Response(200, "OK", headers, b"{}"), ec.generate_private_key(ec.SECP256R1()))


def test_untrusted_roots_are_denied_with_the_failed_check(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs(trust=False)  # the simulated ARK is not pinned
    server.put("default/key/a", SECRET)
    with pytest.raises(ServerError) as info:
        RcarClient(server.url).fetch("default/key/a", "snp", evidence_from(root))
    assert info.value.status == 401 and info.value.problem == "AttestationDenied"
    assert "ark_pinned" in str(info.value)


def rcar(server, root, *, nonce_override=None):
    """Auth and attest by hand; return the HTTP session, the attestation and the /attest response."""
    from jwcrypto import jwk

    http = requests.Session()
    challenge = http.post(f"{server.url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp",
                                                             "extra-params": {}}).json()
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    public = json.loads(key.export_public()) | {"alg": "ECDH-ES+A256KW"}
    inblob = p.report_data(nonce_override or challenge["nonce"], public)
    report = TsmClient(root).get_report(ReportRequest(inblob))
    body = p.Attestation(challenge["nonce"], public, envelope.to_json(report)).to_json()
    return http, body, http.post(f"{server.url}/kbs/v0/attest", json=body)


def test_nonces_are_single_use_and_bound(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    http, body, first = rcar(server, root)
    assert first.status_code == 200 and "token" in first.json()
    replay = http.post(f"{server.url}/kbs/v0/attest", json=body)
    assert replay.status_code == 401 and replay.json()["type"].endswith("UnknownSession")
    # Evidence made for another nonce does not bind this session's challenge.
    _, _, unbound = rcar(server, root, nonce_override="c29tZSBvdGhlciBub25jZQ==")
    assert unbound.status_code == 401 and "binding" in unbound.json()["detail"]
    assert "inblob is not SHA-384" in server.log()


def test_bearer_token_and_cookie(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    http, _, attested = rcar(server, root)
    by_cookie = http.get(f"{server.url}/kbs/v0/resource/default/key/a")
    assert by_cookie.status_code == 200 and set(by_cookie.json()) == {"protected", "encrypted_key", "iv",
                                                                     "ciphertext", "tag"}
    token = attested.json()["token"]
    by_token = requests.get(f"{server.url}/kbs/v0/resource/default/key/a",
                            headers={"Authorization": f"Bearer {token}"})
    assert by_token.status_code == 200
    forged = requests.get(f"{server.url}/kbs/v0/resource/default/key/a",
                          headers={"Authorization": f"Bearer {token[:-4]}AAAA"})
    assert forged.status_code == 401 and forged.json()["type"].endswith("NotAttested")
    anonymous = requests.get(f"{server.url}/kbs/v0/resource/default/key/a")
    assert anonymous.status_code == 401


def test_a_head_request_for_a_resource_releases_nothing(tsm_sim, kbs):
    """Starlette answers HEAD on GET routes by running them: a release recorded, its key never sent."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    http, _, _ = rcar(server, root)
    head = http.head(f"{server.url}/kbs/v0/resource/default/key/a")
    assert head.status_code == 405 and head.headers["Allow"] == "GET"
    assert "result=released" not in server.log()
    assert http.get(f"{server.url}/kbs/v0/resource/default/key/a").status_code == 200
    assert server.log().count("result=released") == 1


@pytest.mark.parametrize("body, status, problem", [
    ({"version": "0.1.1", "tee": "snp", "extra-params": {}}, 400, "ProtocolVersion"),
    ({"version": "0.4.0", "tee": "sgx"}, 400, "BadRequest"),
    ({"version": "0.4.0"}, 400, "BadRequest"),
    ("not an object", 400, "BadRequest"),
])
def test_bad_auth_requests(kbs, body, status, problem):
    server = kbs()
    response = requests.post(f"{server.url}/kbs/v0/auth", json=body)
    assert response.status_code == status and response.json()["type"] == f"urn:keybroker:error:{problem}"
    assert response.headers["content-type"] == "application/problem+json"


def test_oversized_and_malformed_bodies(kbs):
    server = kbs()
    big = requests.post(f"{server.url}/kbs/v0/auth", data=b"x" * (p.BODY_MAX + 1))
    assert big.status_code == 413
    garbage = requests.post(f"{server.url}/kbs/v0/attest", data=b"{not json")
    assert garbage.status_code == 400
    bad_path = requests.get(f"{server.url}/kbs/v0/resource/a/../b")
    assert bad_path.status_code in (400, 401, 404)


def test_a_chunked_body_is_bounded_as_it_arrives(kbs):
    """No Content-Length to refuse it by: a chunked body is refused once more than the limit arrived."""
    server = kbs(trust=False)
    chunks = [b"x" * 65536] * (p.BODY_MAX // 65536) + [b"x"]  # BODY_MAX + 1 bytes, all sent before the answer
    for path in ("/kbs/v0/auth", "/kbs/v0/attest"):
        answer = requests.post(f"{server.url}{path}", data=iter(chunks), timeout=30)
        assert answer.status_code == 413 and answer.json()["type"].endswith("PayloadTooLarge"), answer.text[:200]
    exact = requests.post(f"{server.url}/kbs/v0/auth", data=iter(chunks[:-1]), timeout=30)  # at the limit: read
    assert exact.status_code == 400 and "not JSON" in exact.json()["detail"], exact.text[:200]


def test_what_no_route_serves_is_a_problem_document(kbs):
    server = kbs(trust=False)
    for method, path, status, problem in (("GET", "/kbs/v0/auth", 405, "MethodNotAllowed"),
                                          ("GET", "/nope", 404, "NotFound"),
                                          ("POST", "/kbs/v0/nothing", 404, "NotFound")):
        answer = requests.request(method, f"{server.url}{path}", timeout=10)
        assert answer.status_code == status and answer.json()["type"] == f"urn:keybroker:error:{problem}"
        assert answer.headers["content-type"] == "application/problem+json" and path in answer.json()["detail"]
    assert requests.get(f"{server.url}/kbs/v0/attest", timeout=10).headers["Allow"] == "POST"


def test_plain_http_only_on_loopback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "keybroker", "serve", "--listen", "0.0.0.0:18999",
                          "--db", f"sqlite:///{tmp_path}/x.db"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "refusing plain HTTP on 0.0.0.0" in out.stderr


def test_resource_command(tmp_path):
    from support.servers import write_secret

    db = f"sqlite:///{tmp_path}/r.db"
    kek = write_secret(tmp_path / "kek", b"k" * 32)

    def run(*args, data=None):
        return subprocess.run([sys.executable, "-m", "keybroker", "resource", *args, "--db", db,
                               "--kek-file", str(kek)], input=data, capture_output=True, timeout=30)

    assert run("put", "default/key/one", data=b"value-1").returncode == 0
    (tmp_path / "v2").write_bytes(b"value-2")
    assert run("put", "default/key/two", "--file", str(tmp_path / "v2"), "--lease", "60").returncode == 0
    listing = run("list").stdout.decode()
    assert "default/key/one\t7 bytes" in listing and "default/key/two\t7 bytes\tlease 60 s" in listing
    assert "value" not in listing
    assert run("get", "default/key/one").stdout == b"value-1"
    options_first = subprocess.run([sys.executable, "-m", "keybroker", "resource", "put", "--db", db, "--kek-file",
                                    str(kek), "default/key/three", "--file", str(tmp_path / "v2")],
                                   capture_output=True, timeout=30)
    assert options_first.returncode == 0, options_first.stderr
    assert run("get", "default/key/three").stdout == b"value-2"
    (tmp_path / "planted").symlink_to(tmp_path / "v2")  # someone's link where the key would go
    for existing in (tmp_path / "v2", tmp_path / "planted"):
        refused = run("get", "default/key/three", "--file", str(existing))
        assert refused.returncode != 0 and b"exists; name a new file" in refused.stderr
    assert (tmp_path / "v2").read_bytes() == b"value-2"
    assert run("get", "default/key/three", "--file", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == b"value-2" and oct((tmp_path / "out").stat().st_mode & 0o777) == "0o600"
    assert run("rm", "default/key/one").returncode == 0
    assert run("get", "default/key/one").returncode != 0
    assert b"must be <repo>/<type>/<tag>" in run("put", "bad", data=b"x").stderr
    assert oct((tmp_path / "r.db").stat().st_mode & 0o777) == "0o600"


def test_evidence_slower_than_the_servers_keep_alive(tsm_sim, kbs):
    """The round's connection idles while the guest makes its evidence; the server closes it after
    KEEP_ALIVE seconds (Trustee's actix after 5 s too), and /attest goes on a new one."""
    import time

    from keybroker.server.serve import KEEP_ALIVE

    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    quick = evidence_from(root)

    def slow(inblob):
        time.sleep(KEEP_ALIVE + 1)
        return quick(inblob)

    released = RcarClient(server.url, attempts=1).fetch("default/key/a", "snp", slow)
    assert bytes(released.value) == SECRET


def test_an_attest_answered_then_cut_is_a_new_round(tsm_sim, kbs):
    """A connection reset after the server read /attest (and spent its nonce), as a worker that died
    before it answered or a proxy that cut it: the round is made again, as for any reset. Sent once
    more on the same session, /attest can only find its nonce spent (401 UnknownSession, final)."""
    import contextlib
    import socket
    import struct
    import threading

    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    upstream = server.url.removeprefix("http://").split(":")
    cut: list[bool] = []

    def relay(guest: socket.socket) -> None:
        kbs_side = socket.create_connection((upstream[0], int(upstream[1])))
        attesting = threading.Event()

        def ask() -> None:  # the guest's requests, whole, to the server
            with contextlib.suppress(OSError):
                while data := guest.recv(1 << 16):
                    if b"POST /kbs/v0/attest " in data:
                        attesting.set()
                    kbs_side.sendall(data)

        threading.Thread(target=ask, daemon=True).start()
        with guest, kbs_side, contextlib.suppress(OSError):
            while answer := kbs_side.recv(1 << 16):
                if attesting.is_set() and not cut:  # the server answered /attest; the guest is reset instead
                    cut.append(True)
                    guest.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    guest.shutdown(socket.SHUT_RD)  # ends ask()'s recv: the close is then a reset
                    return
                guest.sendall(answer)

    with raw_server(lambda guest: threading.Thread(target=relay, args=(guest,), daemon=True).start()) as port:
        released = RcarClient(f"http://127.0.0.1:{port}", backoff=0.1).fetch("default/key/a", "snp",
                                                                             evidence_from(root))
    assert cut and bytes(released.value) == SECRET


def in_process(tmp_path):
    """A key server in this process (SQLite), with a resource and a policy that lets any attested guest have it."""
    from keybroker.server.admin import Admin
    from keybroker.server.kbs import KeyServer
    from keybroker.server.metrics import Metrics
    from keybroker.server.sealing import Kek, Sealer
    from keybroker.server.store import Store
    from keybroker.server.tokens import TokenSigner
    from keybroker.verifier import TrustStore
    from support.policies import ANY_GUEST_DOCUMENT

    sealer = Sealer(Kek.from_bytes(bytes(range(32)), "test"))
    store = Store(f"sqlite:///{tmp_path}/kbs.db", sealer)
    server = KeyServer(store=store, sealer=sealer, trust=TrustStore.default(), tokens=TokenSigner(),
                       metrics=Metrics(), name="test")
    admin = Admin(store, sealer, "local:test", "test")
    admin.put_policy(json.dumps(ANY_GUEST_DOCUMENT))
    admin.put_resource("default/key/a", SECRET)
    return server


def stored(server, state):
    """The cookie and the token of a session ``server`` stored in ``state`` (attested or failed)."""
    import asyncio

    from keybroker.server.audit import ALLOW, ATTEST, DENY, Event
    from keybroker.server.sessions import Session
    from keybroker.wire import jwe

    fresh, cookie = server.cookies.issue("cca", "the-nonce", 300)
    attested = state == "attested"
    pubkey = jwe.public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()) if attested else None
    session = Session(fresh.id, "cca", fresh.nonce, state, fresh.expires, pubkey,
                      {"tee": "cca", "debug": False} if attested else None)
    event = Event(ATTEST, ALLOW if attested else DENY, "test", "test")
    assert asyncio.run(server.store.end_attestation(session, event)) is not None
    return cookie, server.tokens.issue("cca", fresh.id, fresh.expires)


def released(server, cookie=None, bearer=None):
    """The answer's problem name, or None when ``default/key/a`` was released."""
    import asyncio

    from keybroker.server.kbs import Problem

    try:
        asyncio.run(server.release("default/key/a", cookie, bearer, "peer"))
    except Problem as problem:
        return problem.name
    return None


def test_a_session_is_released_to_only_while_its_cookie_is_good_and_it_attested(tmp_path, monkeypatch):
    """The stored session proves the attestation; the cookie's MAC and end prove that this guest holds it
    still: a session id with another MAC, a cookie past its end, a session whose attestation failed (its
    cookie or a token naming it) are not attested."""
    import time

    from keybroker.server import cookies

    server = in_process(tmp_path)
    cookie, token = stored(server, "attested")
    assert released(server, cookie) is None and released(server, bearer=token) is None
    forged = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
    assert released(server, forged) == p.NOT_ATTESTED
    failed_cookie, failed_token = stored(server, "failed")
    assert released(server, failed_cookie) == p.NOT_ATTESTED
    assert released(server, bearer=failed_token) == p.NOT_ATTESTED
    later = time.time() + 301
    monkeypatch.setattr(cookies.time, "time", lambda: later)  # the row is not purged yet; the cookie has ended
    assert released(server, cookie) == p.NOT_ATTESTED


@pytest.mark.parametrize("sealed", ["'text'", "12345", "1.5"])
def test_a_sealed_value_that_is_no_bytes_in_the_database_is_an_altered_row(tmp_path, sealed):
    """SQLite keeps text or a number in a BLOB column too: the release ended in a TypeError (500 with a
    traceback, and no record of the refusal) and rotate-kek in one, rather than naming the altered row."""
    import sqlite3

    from keybroker.errors import SealError
    from keybroker.server.admin import Admin
    from keybroker.server.audit import records

    server = in_process(tmp_path)
    cookie, _ = stored(server, "attested")
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        db.execute(f"UPDATE resources SET sealed = {sealed} WHERE path = 'default/key/a'")
    assert released(server, cookie) == p.INTERNAL
    assert list(records(server.store.engine))[-1].event.reason.startswith("resource default/key/a cannot be unsealed")
    administrator = Admin(server.store, server.sealer, "local:test", "test")
    with pytest.raises(SealError, match=r"no bytes: the row .* was altered"):
        administrator.rotate_kek()
    assert [(r.path, r.size, r.altered) for r in administrator.list_resources()] == [("default/key/a", None, True)]


@pytest.mark.parametrize("provider, tee", [("tdx_guest", "snp"), ("sev_guest", "tdx"), ("sev_guest", "cca")])
def test_an_envelope_from_another_tee_than_the_sessions_is_refused(provider, tee):
    """The session's TEE is what its cookie names and its token says: evidence of another TEE would be
    appraised as what it is, under a session (and token) that claims otherwise."""
    from keybroker.errors import EvidenceError
    from keybroker.server.kbs import _evidence

    report = envelope.TsmReport(provider=provider, generation=1, inblob=bytes(64), outblob=b"x")
    with pytest.raises(EvidenceError, match=f"from provider {provider}, not"):
        _evidence(tee, envelope.to_json(report))


def test_a_test_server_whose_port_was_taken_starts_on_another_not_mistaking_the_taker_for_itself(tmp_path):
    """Tests run in parallel: between free_port() and its bind, another test's server may take the
    port. What answers there then is not this server (a test once read another's log that way)."""
    import http.server
    import threading

    from support.servers import KeyServerProcess

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    taker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=taker.serve_forever, daemon=True).start()
    server = KeyServerProcess(tmp_path, None, "--workers", "1")
    server._use_port(taker.server_address[1], https=False)
    try:
        server.start()
        assert server.port != taker.server_address[1] and server.proc is not None and server.proc.poll() is None
        assert f"serving on 127.0.0.1:{server.port} " in server.log()
    finally:
        server.stop()
        taker.shutdown()
