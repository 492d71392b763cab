"""Attest once, many keys: the token /attest gives is kept in root's keyring and used for further
keys until it expires or the server refuses it; concurrent requests share one attestation."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import time
import traceback

import pytest

from keybroker.guest import tokens
from support.keyctl import keyctl_session, proc_keys

SECRETS = {f"default/disk/k{i}": hashlib.sha256(b"key %d" % i).digest() for i in range(8)}


@pytest.fixture
def broker(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs("--rate-limit", "0")
    for path, value in SECRETS.items():
        server.put(path, value)
    handler(server.url, root)
    return server


SKIPPED = 77


def in_child(test):
    """Run ``test`` in a forked child. Keeping a token gives the process a process keyring that
    links root's user keyring (tokens._keyring, for the handler's worker), and pytest's own process
    must not get one: the kernel then passes over a negative key whose error is not ENOKEY in the
    session keyring (see docs/guest.md), and tests that rely on the negative cache failed after."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                test(*args, **kwargs)
                code = 0
            except pytest.skip.Exception:
                code = SKIPPED
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == SKIPPED:
            pytest.skip("skipped in its child")
        assert os.waitstatus_to_exitcode(status) == 0, "the test failed in its child (traceback above)"
    return run


def request(*names: str) -> subprocess.CompletedProcess:
    """Request keys k<N> in one fresh session keyring, in parallel; print each key's sha256."""
    script = " & ".join(f'keyctl pipe $(keyctl request2 user keybroker:default/disk/{n} "" @s) | sha256sum'
                        for n in names)
    return keyctl_session(f"{script} & wait")


def released(out: subprocess.CompletedProcess, *names: str) -> bool:
    return out.returncode == 0 and all(hashlib.sha256(SECRETS[f"default/disk/{n}"]).hexdigest() in out.stdout
                                       for n in names)


def forget() -> None:
    subprocess.run([sys.executable, "-m", "keybroker", "forget-tokens"], check=True, capture_output=True)


def test_one_attestation_serves_many_keys(broker):
    assert released(request("k0"), "k0")
    assert released(request("k1"), "k1") and released(request("k2"), "k2")
    assert broker.requests_to("attest") == 1 and broker.requests_to("resource") == 3
    forget()  # the operator drops the kept tokens: the next key attests again
    assert released(request("k3"), "k3")
    assert broker.requests_to("attest") == 2


def test_kept_tokens_are_root_s_alone(broker):
    assert released(request("k0"), "k0")
    ring = subprocess.run(["keyctl", "search", "@u", "keyring", tokens.KEYRING], capture_output=True, text=True)
    assert ring.returncode == 0, ring.stderr
    serials = subprocess.run(["keyctl", "rlist", ring.stdout.strip()], capture_output=True, text=True).stdout.split()
    assert len(serials) == 1
    described = subprocess.run(["keyctl", "rdescribe", serials[0]], capture_output=True, text=True).stdout
    kind, uid, _gid, perm, description = described.strip().split(";", 4)
    assert kind == "user" and uid == "0" and description.startswith("keybroker:token:")
    assert int(perm, 16) & 0xFFFF == 0  # nothing for group or others
    nobody = keyctl_session(f"keyctl print {serials[0]}", user="nobody")
    assert nobody.returncode != 0 and "Permission denied" in nobody.stderr


def test_a_new_policy_applies_to_a_kept_token(broker, tmp_path):
    assert released(request("k0"), "k0")
    denying = tmp_path / "deny.json"
    denying.write_text('{"version": 1, "rules": [{"resources": ["default/disk/k0"], "require": '
                       '{"claim": "tee", "equals": "snp"}}]}')
    subprocess.run([sys.executable, "-m", "keybroker", "policy", "put", str(denying), "--db", broker.db,
                    "--kek-file", str(broker.secrets.kek)],
                   check=True, capture_output=True)
    out = request("k1")
    assert not released(out, "k1") and "Key was rejected by service" in out.stderr
    assert broker.requests_to("attest") == 1  # refused under the kept token, by the policy now in force


def test_a_refused_resource_neither_wastes_nor_drops_the_token(broker):
    """The token is kept at /attest, before the resource is fetched; a resource missing or denied is a
    refusal of the resource, not of the token: the next key needs no attestation."""
    missing = keyctl_session('keyctl request2 user keybroker:default/disk/none "" @s')
    assert missing.returncode != 0 and broker.requests_to("attest") == 1
    assert keyctl_session('keyctl request2 user keybroker:default/disk/gone "" @s').returncode != 0
    assert released(request("k0"), "k0")
    assert broker.requests_to("attest") == 1 and broker.requests_to("resource") == 3


def test_a_token_the_server_refuses_is_replaced_transparently(tsm_sim, kbs, handler):
    """A server restarted with a new (ephemeral) token key refuses the kept token: attest again."""
    root = tsm_sim("sev_guest")
    server = kbs()
    for path, value in SECRETS.items():
        server.put(path, value)
    handler(server.url, root)
    assert released(request("k0"), "k0")
    server.stop()
    server.start()  # same URL and database, another token-signing key
    assert released(request("k1"), "k1")
    assert server.requests_to("attest") == 1  # this process's count: one fresh attestation
    assert "result=verified" in server.log()


def test_another_server_is_not_served_a_token_of_the_first(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    first, second = kbs(), kbs()
    for server in (first, second):
        for path, value in SECRETS.items():
            server.put(path, value)
    handler(first.url, root)
    assert released(request("k0"), "k0")
    handler(second.url, root)
    assert released(request("k1"), "k1")
    assert first.requests_to("attest") == 1 and second.requests_to("attest") == 1


def test_concurrent_requests_share_one_attestation(tsm_sim, kbs, handler):
    slow = 2.0
    root = tsm_sim("sev_guest", f"slow={slow:g}")
    server = kbs("--rate-limit", "0")
    for path, value in SECRETS.items():
        server.put(path, value)
    handler(server.url, root, deadline=30)
    names = [f"k{i}" for i in range(6)]
    start = time.monotonic()
    out = request(*names)
    took = time.monotonic() - start
    assert released(out, *names), out.stderr
    assert server.requests_to("attest") == 1 and server.requests_to("resource") == 6
    # One report for six keys: serialised reports would take 6 x 2 s.
    assert took < 3 * slow, f"{took:.1f} s for six keys"


def cache_and_key(tmp_path):
    """A TokenCache for a configuration of its own, and a tee key (in the test's child: they go to root's keyring)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.guest import config

    if os.geteuid() != 0:
        pytest.skip("tokens are kept in root's keyring")
    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "http://127.0.0.1:1"\n')
    return tokens.TokenCache(config.load(path), None), ec.generate_private_key(ec.SECP256R1())


@in_child
def test_a_token_s_claimed_expiry_is_bounded_whatever_the_server_wrote(tmp_path, system_lock):
    """The exp of a token is the server's word, unverified by the guest: NaN, infinities and
    huge numbers keep nothing (and raise nothing), a far one is cut to LIFETIME_MAX, and a kept
    token whose exp has passed is not used, whatever the key's own timeout says."""
    import base64

    from keybroker.guest import keyring

    cache, key = cache_and_key(tmp_path)

    def token(exp: str) -> str:
        body = base64.urlsafe_b64encode(f'{{"exp": {exp}}}'.encode()).decode().rstrip("=")
        return f"e30.{body}.c2ln"

    def expiry() -> str:
        serial = keyring.search(keyring.search(keyring.USER_KEYRING, "keyring", tokens.KEYRING), "user",
                                cache.description)
        return proc_keys(serial)[3]

    tokens.forget_all()
    try:
        for exp in ("1e400", "-1e400", "NaN", "1" + "0" * 400, "true", '"soon"'):
            cache.store(token(exp), key)
            assert cache.load() is None, exp
        cache.store(token(str(2**40)), key)  # past what the kernel's unsigned timeout holds
        assert cache.load() is not None and expiry() in ("1d", "23h"), expiry()
        tokens.forget_all()
        fresh = token(str(int(time.time()) + 100))
        cache.store(fresh, key)
        held = cache.load()
        assert held is not None and held.token == fresh
        stale = token(str(int(time.time()) + tokens.MARGIN - 1))  # as if kept, then its exp came near
        ring = keyring.search(keyring.USER_KEYRING, "keyring", tokens.KEYRING)
        payload = tokens._FORMAT + stale.encode() + b"\n" + key.private_numbers().private_value.to_bytes(32, "big")
        keyring.add_key("user", cache.description, payload, ring)
        assert cache.load() is None
    finally:
        tokens.forget_all()


def test_requests_refused_their_token_together_share_one_attestation_again(tsm_sim, kbs, handler):
    """Each drops the refused token only if it is still the one kept: a late refusal does not
    throw away the fresh token another request attested for."""
    root = tsm_sim("sev_guest", "slow=1")
    server = kbs("--rate-limit", "0")
    for path, value in SECRETS.items():
        server.put(path, value)
    handler(server.url, root, deadline=30)
    assert released(request("k0"), "k0")
    server.stop()
    server.start()  # another token-signing key: the kept token is refused by every request
    names = [f"k{i}" for i in range(1, 7)]
    assert released(request(*names), *names)
    assert server.requests_to("attest") == 1  # (a refusal that arrived late used to cost a second one)


@in_child
def test_a_token_that_cannot_go_back_in_a_header_is_not_kept(tmp_path, system_lock):
    """The server's token goes back in ``Authorization: Bearer``: one with a line break (or anything
    but a JWT's characters) made http.client raise a ValueError that named it, in every request
    for as long as it was kept (a day), instead of attesting again."""
    import base64
    import socket

    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.guest import client, config

    if os.geteuid() != 0:
        pytest.skip("tokens are kept in root's keyring")
    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "http://127.0.0.1:1"\n')
    cache = tokens.TokenCache(config.load(path), None)
    key = ec.generate_private_key(ec.SECP256R1())
    claims = base64.urlsafe_b64encode(b'{"exp": %d}' % (time.time() + 3600)).decode().rstrip("=")
    good = f"e30.{claims}.c2ln"
    listener = socket.create_server(("127.0.0.1", 0))  # connections are taken, never answered
    tokens.forget_all()
    try:
        for bad in (good + "\nX-Injected: 1", good + "\r\n", good + " x", good + "=", f"e30.{claims}.c2ln\x00"):
            cache.store(bad, key)
            held = cache.load()
            if held is not None:  # what the next request would do with it
                rcar = client.RcarClient(f"http://127.0.0.1:{listener.getsockname()[1]}",
                                         deadline=time.monotonic() + 1, attempts=1)
                with pytest.raises(Exception) as failed:
                    rcar.fetch_with_token("default/disk/k0", held.token, held.key)
                pytest.fail(f"{bad!r} was kept, and then: {failed.value!r}")
        cache.store(good, key)
        held = cache.load()
        assert held is not None and held.token == good
    finally:
        tokens.forget_all()
        listener.close()


def test_requests_that_waited_for_a_failed_attestation_fail_as_it_did(tsm_sim, kbs, handler):
    """The attestation that others waited for is refused: they are refused with it (EKEYREJECTED, 60 s), at
    once. They used to attest one after another with the same evidence, a report each, and the last
    ones ran out of time waiting (ETIMEDOUT, 5 s: asked again at once)."""
    root = tsm_sim("sev_guest", "slow=2")
    server = kbs("--rate-limit", "0", trust=False)  # the simulated AMD root is not trusted: attestation denied
    server.put("default/disk/k0", SECRETS["default/disk/k0"])
    handler(server.url, root, deadline=6)
    names = [f"k{i}" for i in range(5)]
    out = keyctl_session(" & ".join(f'keyctl request2 user keybroker:default/disk/{n} "" @s' for n in names)
                         + " & wait")
    assert out.stderr.count("Key was rejected by service") == len(names), out.stderr
    assert server.requests_to("attest") == 1


def test_waiting_requests_go_on_once_the_attesting_one_has_kept_its_token(tmp_path):
    """The request that attests releases the others when its token is kept, not when its own key has
    been fetched too; a waiting thread of the same process (the agent's) and a waiting process both
    take the lock while the attesting request is still in its block."""
    import threading

    from keybroker.guest import config

    path = tmp_path / "client.toml"
    path.write_text(f'[server]\nurl = "http://127.0.0.1:1/{tmp_path.name}"\n')
    cache = tokens.TokenCache(config.load(path), None)
    took: list[str] = []
    ready = threading.Event()

    def thread() -> None:
        ready.wait()
        with cache.attesting(time.monotonic() + 10):
            took.append("thread")

    waiter = threading.Thread(target=thread)
    waiter.start()
    with cache.attesting(time.monotonic() + 10) as lock:
        child = os.fork()
        if child == 0:
            code = 1
            try:
                with cache.attesting(time.monotonic() + 10):
                    code = 0
            finally:
                os._exit(code)
        ready.set()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not took, "the lock was not held"
        assert os.waitpid(child, os.WNOHANG) == (0, 0), "the lock was not held"
        lock.release()
        waiter.join(timeout=10)
        _, status = os.waitpid(child, 0)
        assert took == ["thread"] and os.waitstatus_to_exitcode(status) == 0
    with cache.attesting(time.monotonic() + 1):  # released once, free again
        pass


def test_a_long_failure_is_recorded_whole_for_the_requests_that_waited(tmp_path):
    """A refusal's message (at most 2000 characters) may take six bytes a character in JSON: the waiting
    requests still read it whole and fail as the attesting one did, rather than each attesting again."""
    from keybroker.errors import ReleaseRefused
    from keybroker.guest import config

    path = tmp_path / "client.toml"
    path.write_text(f'[server]\nurl = "http://127.0.0.1:1/{tmp_path.name}"\n')
    cache = tokens.TokenCache(config.load(path), None)
    arrived = time.monotonic()
    with cache.attesting(arrived + 10) as lock:
        lock.record(ReleaseRefused("\x01\u00e9" * 5000, status=401, problem="\x01" * 5000))
        failure = lock.failure_since(arrived)
        assert isinstance(failure, ReleaseRefused) and str(failure).endswith("\x01\u00e9" * 1000), failure
        assert failure.status == 401 and failure.problem == "\x01" * 2000  # text attributes are cut too


def test_a_token_is_kept_apart_for_each_way_the_evidence_was_made(tmp_path):
    """Another server, CA, privilege level, configfs-tsm root, SVSM service or attestation broker needs a
    token of its own: each of them changes the kept token's name."""
    import dataclasses

    from keybroker.guest import config
    from keybroker.guest.aeb import Broker

    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "http://127.0.0.1:1"\n')
    base = config.load(path)
    others = [dataclasses.replace(base, server_url="http://127.0.0.1:2"),
              dataclasses.replace(base, server_ca=tmp_path / "ca.pem"),
              dataclasses.replace(base, tsm_root=tmp_path / "tsm"),
              dataclasses.replace(base, service_provider="svsm"),
              dataclasses.replace(base, service_provider="svsm", service_guid="c476f1eb-0123-4567-89ab-cdef01234567"),
              dataclasses.replace(base, aeb=Broker("unix:/run/aeb.sock", 1))]
    names = [tokens.TokenCache(base, None).description, tokens.TokenCache(base, 0).description,
             tokens.TokenCache(base, 1).description] + [tokens.TokenCache(c, None).description for c in others]
    assert len(set(names)) == len(names), names
    assert tokens.TokenCache(base, 1).description == tokens.TokenCache(config.load(path), 1).description


@in_child
def test_a_kept_token_is_root_s_alone_and_expires(tmp_path, system_lock):
    """What store keeps (and the keyring it keeps it in) grants group and others nothing and has a timeout;
    a token with less than a second left is not kept (its timeout would be 0: never)."""
    import base64

    from keybroker.guest import keyring

    cache, key = cache_and_key(tmp_path)

    def token(exp: float) -> str:
        return "e30.%s.c2ln" % base64.urlsafe_b64encode(b'{"exp": %f}' % exp).decode().rstrip("=")

    tokens.forget_all()
    try:
        cache.store(token(time.time() + tokens.MARGIN + 0.6), key)
        assert cache.load() is None  # not kept: with a timeout of 0 it would have been kept for good
        cache.store(token(time.time() + 3600), key)
        ring = keyring.search(keyring.USER_KEYRING, "keyring", tokens.KEYRING)
        kept = keyring.search(ring, "user", cache.description)
        for serial in (ring, kept):
            perm = int(proc_keys(serial)[4], 16)
            assert perm == tokens._OWNER_ONLY, hex(perm)
        assert proc_keys(kept)[3] in ("59m", "58m"), proc_keys(kept)
    finally:
        tokens.forget_all()


def test_a_failure_recorded_before_a_request_arrived_is_not_its_own(tmp_path):
    """A waiting request fails as the attestation it waited for did, not as an older one whose record is
    still in the lock file: that one it attests anew."""
    from keybroker.errors import ReleaseRefused
    from keybroker.guest import config

    path = tmp_path / "client.toml"
    path.write_text(f'[server]\nurl = "http://127.0.0.1:1/{tmp_path.name}"\n')
    cache = tokens.TokenCache(config.load(path), None)
    with cache.attesting(time.monotonic() + 10) as lock:
        lock.record(ReleaseRefused("refused", status=401, problem="denied"))
    arrived = time.monotonic()
    with cache.attesting(arrived + 10) as lock:
        assert lock.failure_since(arrived) is None
        assert isinstance(lock.failure_since(arrived - 60), ReleaseRefused)
