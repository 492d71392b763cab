"""Release policy evaluation and validation."""

from __future__ import annotations

import pytest

from keybroker.errors import PolicyError
from keybroker.server.policy import POLICY_MAX, Policy
from support.policies import ANY_GUEST

SNP = {"tee": "snp", "debug": False, "measurement": "aa" * 48, "snp.vmpl": 0, "snp.policy.migrate_ma": False,
       "snp.reported_tcb.microcode": 72, "snp.firmware.current": "1.55.43"}


def policy(*rules):
    return Policy({"version": 1, "rules": list(rules)})


def test_default_policy():
    assert ANY_GUEST.decide("default/disk/root", SNP).allowed
    denied = ANY_GUEST.decide("default/disk/root", SNP | {"debug": True})
    assert not denied.allowed and "debug guest" in denied.reason
    denied = ANY_GUEST.decide("default/disk/root", SNP | {"snp.vmpl": 2})
    assert not denied.allowed and "claim snp.vmpl is 2, not 0" in denied.reason
    tdx = {"tee": "tdx", "debug": False, "tdx.tdattributes.migratable": False}
    assert ANY_GUEST.decide("a/b/c", tdx).allowed  # TCB not evaluated: no collateral
    assert ANY_GUEST.decide("a/b/c", tdx | {"tdx.tcb_status": "UpToDate"}).allowed
    denied = ANY_GUEST.decide("a/b/c", tdx | {"tdx.tcb_status": "OutOfDate"})
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
    # A version the host chose (init-data's, say) too long to be a number: not comparable, denied.
    denied = p.decide("x", SNP | {"snp.firmware.current": "1." + "9" * 5000})
    assert not denied.allowed and "snp.firmware.current" in denied.reason


def test_allow_debug_is_explicit():
    p = policy({"resources": ["*"], "allow_debug": True})
    assert p.decide("x", SNP | {"debug": True}).allowed
    assert not policy({"resources": ["*"]}).decide("x", {"tee": "snp"}).allowed  # debug unknown: refused


@pytest.mark.parametrize("doc, message", [
    ([], "must be a JSON object"),
    ({"version": 2, "rules": []}, "version must be 1"),
    ({"version": 1, "rules": [{"resources": []}]}, "non-empty list of patterns"),
    ({"version": 1, "rules": [{"resources": ["default/disk/k?"]}]}, "rules[0].resources: resource pattern"),
    ({"version": 1, "rules": [{"resources": ["default/[a-c]*"]}]}, "'*' (the only wildcard)"),
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


def test_patterns_match_as_documented():
    p = policy({"resources": ["a/*/c", "x*y*y", "lit/er/al", "*.key"]})
    for name in ("a/b/c", "a/b/d/c", "a//c", "xyy", "x/y/zy", "lit/er/al", "d/k/a.key", ".key"):
        assert p.decide(name, SNP).allowed, name
    for name in ("a/b/cd", "b/a/c", "xy", "x/y", "lit/er/al2", "lit/er/a", "d/k/a.key2", "d/k/akey"):
        assert p.decide(name, SNP).cause == "no_rule", name


def test_a_policy_of_many_patterns_decides_quickly():
    import time

    # fnmatch caches 32768 compiled patterns: with more, each release compiled every one again
    # (seconds of the event loop per release for a policy within POLICY_MAX).
    p = Policy.loads('{"version": 1, "rules": [{"resources": [%s]}]}' %
                     ", ".join(f'"r{i}/*"' for i in range(80000)))
    assert len(p.dumps()) < POLICY_MAX
    started = time.monotonic()
    for _ in range(3):
        assert p.decide("default/key/x", SNP).cause == "no_rule"
    assert time.monotonic() - started < 2


def test_decisions_say_why_in_one_word():
    p = policy({"resources": ["disk/*"], "require": {"claim": "snp.vmpl", "equals": 0}})
    assert p.decide("disk/a/b", SNP).cause == "allowed"
    assert p.decide("disk/a/b", SNP | {"snp.vmpl": 1}).cause == "condition"
    assert p.decide("disk/a/b", SNP | {"debug": True}).cause == "debug"
    assert p.decide("net/a/b", SNP).cause == "no_rule"


def test_explain_lists_rules_and_every_condition():
    p = policy({"resources": ["net/*"]},
               {"resources": ["disk/*"], "require": {"allOf": [
                   {"claim": "tee", "in": ["snp", "tdx"]},
                   {"anyOf": [{"claim": "snp.vmpl", "equals": 0}, {"claim": "snp.host_data", "exists": True}]},
                   {"not": {"claim": "snp.reported_tcb.microcode", "atMost": 60}},
                   {"claim": "snp.firmware.current", "atLeast": "1.56"}]}},
               {"resources": ["*"]})
    lines = p.explain("disk/a/b", SNP | {"snp.vmpl": 2})
    assert lines == [
        "rule 0 (net/*): does not match disk/a/b",
        "rule 1 (disk/*): matches disk/a/b",
        "  PASS claim debug is false",
        "  FAIL allOf",
        '    PASS claim tee is "snp", one of ["snp", "tdx"]',
        "    FAIL anyOf",
        "      FAIL claim snp.vmpl is 2, not 0",
        "      FAIL claim snp.host_data is absent",
        "    PASS not",
        "      FAIL claim snp.reported_tcb.microcode is 72, above 60",
        '    FAIL claim snp.firmware.current is "1.55.43", below "1.56"',
        "=> DENY: rule 1 (disk/*): none of these holds: claim snp.vmpl is 2, not 0 | claim snp.host_data is absent",
    ]
    assert p.explain("disk/a/b", SNP | {"snp.firmware.current": "1.56.1"})[-1] == \
        "=> ALLOW: rule 1 (disk/*): all conditions hold"
    assert p.explain("x", SNP | {"debug": True})[-2:] == [
        "  FAIL claim debug is true: a debug guest, and the rule does not set allow_debug",
        "=> DENY: rule 2 (*): the guest is a debug guest (claim debug is true) and the rule does not set allow_debug"]


def test_digest_ignores_layout_and_nesting_is_bounded():
    a = Policy.loads('{"version": 1, "rules": [{"resources": ["*"]}]}')
    b = Policy.loads('{"rules":[{"resources":["*"]}],\n "version":1}')
    assert a.digest == b.digest and a.digest != ANY_GUEST.digest
    deep: dict = {"claim": "tee", "exists": True}
    for _ in range(20):
        deep = {"not": deep}
    with pytest.raises(PolicyError, match="nest deeper than 16"):
        policy({"resources": ["*"], "require": deep})


@pytest.mark.parametrize("where", ["comment", "equals"])
def test_a_value_nested_too_deeply_anywhere_is_refused_not_a_crash(where):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    rule = ({"resources": ["*"], "comment": deep} if where == "comment"
            else {"resources": ["*"], "require": {"claim": "x", "equals": deep}})
    with pytest.raises(PolicyError, match="deeper than 64 levels"):
        policy(rule)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("where", ["equals", "comment"])
def test_a_number_json_cannot_carry_is_refused(number, where):
    # Python's JSON reader takes these; the admin API's answer (strict JSON) could not carry the
    # stored policy back: GET /admin/v1/policy was a 500 for ever after.
    rule = ('{"resources": ["*"], "comment": [%s]}' if where == "comment"
            else '{"resources": ["*"], "require": {"claim": "x", "equals": %s}}') % number
    with pytest.raises(PolicyError, match="NaN, Infinity"):
        Policy.loads('{"version": 1, "rules": [%s]}' % rule)


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_the_policy_version_is_the_integer_1(version):
    # true and 1.0 equal 1 in Python: such a policy would be stored under another digest than
    # the same policy written with 1.
    with pytest.raises(PolicyError, match="policy version must be 1"):
        Policy.loads('{"version": %s, "rules": []}' % version)


def test_true_is_not_1_inside_arrays_and_objects_either():
    rule = policy({"resources": ["*"], "require": {"claim": "x", "equals": [1, {"a": 0}]}})
    assert not rule.decide("a/b/c", {"debug": False, "x": [True, {"a": False}]}).allowed
    assert rule.decide("a/b/c", {"debug": False, "x": [1, {"a": 0}]}).allowed
    hex_rule = policy({"resources": ["*"], "require": {"claim": "x", "equals": {"m": ["ABCD"]}}})
    assert hex_rule.decide("a/b/c", {"debug": False, "x": {"m": ["abcd"]}}).allowed


def test_equals_and_contains_compare_whole_arrays_and_objects():
    """An array equals one of the same length only, an object one of the same members only; a
    contained object must have every member wanted (an element lacking one is no match)."""
    rule = policy({"resources": ["*"], "require": {"claim": "x", "equals": [1, {"a": 0}]}})
    for claim in ([1], [1, {"a": 0}, 2], [1, {}], [1, {"a": 0, "b": 1}], [{"a": 0}]):
        assert not rule.decide("a/b/c", {"debug": False, "x": claim}).allowed, claim
    assert rule.decide("a/b/c", {"debug": False, "x": [1, {"a": 0}]}).allowed
    contains = policy({"resources": ["*"], "require": {"claim": "x", "contains": {"domain": "d", "content": "c"}}})
    for elements in ([{"domain": "d"}], [{"content": "c"}, {"domain": "d"}], [{"domain": "d", "content": "C"}]):
        assert not contains.decide("a/b/c", {"debug": False, "x": elements}).allowed, elements
    assert contains.decide("a/b/c", {"debug": False, "x": [{"domain": "d"}, {"domain": "d", "content": "c",
                                                                              "extra": 1}]}).allowed


def test_not_over_an_absent_claim_does_not_pass():
    policy = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {"allOf": [
        {"claim": "tee", "equals": "snp"},
        {"not": {"claim": "snp.policy.migrate_ma", "equals": True}}]}}]})
    assert policy.decide("a/b/c", {"tee": "snp", "debug": False, "snp.policy.migrate_ma": False}).allowed
    assert not policy.decide("a/b/c", {"tee": "snp", "debug": False, "snp.policy.migrate_ma": True}).allowed
    lacking = policy.decide("a/b/c", {"tee": "snp", "debug": False})  # evidence without the claim at all
    assert not lacking.allowed and "claim snp.policy.migrate_ma is absent" in lacking.reason
    nested = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {
        "not": {"anyOf": [{"claim": "x", "equals": 1}, {"claim": "y", "equals": 2}]}}}]})
    assert not nested.decide("a/b/c", {"debug": False, "y": 3}).allowed
    assert nested.decide("a/b/c", {"debug": False, "x": 0, "y": 3}).allowed
    exists = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {"not": {"claim": "x", "exists": True}}}]})
    assert exists.decide("a/b/c", {"debug": False}).allowed  # 'exists' asks about absence itself


def test_contains_requires_an_event_with_these_fields_and_names_the_one_missing():
    events = [{"rtmr": 3, "domain": "example.org", "operation": "image-pull", "content": "registry/app@sha256:ab"},
              {"rtmr": 3, "domain": "keybroker", "operation": "release", "content": "default/key/1 https://kbs"}]
    tdx = {"tee": "tdx", "debug": False, "tdx.runtime_events": events, "devices": ["sampledevice"]}
    wanted = {"domain": "keybroker", "operation": "release", "content": "default/key/1 https://kbs"}
    assert policy({"resources": ["*"], "require": {"claim": "tdx.runtime_events", "contains": wanted}}).decide(
        "a/b/c", tdx).allowed
    assert policy({"resources": ["*"], "require": {"claim": "tdx.runtime_events", "contains": {"rtmr": 3}}}).decide(
        "a/b/c", tdx).allowed
    assert policy({"resources": ["*"], "require": {"claim": "devices", "contains": "sampledevice"}}).decide(
        "a/b/c", tdx).allowed
    other = wanted | {"content": "default/key/2 https://kbs"}
    denied = policy({"resources": ["*"], "require": {"claim": "tdx.runtime_events", "contains": other}}).decide(
        "a/b/c", tdx)
    assert not denied.allowed and denied.reason == (
        'rule 0 (*): claim tdx.runtime_events (2 elements) has no element with {"domain": "keybroker", '
        '"operation": "release", "content": "default/key/2 https://kbs"}')
    absent = 'claim tdx.runtime_events is absent, so it has no element with {"domain"'
    for claims, reason in [(tdx | {"tdx.runtime_events": "x"}, "not a list"), ({"tee": "tdx", "debug": False}, absent)]:
        denied = policy({"resources": ["*"], "require": {"claim": "tdx.runtime_events", "contains": wanted}}).decide(
            "a/b/c", claims)
        assert not denied.allowed and reason in denied.reason
    refused = policy({"resources": ["*"], "require": {"not": {"claim": "tdx.runtime_events", "contains": wanted}}})
    assert not refused.decide("a/b/c", tdx).allowed
    # "not" over what cannot be compared (a claim that is no list, a version that is no version) never passes
    for cond, claims in (({"claim": "tdx.runtime_events", "contains": wanted}, tdx | {"tdx.runtime_events": "x"}),
                         ({"claim": "tdx.events", "contains": "x"}, tdx | {"tdx.events": {"a": 1}}),
                         ({"claim": "snp.guest_svn", "atLeast": 3}, tdx | {"snp.guest_svn": "abc"})):
        decision = policy({"resources": ["*"], "require": {"not": cond}}).decide("a/b/c", claims)
        assert not decision.allowed and "cannot be refuted" in decision.reason, decision


@pytest.mark.parametrize("contains", [{}, [], [1], {"a": {"b": 1}}, {"a": [1]}])
def test_contains_needs_a_value_or_fields(contains):
    with pytest.raises(PolicyError, match="contains must be a value or a non-empty object"):
        policy({"resources": ["*"], "require": {"claim": "x", "contains": contains}})


@pytest.mark.parametrize("rule, twice", [
    # reads as pinning the measurement; json.loads kept the last require, which pins only the TEE
    ('{"resources": ["*"], "require": {"claim": "measurement", "equals": "%s"}, '
     '"require": {"claim": "tee", "equals": "snp"}}' % ("aa" * 48), "require"),
    ('{"resources": ["*"], "allow_debug": false, "allow_debug": true}', "allow_debug"),
    ('{"resources": ["*"], "require": {"claim": "snp.vmpl", "claim": "tee", "equals": "snp"}}', "claim"),
])
def test_a_member_named_twice_is_refused(rule, twice):
    with pytest.raises(PolicyError, match=f"member '{twice}' appears twice"):
        Policy.loads('{"version": 1, "rules": [%s]}' % rule)


def test_many_members_with_one_named_twice_are_refused_quickly():
    import time

    members = ", ".join(f'"m{i}": {i}' for i in range(60000))
    started = time.monotonic()
    with pytest.raises(PolicyError, match="member 'm0' appears twice"):
        Policy.loads('{"version": 1, "rules": [{"resources": ["*"], "comment": {%s, "m0": 0}}]}' % members)
    assert time.monotonic() - started < 2
