"""What a client that proves nothing may cost the key server: no audit records, bounded logs and answers,
and a rate per address after which it is told to slow down."""

from __future__ import annotations

import http.client
import json
import time

import requests

from keybroker.server.ratelimit import RateLimiter
from keybroker.wire import rcar as p
from support import policies
from support.kbs import attest, attestation, audit_records, challenge

SECRET = b"for attested guests"


def stranger(server, source: str = "127.0.0.2") -> http.client.HTTPConnection:  # type: ignore[no-untyped-def]
    """A connection from another loopback address than the legitimate guests' (127.0.0.1)."""
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))


def test_a_flood_of_unauthenticated_requests_is_limited_and_leaves_no_audit_records(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    before = len(audit_records(server.db))
    lines_before = len(server.log().splitlines())
    attest_body = json.dumps({"runtime-data": {"nonce": "x", "tee-pubkey": {}}, "tee-evidence": {}})
    requests = [("POST", "/kbs/v0/attest", attest_body, {"Content-Type": "application/json"}),
                ("GET", "/kbs/v0/resource/default/key/a", None, {}),
                ("PUT", "/admin/v1/resources/default/key/evil", "x", {"Authorization": "Bearer " + "w" * 64}),
                ("POST", "/kbs/v0/auth", json.dumps({"version": "0.4.0", "tee": "snp", "extra-params": {}}),
                 {"Content-Type": "application/json"})]
    statuses: dict[int, int] = {}
    start = time.monotonic()
    conn = stranger(server)
    for i in range(2000):
        method, path, body, headers = requests[i % len(requests)]
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status == 429:
            assert int(response.getheader("Retry-After")) >= 1
    conn.close()
    answered = 2000 - statuses.get(429, 0)
    assert answered <= 200 + 20 * (time.monotonic() - start) + 5, statuses  # a burst of 200, then 20 per second
    assert len(audit_records(server.db)) == before
    assert len(server.log().splitlines()) - lines_before <= answered + 1  # at most a line per answer, one for the limit
    assert "peer=127.0.0.2: rate limited" in server.log()

    guest = attest(root, server.url)  # legitimate guests from another address are not slowed
    released = guest.fetch(server.url, "default/key/a")
    assert released.status_code == 200 and guest.decrypt(released) == SECRET
    for _ in range(300):  # nor are attested guests, however often they ask
        assert guest.fetch(server.url, "default/key/a").status_code == 200


def test_the_limit_is_configurable_and_can_be_turned_off(tsm_sim, kbs):
    tsm_sim("sev_guest")
    server = kbs("--rate-limit", "0")
    conn = stranger(server)
    for _ in range(500):
        conn.request("GET", "/kbs/v0/resource/default/key/a")
        response = conn.getresponse()
        response.read()
        assert response.status == 401
    tight = kbs("--rate-limit", "1", "--rate-burst", "3")
    conn = stranger(tight)
    codes = []
    for _ in range(6):
        conn.request("GET", "/kbs/v0/resource/default/key/a")
        response = conn.getresponse()
        response.read()
        codes.append(response.status)
    assert codes[:3] == [401] * 3 and 429 in codes[3:]


def test_metrics_and_readiness_are_limited_whatever_credential_comes_with_them(kbs):
    """/metrics sums every worker's metrics and /readyz pings the database: asked for again and again, they
    cost more than any refusal. They prove nothing, so a cookie or a token sent along does not make them
    free (as it defers the charge of a release until the credential proved nothing). /healthz, a
    liveness probe's, is not limited. (An address each: a bucket each.)"""
    server = kbs("--rate-limit", "0.1", "--rate-burst", "3")
    for source, path, headers in (("127.0.0.2", "/metrics", {}),
                                  ("127.0.0.3", "/readyz", {"Cookie": f"{p.SESSION_COOKIE}=x.snp.1.y"}),
                                  ("127.0.0.4", "/metrics", {"Authorization": "Bearer " + "t" * 40})):
        conn = stranger(server, source)
        codes = []
        for _ in range(5):
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            codes.append(response.status)
        assert codes == [200] * 3 + [429] * 2, (path, headers, codes)
    conn = stranger(server, "127.0.0.2")
    for _ in range(10):
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        assert response.status == 200


def test_an_answer_and_a_log_line_quote_little_of_what_a_client_sent(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    huge = "n" * 40_000
    http, nonce = challenge(server.url)
    _, body = attestation(root, nonce)
    body["tee-evidence"]["primary_evidence"] |= {f"{i}{huge}": 1 for i in range(20)}
    response = http.post(f"{server.url}/kbs/v0/attest", json=body, timeout=30)
    assert response.status_code == 401 and len(response.content) < 2048, response.content[:200]
    detail = response.json()["detail"]
    assert "unknown field(s): '0nnn" in detail and "and 15 more" in detail
    assert max(len(line) for line in server.log().splitlines()) < 2048


def test_envelope_errors_quote_little_too():
    import pytest

    from keybroker.errors import EnvelopeError
    from keybroker.wire import envelope

    with pytest.raises(EnvelopeError) as info:
        envelope.from_json({"version": "v" * 100_000, "provider": "x", "generation": 1, "inblob": "", "outblob": ""})
    assert len(str(info.value)) < 200
    with pytest.raises(EnvelopeError) as info:
        envelope.from_json({"n" * 100_000: 1, "m" * 100_000: 2})
    assert len(str(info.value)) < 300


def test_a_guest_the_policy_refuses_does_not_use_up_its_address(tsm_sim, kbs):
    """A policy denial, or a resource missing, follows a verified attestation: not a credential that
    proved nothing, so a guest asking for what it may not have does not get every guest behind its
    address limited."""
    root = tsm_sim("sev_guest")
    only_a = {"version": 1, "rules": [{"resources": ["default/key/a*"],
                                       "require": policies.ANY_GUEST_DOCUMENT["rules"][0]["require"]}]}
    server = kbs("--rate-limit", "1", "--rate-burst", "3", policy=only_a)
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)
    for n in range(10):
        denied = guest.fetch(server.url, f"default/key/b{n}")
        assert denied.status_code == 401 and denied.json()["type"].endswith("PolicyDenied"), denied.text
        missing = guest.fetch(server.url, f"default/key/a{n}")
        assert missing.status_code == 404, missing.text
    for _ in range(20):  # with its token too, which is a credential as its session cookie is
        assert guest.fetch(server.url, "default/key/a", bearer=True).status_code == 200
    released = guest.fetch(server.url, "default/key/a")
    assert released.status_code == 200 and guest.decrypt(released) == SECRET


def test_a_credential_that_sends_what_is_refused_pays_as_a_stranger_does(tsm_sim, kbs):
    """A session cookie is no pass for bodies the server refuses (too large, say): each costs a token."""
    tsm_sim("sev_guest")
    tight = kbs("--rate-limit", "1", "--rate-burst", "3")
    http, _ = challenge(tight.url)  # the cookie costs the first token
    codes = [http.post(f"{tight.url}/kbs/v0/attest", data=b"[" * (p.BODY_MAX + 1),
                       headers={"Content-Type": "application/json"}).status_code for _ in range(4)]
    assert codes[:2] == [413, 413] and codes[2:] == [429, 429], codes


def test_a_cookie_or_a_token_sent_to_auth_does_not_make_its_nonces_free(kbs):
    """/auth proves nothing whatever it carries: each takes a token, as a stranger's does (a forged
    cookie or Bearer token must not turn its nonces and sessions into work no one pays for)."""
    tight = kbs("--rate-limit", "0.01", "--rate-burst", "3", "--workers", "1", trust=False)  # one bucket per worker
    credentials = [{"Cookie": f"{p.SESSION_COOKIE}=forged"}, {"Authorization": "Bearer forged"}] * 2 + [{}]
    codes = [requests.post(f"{tight.url}/kbs/v0/auth", json=p.AuthRequest("snp").to_json(), headers=credential,
                           timeout=10).status_code for credential in credentials]
    assert codes == [200, 200, 200, 429, 429], codes


def test_an_admin_call_without_an_admin_token_is_refused_before_its_body_is_read(kbs):
    """A refused admin token costs no upload: the 401 comes at once, not after the body (of up to a
    resource's or a policy's size) arrived, or after the request deadline when it never does."""
    import socket

    server = kbs(trust=False)
    for target in (b"/admin/v1/resources/default/key/x", b"/admin/v1/policy"):
        for authorization in (b"Authorization: Bearer " + b"w" * 64 + b"\r\n", b""):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"PUT %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: 1000\r\n\r\n{"
                             % (target, authorization))  # and the rest never
                answer = b""
                while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 401 "), (target, authorization, answer[:200])


def test_a_path_no_route_serves_is_quoted_little(kbs):
    server = kbs(trust=False)
    for method in ("GET", "POST", "DELETE"):
        answer = requests.request(method, f"{server.url}/{'n' * 8000}", timeout=10)
        assert answer.status_code == 404 and len(answer.content) < 512, (method, answer.content[:200])


def test_a_forwarded_address_chooses_no_bucket_and_no_audit_peer(tsm_sim, kbs):
    """From loopback too (uvicorn believes X-Forwarded-For from 127.0.0.1 by default), a client
    cannot name its own address: not for the limiter, not for the audit log."""
    root = tsm_sim("sev_guest")
    tight = kbs("--rate-limit", "0.01", "--rate-burst", "3", "--workers", "1")  # one bucket per worker
    codes = [requests.post(f"{tight.url}/kbs/v0/auth", json=p.AuthRequest("snp").to_json(),
                           headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(5)]
    assert codes == [200, 200, 200, 429, 429], codes
    roomy = kbs()
    http = requests.Session()
    http.headers["X-Forwarded-For"] = "203.0.113.66"
    nonce = http.post(f"{roomy.url}/kbs/v0/auth", json=p.AuthRequest("snp").to_json()).json()["nonce"]
    _, body = attestation(root, nonce)
    assert http.post(f"{roomy.url}/kbs/v0/attest", json=body).status_code == 200
    assert [r["peer"] for r in audit_records(roomy.db) if r["event"] == "attest"] == ["127.0.0.1"]


def test_refused_credentials_sent_together_are_each_paid_for():
    """Credentials are let in while a token is left and charged once refused: forty sent at once
    all get in on the last token, and their peer then waits for all forty (up to a burst's debt)."""
    limiter = RateLimiter(rate=1, burst=2)
    assert limiter.take("192.0.2.1") is None  # one token left
    assert all(limiter.wait("192.0.2.1") is None for _ in range(40))  # all in flight at once
    for _ in range(40):
        limiter.charge("192.0.2.1")
    waited = limiter.wait("192.0.2.1")
    assert waited is not None and 2.9 < waited <= 3  # a debt of a whole burst, and no more: 3 s before the next


class Clock:
    """time.monotonic for the limiter, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_bucket_refills_to_its_burst_and_no_further(monkeypatch):
    from keybroker.server import ratelimit

    clock = Clock()
    monkeypatch.setattr(ratelimit, "time", clock)
    limiter = RateLimiter(rate=1, burst=3)
    assert limiter.take("192.0.2.1") is None
    clock.now += 3600  # an hour quiet earns no more than a burst
    assert [limiter.take("192.0.2.1") for _ in range(3)] == [None] * 3
    assert limiter.take("192.0.2.1") == 1.0


def test_a_peer_limited_again_after_it_recovered_is_logged_again(monkeypatch):
    from keybroker.server import ratelimit

    clock = Clock()
    monkeypatch.setattr(ratelimit, "time", clock)
    limiter = RateLimiter(rate=1, burst=1)
    for _ in range(2):
        assert limiter.take("192.0.2.1") is None and limiter.take("192.0.2.1") is not None
        assert limiter.newly_limited("192.0.2.1") and not limiter.newly_limited("192.0.2.1")
        clock.now += 1  # its token back: it is no longer limited


def test_the_table_of_peers_is_bounded_and_forgets_the_least_recently_seen(monkeypatch):
    """Many addresses cannot grow the table; a peer that keeps asking is not the one forgotten
    (else a limited peer would get a fresh burst from every few addresses someone else used)."""
    from keybroker.server import ratelimit

    monkeypatch.setattr(ratelimit, "time", Clock())  # no refills: a bucket once empty stays empty
    limiter = RateLimiter(rate=1, burst=1, peers_max=3)
    for peer in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert limiter.take(peer) is None
    assert limiter.wait("192.0.2.1") is not None  # .1, out of tokens, seen again: now the most recent
    assert limiter.take("192.0.2.4") is None  # a fourth peer: .2, the least recently seen, is forgotten
    assert len(limiter._buckets) == 3
    assert limiter.wait("192.0.2.1") is not None  # still out of tokens
    assert limiter.take("192.0.2.2") is None  # forgotten: a fresh bucket (and .3 is forgotten for it)
    assert limiter.wait("192.0.2.4") is not None and limiter.wait("192.0.2.1") is not None


def test_an_ipv6_host_cannot_rotate_through_its_network_for_fresh_tokens():
    limiter = RateLimiter(rate=1, burst=3)
    taken = [limiter.take(f"2001:db8:1:2::{n:x}") for n in range(1, 5)]  # one /64: one bucket
    assert taken[:3] == [None] * 3 and taken[3] is not None
    assert limiter.wait("2001:db8:1:2:ffff::1") is not None and limiter.newly_limited("2001:db8:1:2::99")
    assert limiter.take("2001:db8:1:3::1") is None  # the next /64 is another peer
    assert limiter.take("::ffff:192.0.2.1") is None and limiter.take("192.0.2.1") is None  # one IPv4 host
    assert limiter.take("192.0.2.1") is None and limiter.take("192.0.2.1") is not None
    assert limiter.take("192.0.2.2") is None and limiter.take("?") is None  # what is no address counts as itself


def test_a_cookie_of_backslashes_costs_no_more_than_another(kbs):
    """Starlette unquotes every cookie with http.cookies._unquote, quadratic in backslashes before
    Python 3.11.10: each request with a 16 KiB cookie held the worker's event loop half a second,
    before the rate limiter was asked, so a few connections froze every worker for every guest."""
    import socket

    from keybroker.server.serve import HEAD_MAX, PIPELINE_MAX

    server = kbs("--workers", "1", trust=False)
    quoted = b'"' + b"\\\\" * ((HEAD_MAX - 200) // 2) + b'"'
    for cookie in (b"kbs-session-id=" + quoted, b"other=" + quoted):
        request = b"GET /kbs/v0/resource/default/key/a HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n\r\n" % cookie
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(request * PIPELINE_MAX)
            answers = b""
            while answers.count(b"HTTP/1.1 ") < PIPELINE_MAX:
                answers += sock.recv(65536)
        assert answers.count(b"HTTP/1.1 401 ") == PIPELINE_MAX, answers[:300]
        assert time.monotonic() - start < 2, time.monotonic() - start  # it was 8 s


def test_the_session_cookie_is_read_among_others_and_quoted(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)
    name, cookie = p.SESSION_COOKIE, guest.session
    for header in (f'a=1; {name}="{cookie}"; b="\\\\x"', f"{name}=no; {name}={cookie}"):
        released = requests.get(f"{server.url}/kbs/v0/resource/default/key/a", headers={"Cookie": header})
        assert released.status_code == 200 and guest.decrypt(released) == SECRET, released.text
