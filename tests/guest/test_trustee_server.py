"""keybroker's handler against a Trustee KBS: keyctl -> /sbin/request-key -> handler -> a server
that behaves as Trustee's (tests/support/trustee_kbs.py) -> keyring, with no server-specific
configuration: the handler's Request offers the envelope, Trustee's Challenge does not take it up,
and the handler sends Trustee's per-TEE evidence form."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from keybroker.guest.client import RcarClient
from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.sim.roots import SimState
from support.keyctl import keyctl_session
from support.trustee_kbs import TrusteeKbs, running

SECRET = hashlib.sha256(b"a disk key kept by Trustee").digest()
FORMS = {"sev_guest": ("snp", "attestation_report"), "tdx_guest": ("tdx", "quote"), "arm_cca_guest": ("cca", "token")}


@pytest.fixture
def trustee_kbs(sim_state) -> Iterator[TrusteeKbs]:
    with ExitStack() as stack:
        yield stack.enter_context(running(SimState(sim_state).trust_dir))


@pytest.mark.parametrize("provider", list(FORMS))
def test_the_handler_obtains_a_key_from_a_trustee_kbs(tsm_sim, trustee_kbs, handler, provider):
    root = tsm_sim(provider)
    trustee_kbs.resources["default/disk/root"] = SECRET
    handler(trustee_kbs.url, root)
    out = keyctl_session('id=$(keyctl request2 user keybroker:default/disk/root "" @s) && keyctl pipe $id | sha256sum')
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout
    tee, member = FORMS[provider]
    auth, attest = (next(body[kind] for body in trustee_kbs.seen if kind in body) for kind in ("auth", "attest"))
    assert auth["tee"] == tee and auth["extra-params"]["keybroker-evidence"] == "envelope"
    primary = attest["tee-evidence"]["primary_evidence"]
    assert member in primary and "provider" not in primary  # Trustee's form, not keybroker's envelope


def test_the_client_binds_with_the_hash_a_trustee_kbs_selects(tsm_sim, trustee_kbs):
    """Trustee appraising TDX through Intel Trust Authority selects SHA-512 for REPORT_DATA from the hashes
    the Request offers (guest-components offers them and follows the choice); the binding was SHA-384 always,
    so such a KBS refused every key (EKEYREJECTED). In-process: the upcall runs the installed handler."""
    root = tsm_sim("tdx_guest")
    trustee_kbs.resources["default/disk/root"] = SECRET
    trustee_kbs.binding_hash = "sha512"
    tsm = TsmClient(root)
    released = RcarClient(trustee_kbs.url, attempts=1).fetch("default/disk/root", "tdx",
                                                             lambda inblob: tsm.get_report(ReportRequest(inblob)))
    assert bytes(released.value) == SECRET
    auth = next(body["auth"] for body in trustee_kbs.seen if "auth" in body)
    assert "sha512" in auth["extra-params"]["supported-hash-algorithms"]


def test_a_trustee_policy_denial_is_a_rejected_key(tsm_sim, trustee_kbs, handler):
    root = tsm_sim("sev_guest")
    trustee_kbs.resources["default/disk/root"] = SECRET
    trustee_kbs.policy_allows = False
    handler(trustee_kbs.url, root)
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s')
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr


def test_evidence_trustee_refuses_is_a_rejected_key(tsm_sim, trustee_kbs, handler):
    root = tsm_sim("sev_guest", "corrupt-signature")
    trustee_kbs.resources["default/disk/root"] = SECRET
    handler(trustee_kbs.url, root)
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s')
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr


def test_a_resource_trustee_cannot_serve_leaves_the_kept_token_good(tsm_sim, trustee_kbs, handler):
    """Trustee answers a missing resource with 401 PluginInternalError: a refusal of the resource, not
    of the token (only TokenNotFound and TokenVerifierError are), so further keys need no attestation."""
    root = tsm_sim("sev_guest")
    trustee_kbs.resources["default/disk/root"] = SECRET
    handler(trustee_kbs.url, root)
    for name in ("none", "gone"):
        out = keyctl_session(f'keyctl request2 user keybroker:default/disk/{name} "" @s')
        assert out.returncode != 0
    out = keyctl_session('id=$(keyctl request2 user keybroker:default/disk/root "" @s) && keyctl pipe $id | sha256sum')
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout
    assert sum("attest" in body for body in trustee_kbs.seen) == 1
