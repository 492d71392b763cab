"""A release is recorded only if the policy it was decided on and its resource are still the
database's when its record is committed: a change an administrator saw committed applies to
every release not yet answered, in any worker or replica."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.server import audit
from keybroker.server import kbs as kbs_module
from keybroker.server.admin import Admin
from keybroker.server.audit import ALLOW, ATTEST, DENY, RELEASE, Event
from keybroker.server.kbs import KeyServer, Problem
from keybroker.server.metrics import Metrics
from keybroker.server.sealing import Kek, Sealer
from keybroker.server.sessions import Session
from keybroker.server.store import Store
from keybroker.server.tokens import TokenSigner
from keybroker.verifier import TrustStore
from keybroker.wire import jwe
from keybroker.wire import rcar as p
from support.policies import ANY_GUEST_DOCUMENT
from support.postgres import fresh_database

KEK = Kek.from_bytes(bytes(range(32)), "test")
NEXT_KEK = Kek.from_bytes(bytes(range(1, 33)), "test")
PATH = "default/key/a"


def server(url: str, sealer: Sealer) -> tuple[KeyServer, Admin, str]:
    """A key server with a policy, a resource, and the cookie of a session it attested."""
    store = Store(url, sealer)
    kbs = KeyServer(store=store, sealer=sealer, trust=TrustStore.default(), tokens=TokenSigner(),
                    metrics=Metrics(), name="test")
    admin = Admin(store, sealer, "local:test", "test")
    admin.put_policy(json.dumps(ANY_GUEST_DOCUMENT))
    admin.put_resource(PATH, b"the first value")
    fresh, cookie = kbs.cookies.issue("cca", "the-nonce", 300)
    pubkey = jwe.public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    session = Session(fresh.id, "cca", fresh.nonce, "attested", fresh.expires, pubkey, {"tee": "cca", "debug": False})
    assert asyncio.run(store.end_attestation(session, Event(ATTEST, ALLOW, "test", "test"))) is not None
    return kbs, admin, cookie


def meanwhile(monkeypatch: pytest.MonkeyPatch, change) -> None:  # type: ignore[no-untyped-def]
    """Run ``change`` (committed) once, after the first release was decided and before its record."""
    wrap, done = jwe.wrap, []

    def wrapping(value: bytes, recipient: dict) -> dict:
        if not done:
            done.append(change())
        return wrap(value, recipient)
    monkeypatch.setattr(kbs_module.jwe, "wrap", wrapping)


@pytest.mark.parametrize(("change", "refused"), [
    (lambda admin: admin.reset_policy(), p.POLICY_DENIED),
    (lambda admin: admin.delete_resource(PATH), p.RESOURCE_NOT_FOUND),
])
def test_a_change_committed_while_a_release_was_made_applies_to_it(tmp_path, monkeypatch, change, refused):
    kbs, admin, cookie = server(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))
    meanwhile(monkeypatch, lambda: change(admin))
    with pytest.raises(Problem) as caught:
        asyncio.run(kbs.release(PATH, cookie, None, "peer"))
    assert caught.value.name == refused
    releases = [r.event for r in audit.records(kbs.store.engine) if r.event.event == RELEASE]
    assert [(e.decision, e.policy_version) for e in releases] == [(DENY, 2 if refused == p.POLICY_DENIED else 1)]


def test_a_release_during_a_kek_rotation_is_made_again_under_the_new_kek(tmp_path, monkeypatch):
    sealer = Sealer(NEXT_KEK, [KEK])
    kbs, _, cookie = server(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))
    kbs.sealer = sealer  # restarted with the new KEK and the old one
    meanwhile(monkeypatch, lambda: Admin(kbs.store, sealer, "local:test", "test").rotate_kek())
    answer = asyncio.run(kbs.release(PATH, cookie, None, "peer"))
    assert answer.audit == next(r.hash for r in audit.records(kbs.store.engine) if r.event.event == RELEASE)
    assert kbs.store.get_resource(PATH).sealed.kek_id == NEXT_KEK.id
    assert audit.verify(kbs.store.engine).ok


def test_a_release_that_keeps_meeting_changes_is_given_up(tmp_path, monkeypatch):
    kbs, admin, cookie = server(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))
    wrap = jwe.wrap

    def wrapping(value: bytes, recipient: dict) -> dict:
        admin.put_resource(PATH, f"value {time.monotonic()}".encode())
        return wrap(value, recipient)
    monkeypatch.setattr(kbs_module.jwe, "wrap", wrapping)
    with pytest.raises(Problem) as caught:
        asyncio.run(kbs.release(PATH, cookie, None, "peer"))
    assert caught.value.name == p.UNAVAILABLE and caught.value.status == 503
    assert not [r for r in audit.records(kbs.store.engine) if r.event.event == RELEASE]


def test_a_policy_removed_on_another_replica_applies_to_a_release_being_made(postgres, monkeypatch):
    with fresh_database(postgres) as url:
        kbs, _, cookie = server(url, Sealer(KEK))
        other = Admin(Store(url, Sealer(KEK)), Sealer(KEK), "local:test", "other replica")
        meanwhile(monkeypatch, other.reset_policy)
        with pytest.raises(Problem) as caught:
            asyncio.run(kbs.release(PATH, cookie, None, "peer"))
        assert caught.value.name == p.POLICY_DENIED and "policy version 2" in caught.value.detail
        kbs.store.close_connections()
        other.store.close_connections()
