"""Secure defaults: a fresh key server releases nothing, and an operator's first policy pins an image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from keybroker.errors import PolicyError
from keybroker.server.policy import Policy, from_appraisals
from support.kbs import attest, keybroker
from support.policies import ANY_GUEST
from support.servers import write_secret

SECRET = b"released only under a policy"


def test_a_fresh_server_releases_nothing_and_says_why(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs(policy=None)
    server.put("default/key/a", SECRET)
    assert "no release policy is set: nothing will be released" in server.log()
    guest = attest(root, server.url)  # the evidence verifies; the policy decides
    refused = guest.fetch(server.url, "default/key/a")
    assert refused.status_code == 401 and refused.json()["type"].endswith("PolicyDenied")
    assert "no release policy is set" in refused.json()["detail"]
    handler(server.url, root)
    out = subprocess.run(["keyctl", "session", "-", "keyctl", "request2", "user", "keybroker:default/key/a", "", "@s"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr


def other_image(sim_state, tmp_path):  # type: ignore[no-untyped-def]
    """The same simulated platform running another image: a copy of the state with another MEASUREMENT."""
    state = tmp_path / "other-image"
    shutil.copytree(sim_state, state)
    values = json.loads((state / "snp" / "values.json").read_text())
    values["measurement"] = "ee" * 48
    (state / "snp" / "values.json").write_text(json.dumps(values))
    return state


def test_a_policy_from_evidence_releases_to_that_image_only(tsm_sim, sim_state, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(keybroker("evidence", "--tsm-root", str(root), "--nonce", "11" * 64).stdout)
    made = keybroker("policy", "from-evidence", str(evidence), "--resources", "default/*",
                     "--trust-roots", str(sim_state / "trust"))
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    conditions = {c["claim"]: c.get("equals") for c in document["rules"][0]["require"]["allOf"]}
    measurement = json.loads((sim_state / "snp" / "values.json").read_text())["measurement"]
    assert conditions["snp.measurement"] == measurement and "snp.host_data" in conditions
    assert conditions["snp.vmpl"] == 0 and not Policy(document).unpinned()

    server = kbs(policy=document)
    server.put("default/key/a", SECRET)
    server.put("other/key/a", SECRET)
    guest = attest(root, server.url)
    released = guest.fetch(server.url, "default/key/a")
    assert released.status_code == 200 and guest.decrypt(released) == SECRET
    assert guest.fetch(server.url, "other/key/a").status_code == 401  # not among the resources
    stranger = attest(tsm_sim("sev_guest", state=other_image(sim_state, tmp_path)), server.url)
    refused = stranger.fetch(server.url, "default/key/a")
    assert refused.status_code == 401 and f'claim snp.measurement is "{"ee" * 48}", not "{measurement}"' in \
        refused.json()["detail"]


def test_each_release_is_decided_on_the_newest_policy_whatever_the_worker_released_before(tsm_sim, sim_state, kbs,
                                                                                         tmp_path):
    """A worker decides a resource's release on what it decided the last one on (no read); it records
    one only if that is still the newest policy and value, and decides a refusal again on a fresh
    read. One worker, so that every release meets what it remembered: a policy that admits another
    image releases to it at once, and one that no longer admits it refuses it at once."""
    root = tsm_sim("sev_guest")
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(keybroker("evidence", "--tsm-root", str(root), "--nonce", "11" * 64).stdout)
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(keybroker("policy", "from-evidence", str(evidence), "--resources", "default/*",
                                 "--trust-roots", str(sim_state / "trust")).stdout)
    server = kbs("--workers", "1", policy=json.loads(pinned.read_text()))
    server.put("default/key/a", SECRET)
    remote = ("--server", server.url, "--admin-token-file", str(server.secrets.admin_token_file))
    guest = attest(root, server.url)
    stranger = attest(tsm_sim("sev_guest", state=other_image(sim_state, tmp_path)), server.url)

    assert guest.decrypt(guest.fetch(server.url, "default/key/a")) == SECRET  # remembered: version 1
    assert stranger.fetch(server.url, "default/key/a").status_code == 401
    anyone = tmp_path / "anyone.json"
    anyone.write_text(ANY_GUEST.dumps())
    assert keybroker("policy", "put", str(anyone), *remote).stdout == b"policy version 2 is active\n"
    released = stranger.fetch(server.url, "default/key/a")  # not refused under version 1
    assert released.status_code == 200 and stranger.decrypt(released) == SECRET, released.text
    assert keybroker("policy", "put", str(pinned), *remote).stdout == b"policy version 3 is active\n"
    refused = stranger.fetch(server.url, "default/key/a")  # not released under version 2
    assert refused.status_code == 401 and "policy version 3" in refused.json()["detail"]
    assert guest.decrypt(guest.fetch(server.url, "default/key/a")) == SECRET
    server.put("default/key/a", b"put again")  # not the value remembered
    assert guest.decrypt(guest.fetch(server.url, "default/key/a")) == b"put again"


def test_from_evidence_refuses_what_does_not_verify_and_debug_guests(tsm_sim, sim_state, tmp_path):
    root = tsm_sim("sev_guest")
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(keybroker("evidence", "--tsm-root", str(root), "--nonce", "11" * 64).stdout)
    untrusted = keybroker("policy", "from-evidence", str(evidence), "--resources", "*")
    assert untrusted.returncode != 0 and b"does not verify (ark_pinned" in untrusted.stderr
    debug = tmp_path / "debug.json"
    debug.write_bytes(keybroker("evidence", "--tsm-root", str(tsm_sim("sev_guest", "debug")),
                                "--nonce", "11" * 64).stdout)
    refused = keybroker("policy", "from-evidence", str(debug), "--resources", "*", "--trust-roots",
                        str(sim_state / "trust"))
    assert refused.returncode != 0 and b"debug guest" in refused.stderr


def test_policy_check_and_put_warn_about_rules_that_pin_no_measurement(tsm_sim, sim_state, tmp_path):
    root = tsm_sim("sev_guest")
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(keybroker("evidence", "--tsm-root", str(root), "--nonce", "11" * 64).stdout)
    loose = tmp_path / "loose.json"
    loose.write_text(ANY_GUEST.dumps())
    check = keybroker("policy", "check", str(loose), str(evidence), "--resource", "a/b/c",
                      "--trust-roots", str(sim_state / "trust"))
    assert check.returncode == 0 and b"warning: rule 0 (*) pins no measurement" in check.stderr
    db = f"sqlite:///{tmp_path / 'db'}"
    refused = keybroker("policy", "put", str(loose), "--db", db)  # stored with a MAC under the KEK: it needs it
    assert refused.returncode != 0 and b"no key-encryption key: give --kek-file" in refused.stderr
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    put = keybroker("policy", "put", str(loose), "--db", db, "--kek-file", str(kek))
    assert put.returncode == 0 and b"pins no measurement" in put.stderr


TDX = {"tee": "tdx", "debug": False, "tdx.mrtd": "aa" * 48, "tdx.mrconfigid": "00" * 48, "tdx.rtmr0": "01" * 48,
       "tdx.rtmr1": "02" * 48, "tdx.rtmr2": "03" * 48, "tdx.rtmr3": "04" * 48, "tdx.tdattributes.migratable": False}
CCA = {"tee": "cca", "debug": False, "cca.rim": "bb" * 32, "cca.rem0": "cc" * 32, "cca.personalization": "dd" * 64}


def test_starting_policies_pin_each_tees_image():
    policy = from_appraisals([TDX, CCA], ["default/*"], "two guests")
    assert not policy.unpinned()
    assert policy.decide("default/x", TDX).allowed and policy.decide("default/x", CCA).allowed
    assert not policy.decide("default/x", TDX | {"tdx.rtmr1": "ff" * 48}).allowed  # RTMR0-2 pinned
    assert policy.decide("default/x", TDX | {"tdx.rtmr3": "ff" * 48}).allowed      # RTMR3 (runtime) is not
    assert not policy.decide("default/x", TDX | {"tdx.tcb_status": "OutOfDate"}).allowed
    assert not policy.decide("default/x", CCA | {"cca.rim": "00" * 32}).allowed
    # Like SEV-SNP's HOST_DATA and TDX's MRCONFIGID, the realm's personalization value (its init-data)
    # is pinned; a TD that can be migrated is not asked for, as an SNP guest with a migration agent is not.
    assert not policy.decide("default/x", CCA | {"cca.personalization": "00" * 64}).allowed
    assert not policy.decide("default/x", TDX | {"tdx.tdattributes.migratable": True}).allowed
    assert not policy.decide("other/x", CCA).allowed


@pytest.mark.parametrize("require, pinned", [
    ({"claim": "measurement", "in": ["aa"]}, True),
    ({"allOf": [{"claim": "tee", "equals": "snp"}, {"claim": "snp.measurement", "equals": "aa"}]}, True),
    ({"anyOf": [{"claim": "tdx.mrtd", "equals": "aa"}, {"claim": "cca.rim", "equals": "bb"}]}, True),
    ({"anyOf": [{"claim": "tdx.mrtd", "equals": "aa"}, {"claim": "tee", "equals": "cca"}]}, False),
    ({"not": {"claim": "measurement", "equals": "aa"}}, False),
    ({"claim": "measurement", "exists": True}, False),
    (None, False),
])
def test_unpinned_rules_are_named(require, pinned):
    rule = {"resources": ["a/*"], **({"require": require} if require else {})}
    assert bool(Policy({"version": 1, "rules": [rule]}).unpinned()) is not pinned


SEV_CLAIMS = {"tee": "sev-es", "debug": False, "unbound": True, "measurement": "ab" * 32,
              "sev.launch_digest": "ab" * 32, "sev.chip_key": "cc" * 32}


def test_unbound_evidence_needs_a_rule_that_allows_it_and_pins_the_image():
    """SEV/SEV-ES evidence (claim unbound) is refused by every rule that does not set allow_unbound, with
    the reason; a rule may set it only when it pins a measurement and the chips; a malformed rule is a
    PolicyError whatever it sets."""
    pinned = {"allOf": [{"claim": "sev.launch_digest", "equals": "ab" * 32},
                        {"claim": "sev.chip_key", "in": ["cc" * 32]}]}
    refused = Policy({"version": 1, "rules": [{"resources": ["*"], "require": pinned}]}).decide("a/b/c", SEV_CLAIMS)
    assert not refused.allowed and refused.cause == "unbound" and "the evidence is unbound" in refused.reason
    assert not ANY_GUEST.decide("a/b/c", SEV_CLAIMS).allowed
    allowing = Policy({"version": 1, "rules": [{"resources": ["*"], "allow_unbound": True, "require": pinned}]})
    assert allowing.decide("a/b/c", SEV_CLAIMS).allowed
    assert not allowing.decide("a/b/c", SEV_CLAIMS | {"sev.launch_digest": "cd" * 32}).allowed
    assert not allowing.decide("a/b/c", SEV_CLAIMS | {"sev.chip_key": "dd" * 32}).allowed
    assert any("allow_unbound" in line for line in allowing.explain("a/b/c", SEV_CLAIMS))
    digest_only = {"claim": "sev.launch_digest", "equals": "ab" * 32}
    for require, missing in ((None, "measurement"), ({"claim": "tee", "equals": "sev-es"}, "measurement"),
                             ({"anyOf": [pinned, {"claim": "sev.policy.es", "equals": True}]}, "measurement"),
                             (digest_only, "platform"), ({"not": pinned}, "measurement")):
        rule = {"resources": ["*"], "allow_unbound": True} | ({"require": require} if require else {})
        with pytest.raises(PolicyError, match=f"allow_unbound but pins no {missing}"):
            Policy({"version": 1, "rules": [rule]})
    for require in ({"allOf": "ab"}, {"allOf": [1]}, [], {"anyOf": [None]}):
        with pytest.raises(PolicyError):
            Policy({"version": 1, "rules": [{"resources": ["*"], "allow_unbound": True, "require": require}]})
    with pytest.raises(PolicyError, match="allow_unbound must be true or false"):
        Policy({"version": 1, "rules": [{"resources": ["*"], "allow_unbound": "yes", "require": pinned}]})
    with pytest.raises(PolicyError, match="unbound"):
        from_appraisals([SEV_CLAIMS], ["a/*"], "sev")
