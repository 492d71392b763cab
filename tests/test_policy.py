"""Release policy evaluation and validation."""

from __future__ import annotations

import pytest

from keybroker.errors import PolicyError
from keybroker.policy import DEFAULT, Policy

SNP = {"tee": "snp", "debug": False, "measurement": "aa" * 48, "snp.vmpl": 0, "snp.policy.migrate_ma": False,
       "snp.reported_tcb.microcode": 72, "snp.firmware.current": "1.55.43"}


def policy(*rules):
    return Policy({"version": 1, "rules": list(rules)})


def test_default_policy():
    assert DEFAULT.decide("default/disk/root", SNP).allowed
    denied = DEFAULT.decide("default/disk/root", SNP | {"debug": True})
    assert not denied.allowed and "debug guest" in denied.reason
    denied = DEFAULT.decide("default/disk/root", SNP | {"snp.vmpl": 2})
    assert not denied.allowed and "claim snp.vmpl is 2, not 0" in denied.reason
    tdx = {"tee": "tdx", "debug": False}
    assert DEFAULT.decide("a/b/c", tdx).allowed  # TCB not evaluated: no collateral
    assert DEFAULT.decide("a/b/c", tdx | {"tdx.tcb_status": "UpToDate"}).allowed
    denied = DEFAULT.decide("a/b/c", tdx | {"tdx.tcb_status": "OutOfDate"})
    assert not denied.allowed and "OutOfDate" in denied.reason


def test_first_matching_rule_decides_and_default_deny():
    p = policy({"resources": ["default/disk/*"], "require": {"claim": "measurement", "equals": "AA" * 48}},
               {"resources": ["default/*"], "require": {"claim": "tee", "equals": "tdx"}})
    assert p.decide("default/disk/root", SNP).allowed  # hex compares case-insensitively
    denied = p.decide("default/other/x", SNP)
    assert not denied.allowed and denied.rule == 1 and 'claim tee is "snp", not "tdx"' in denied.reason
    denied = p.decide("elsewhere/a/b", SNP)
    assert not denied.allowed and "no policy rule covers resource 'elsewhere/a/b'" in denied.reason


def test_operators_name_the_failed_condition():
    p = policy({"resources": ["*"], "require": {"allOf": [
        {"claim": "snp.reported_tcb.microcode", "atLeast": 70},
        {"claim": "snp.firmware.current", "atLeast": "1.55.40"},
        {"claim": "tee", "in": ["snp", "tdx"]},
        {"not": {"claim": "snp.vmpl", "atLeast": 1}},
        {"anyOf": [{"claim": "snp.host_data", "exists": True}, {"claim": "snp.vmpl", "atMost": 0}]},
    ]}})
    assert p.decide("x", SNP).allowed
    denied = p.decide("x", SNP | {"snp.reported_tcb.microcode": 60})
    assert "claim snp.reported_tcb.microcode is 60, below 70" in denied.reason
    denied = p.decide("x", SNP | {"snp.firmware.current": "1.55.9"})
    assert 'claim snp.firmware.current is "1.55.9", below "1.55.40"' in denied.reason
    denied = p.decide("x", SNP | {"snp.vmpl": 1})
    assert "must not hold" in denied.reason
    denied = p.decide("x", {k: v for k, v in SNP.items() if k != "tee"})
    assert "claim tee is absent" in denied.reason


def test_allow_debug_is_explicit():
    p = policy({"resources": ["*"], "allow_debug": True})
    assert p.decide("x", SNP | {"debug": True}).allowed
    assert not policy({"resources": ["*"]}).decide("x", {"tee": "snp"}).allowed  # debug unknown: refused


@pytest.mark.parametrize("doc, message", [
    ([], "must be a JSON object"),
    ({"version": 2, "rules": []}, "version must be 1"),
    ({"version": 1, "rules": [{"resources": []}]}, "non-empty list of patterns"),
    ({"version": 1, "rules": [{"resources": ["*"], "require": {"claim": "x"}}]}, "exactly one of"),
    ({"version": 1, "rules": [{"resources": ["*"], "require": {"claim": "x", "atLeast": "new"}}]},
     "dotted version"),
    ({"version": 1, "rules": [{"resources": ["*"], "require": {"allOf": []}}]}, "non-empty list"),
    ({"version": 1, "rules": [{"resources": ["*"], "extra": 1}]}, "unknown member(s): extra"),
])
def test_invalid_policies(doc, message):
    with pytest.raises(PolicyError) as info:
        Policy(doc)
    assert message in str(info.value)
