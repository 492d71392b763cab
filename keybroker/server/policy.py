"""Release policy: which appraised claims may obtain which resources (docs/policy.md).

A policy is a JSON document of rules; the first rule whose resource pattern matches
decides, by its condition over the claims; no matching rule denies, and without rules (no
policy set, the key server's starting state) nothing is released. Debug guests are refused
unless the rule sets ``allow_debug``; unbound evidence (claim ``unbound``: SEV/SEV-ES from a
host's evidence broker, which carries no data of the guest's) unless it sets ``allow_unbound``,
which only a rule that pins a measurement and the platforms (``sev.chip_key``) may.
:func:`from_appraisals` writes a starting policy that pins a verified guest's image;
:meth:`Policy.unpinned` names the rules that pin no measurement. A denial's reason names the
rule and the condition that failed; :meth:`Policy.explain` lists every condition with PASS or FAIL.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DescriptionError, PolicyError
from ..wire import parse_json
from ..wire.resource import check_pattern, pattern_matches, pattern_parts

VERSION = 1
POLICY_MAX = 1024 * 1024  # bytes of a policy document, as of any body the admin API takes (rcar.BODY_MAX)
#: A version a condition compares part by part: each part at most 18 digits (a claim the host
#: chooses, such as init-data's, could otherwise be a number int() refuses to read).
_VERSION_TEXT = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18})*")

#: What a starting policy asks of the platform besides the guest's image (debug guests are
#: refused by every rule anyway): on SEV-SNP, VMPL0 without a migration agent; on TDX, when
#: the TCB status was evaluated (with collateral), a TCB that is not out of date.
PLATFORM_REQUIREMENTS: dict[str, list[dict[str, Any]]] = {
    "snp": [{"claim": "snp.vmpl", "equals": 0}, {"claim": "snp.policy.migrate_ma", "equals": False}],
    "tdx": [{"anyOf": [{"claim": "tdx.tcb_status", "exists": False},
                       {"claim": "tdx.tcb_status", "in": ["UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                                                          "ConfigurationAndSWHardeningNeeded"]}]},
            {"claim": "tdx.tdattributes.migratable", "equals": False}],
    "cca": [],
}
#: The claims that identify what a guest runs, by TEE: its launch measurement first.
IMAGE_CLAIMS = {"snp": ("snp.measurement", "snp.host_data"),
                "tdx": ("tdx.mrtd", "tdx.mrconfigid", "tdx.rtmr0", "tdx.rtmr1", "tdx.rtmr2"),
                "cca": ("cca.rim", "cca.personalization")}
#: A rule pins a measurement when it requires one of these claims to equal (or be one of) values.
MEASUREMENT_CLAIMS = frozenset({"measurement", "snp.measurement", "tdx.mrtd", "cca.rim", "sev.launch_digest"})
#: What a rule that accepts unbound evidence must pin besides the image: the platforms.
UNBOUND_PLATFORM_CLAIMS = frozenset({"sev.chip_key"})
#: Why unbound evidence is refused unless a rule says otherwise.
UNBOUND_REASON = ("the evidence is unbound (claim unbound is true: a SEV/SEV-ES report carries no data of the "
                  "guest's and the host chooses which guest it describes, so it shows that some guest with this "
                  "launch digest runs on this platform, not that the requester is that guest) and the rule does "
                  "not set allow_unbound")
NO_POLICY_REASON = ("no release policy is set: nothing is released until the operator sets one "
                    "(keybroker policy put, or serve --policy; keybroker policy from-evidence writes a first one)")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None
    #: why, in one word (for counting): allowed, no_policy, no_rule, debug, unbound or condition
    cause: str = "allowed"


@dataclass(frozen=True)
class Evaluation:
    """One condition evaluated: whether it holds, and for a claim what was compared. The words are
    made only when read (a denial's reason, an explanation): a release that is allowed reads none."""

    holds: bool
    kind: str  # claim, allOf, anyOf, not
    words: Callable[[], str] = str
    parts: tuple[Evaluation, ...] = ()
    absent: str | None = None  # a comparison's claim that the guest lacks, or has as what it cannot compare

    @property
    def text(self) -> str:
        return self.words()

    def reason(self) -> str:
        """The sentence that names what failed (for an outcome that does not hold)."""
        if self.kind == "allOf":
            return next(part.reason() for part in self.parts if not part.holds)
        if self.kind == "anyOf":
            return "none of these holds: " + " | ".join(part.reason() for part in self.parts)
        if self.kind == "not":
            return f"condition must not hold: {self.text}"
        return self.text

    def lines(self, depth: int = 1) -> list[str]:
        label = self.text if self.kind == "claim" else self.kind
        return [f"{'  ' * depth}{'PASS' if self.holds else 'FAIL'} {label}",
                *(line for part in self.parts for line in part.lines(depth + 1))]


class Policy:
    """A parsed, validated policy document."""

    def __init__(self, document: Any) -> None:
        _check_document(document)
        self.document = document
        #: Each rule's patterns split at their wildcards, once (a policy may hold tens of thousands).
        self._patterns = [[pattern_parts(pattern) for pattern in rule["resources"]] for rule in document["rules"]]

    @classmethod
    def loads(cls, text: str | bytes) -> Policy:
        try:
            return cls(parse_json(text, unique=True))
        except ValueError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None

    def dumps(self) -> str:
        """The document as an operator reads it: nested, each claim condition on one line."""
        return _format(self.document, 0) + "\n"

    @property
    def digest(self) -> str:
        """SHA-256 of the document as sorted, compact JSON: the same policy, the same digest."""
        canonical = json.dumps(self.document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def decide(self, resource: str, claims: dict[str, Any]) -> Decision:
        return self._judge(resource, claims, explain=False)[0]

    def explain(self, resource: str, claims: dict[str, Any]) -> list[str]:
        """The rules consulted for ``resource``, each condition PASS or FAIL, and the decision."""
        decision, lines = self._judge(resource, claims, explain=True)
        return [*lines, f"=> {'ALLOW' if decision.allowed else 'DENY'}: {decision.reason}"]

    def unpinned(self) -> list[str]:
        """The rules that release without pinning a measurement: any genuine TEE would pass them."""
        return [f"rule {index} ({', '.join(rule['resources'])}) pins no measurement "
                f"({', '.join(sorted(MEASUREMENT_CLAIMS))}): any guest on a genuine TEE that meets its other "
                "conditions obtains these resources"
                for index, rule in enumerate(self.document["rules"])
                if not ("require" in rule and _pins(rule["require"], MEASUREMENT_CLAIMS))]

    def _judge(self, resource: str, claims: dict[str, Any], *, explain: bool) -> tuple[Decision, list[str]]:
        """The decision and the lines that say how it was reached (each condition's with ``explain``)."""
        lines: list[str] = []
        if not self.document["rules"]:
            return Decision(False, NO_POLICY_REASON, None, "no_policy"), lines
        for index, rule in enumerate(self.document["rules"]):
            where = f"rule {index} ({', '.join(rule['resources'])})"
            if not any(pattern_matches(resource, parts) for parts in self._patterns[index]):
                lines.append(f"{where}: does not match {resource}")
                continue
            lines.append(f"{where}: matches {resource}")
            debug = claims.get("debug")
            if debug is not False and not rule.get("allow_debug", False):
                lines.append(f"  FAIL claim debug is {_show(debug)}: a debug guest, and the rule does not set "
                             "allow_debug")
                return Decision(False, f"{where}: the guest is a debug guest (claim debug is {_show(debug)}) and "
                                       "the rule does not set allow_debug", index, "debug"), lines
            lines.append(f"  PASS claim debug is {_show(debug)}"
                         + (" (the rule sets allow_debug)" if rule.get("allow_debug", False) else ""))
            if claims.get("unbound") is True:
                if not rule.get("allow_unbound", False):
                    lines.append(f"  FAIL {UNBOUND_REASON}")
                    return Decision(False, f"{where}: {UNBOUND_REASON}", index, "unbound"), lines
                lines.append("  PASS claim unbound is true (the rule sets allow_unbound)")
            if "require" in rule:
                outcome = _evaluate(rule["require"], claims)
                if explain:
                    lines += outcome.lines()
                if not outcome.holds:
                    return Decision(False, f"{where}: {outcome.reason()}", index, "condition"), lines
            return Decision(True, f"{where}: all conditions hold", index, "allowed"), lines
        return Decision(False, f"no policy rule covers resource {resource!r}", None, "no_rule"), lines


def _evaluate(cond: Any, claims: dict[str, Any]) -> Evaluation:
    for combinator, combine in (("allOf", all), ("anyOf", any)):
        if combinator in cond:
            parts = tuple(_evaluate(sub, claims) for sub in cond[combinator])
            return Evaluation(combine(part.holds for part in parts), combinator, parts=parts)
    if "not" in cond:
        inner = _evaluate(cond["not"], claims)
        missing = _absent(inner)
        if missing:  # "not X" says nothing about a guest that lacks what X compares: it must not pass
            return Evaluation(False, "not", lambda: f"claim {missing} is absent or not of a kind "
                                                    f"{json.dumps(cond['not'])} compares, so it cannot be refuted",
                              (inner,))
        return Evaluation(not inner.holds, "not", lambda: json.dumps(cond["not"]), (inner,))
    name = cond["claim"]
    present = name in claims and claims[name] is not None
    if "exists" in cond:
        return Evaluation(present == cond["exists"], "claim",
                          lambda: f"claim {name} is {'present' if present else 'absent'}")
    if not present:
        return Evaluation(False, "claim", lambda: f"claim {name} is absent" + (
            f", so it has no element {_wanted(cond['contains'])}" if "contains" in cond else ""), absent=name)
    value = claims[name]
    if "equals" in cond:
        want = cond["equals"]
        if _same(value, want):
            return Evaluation(True, "claim", lambda: f"claim {name} is {_show(value)}, equals {_show(want)}")
        return Evaluation(False, "claim", lambda: f"claim {name} is {_show(value)}, not {_show(want)}")
    if "contains" in cond:
        return _contains(name, value, cond["contains"])
    if "in" in cond:
        if any(_same(value, v) for v in cond["in"]):
            return Evaluation(True, "claim", lambda: f"claim {name} is {_show(value)}, one of {_show(cond['in'])}")
        return Evaluation(False, "claim", lambda: f"claim {name} is {_show(value)}, not one of {_show(cond['in'])}")
    bound_name = "atLeast" if "atLeast" in cond else "atMost"
    bound = cond[bound_name]
    got, want = _comparable(value), _comparable(bound)
    if got is None or type(got) is not type(want):
        return Evaluation(False, "claim", lambda: f"claim {name} is {_show(value)}, which cannot be compared with "
                                                  f"{_show(bound)}", absent=name)
    if got >= want if bound_name == "atLeast" else got <= want:  # type: ignore[operator]
        return Evaluation(True, "claim", lambda: f"claim {name} is {_show(value)}, "
                                              f"{'at least' if bound_name == 'atLeast' else 'at most'} {_show(bound)}")
    return Evaluation(False, "claim", lambda: f"claim {name} is {_show(value)}, "
                                           f"{'below' if bound_name == 'atLeast' else 'above'} {_show(bound)}")


def _contains(name: str, value: Any, want: Any) -> Evaluation:
    """A list claim has an element that is ``want`` or, for an object, has each of its fields equal."""
    if not isinstance(value, list):
        return Evaluation(False, "claim", lambda: f"claim {name} is {_show(value)}, not a list that could contain "
                                                  f"{_whole(want)}", absent=name)

    def matches(element: Any) -> bool:
        if isinstance(want, dict):
            return isinstance(element, dict) and all(k in element and _same(element[k], v) for k, v in want.items())
        return _same(element, want)

    if any(matches(element) for element in value):
        return Evaluation(True, "claim", lambda: f"claim {name} contains {_whole(want)}")
    return Evaluation(False, "claim", lambda: f"claim {name} ({len(value)} elements) has no element {_wanted(want)}")


def _wanted(want: Any) -> str:
    """``with {fields}`` or ``equal to value``: the element a ``contains`` asks for."""
    return f"{'with' if isinstance(want, dict) else 'equal to'} {_whole(want)}"


def _whole(value: Any) -> str:
    """``value`` as JSON, up to 400 characters: a denial names the whole event that is missing."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 400 else text[:397] + "..."


def _format(value: Any, depth: int) -> str:
    if not isinstance(value, (dict, list)) or (isinstance(value, dict) and "claim" in value) or not value:
        return json.dumps(value, ensure_ascii=False)
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return json.dumps(value, ensure_ascii=False)
        return "[\n" + ",\n".join(inner + _format(item, depth + 1) for item in value) + f"\n{pad}]"
    return "{\n" + ",\n".join(f"{inner}{json.dumps(key)}: {_format(item, depth + 1)}"
                               for key, item in value.items()) + f"\n{pad}}}"


def _absent(evaluation: Evaluation) -> str | None:
    """The first claim a comparison in ``evaluation`` found absent (``exists`` tests excepted)."""
    if evaluation.kind == "claim":
        return evaluation.absent
    return next((name for part in evaluation.parts if (name := _absent(part))), None)


def _pins(cond: dict[str, Any], names: frozenset[str]) -> bool:
    """Whether ``cond`` holding implies one of the claims ``names`` equals one of fixed values."""
    if "allOf" in cond:
        return any(_pins(sub, names) for sub in cond["allOf"])
    if "anyOf" in cond:
        return all(_pins(sub, names) for sub in cond["anyOf"])
    return cond.get("claim") in names and ("equals" in cond or "in" in cond)


def from_appraisals(appraisals: list[dict[str, Any]], resources: list[str], comment: str) -> Policy:
    """A starting policy that releases ``resources`` to guests that run what these did.

    Each appraisal (a verified guest's claims) contributes its image claims (``IMAGE_CLAIMS``)
    as exact values; the platform requirements apply to all. Several appraisals give one rule
    that accepts any of those images.
    """
    guests = []
    for claims in appraisals:
        tee = claims.get("tee")
        if claims.get("unbound") is True:
            raise PolicyError(f"the {tee} evidence is unbound (it carries no data of the guest's): write its rule by "
                              "hand, with allow_unbound, the launch digest and your chips (docs/policy.md)")
        if not isinstance(tee, str) or tee not in IMAGE_CLAIMS:
            raise PolicyError(f"cannot pin the image of a {tee!r} guest (known: {', '.join(IMAGE_CLAIMS)})")
        pins = [{"claim": "tee", "equals": tee}]
        pins += [{"claim": name, "equals": claims[name]} for name in IMAGE_CLAIMS[tee] if claims.get(name) is not None]
        guests.append({"allOf": [*pins, *PLATFORM_REQUIREMENTS[tee]]})
    if not guests:
        raise PolicyError("a starting policy needs the evidence of at least one guest")
    return Policy({"version": VERSION, "rules": [
        {"resources": resources, "comment": comment, "require": guests[0] if len(guests) == 1 else {"anyOf": guests}}]})


def _same(a: Any, b: Any) -> bool:
    """JSON equality, where true is not 1 and hex digits are compared without case, at every level."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower() if _is_hex(a) and _is_hex(b) else a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return a == b


def _is_hex(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-fA-F]+", text)) and len(text) % 2 == 0


def _comparable(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _VERSION_TEXT.fullmatch(value):
        return tuple(int(part) for part in value.split("."))
    return None


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


# -- validation -------------------------------------------------------------------------

_OPERATORS = ("equals", "in", "atLeast", "atMost", "exists", "contains")
_DEPTH_MAX = 16
#: How deep any value in a policy may nest (comments and compared values too): conditions at
#: _DEPTH_MAX take about twice that, and formatting and comparing recurse over it.
_NESTING_MAX = 64


def _check_document(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise PolicyError("policy must be a JSON object")
    if _nesting(doc) > _NESTING_MAX:
        raise PolicyError(f"policy nests objects and arrays deeper than {_NESTING_MAX} levels")
    if _non_finite(doc):
        raise PolicyError("policy holds a number JSON cannot carry (NaN, Infinity, or one too large for a "
                          "double such as 1e400)")
    unknown = set(doc) - {"version", "rules"}
    if unknown:
        raise PolicyError(f"policy has unknown member(s): {', '.join(sorted(unknown))}")
    if type(doc.get("version")) is not int or doc["version"] != VERSION:  # not true, nor 1.0: another digest
        raise PolicyError(f"policy version must be {VERSION}")
    rules = doc.get("rules")
    if not isinstance(rules, list):
        raise PolicyError("policy 'rules' must be a list")
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise PolicyError(f"{where} must be an object")
        unknown = set(rule) - {"resources", "require", "allow_debug", "allow_unbound", "comment"}
        if unknown:
            raise PolicyError(f"{where} has unknown member(s): {', '.join(sorted(unknown))}")
        patterns = rule.get("resources")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise PolicyError(f"{where}.resources must be a non-empty list of patterns")
        for pattern in patterns:
            try:
                check_pattern(pattern)
            except DescriptionError as exc:
                raise PolicyError(f"{where}.resources: {exc}") from None
        for flag in ("allow_debug", "allow_unbound"):
            if not isinstance(rule.get(flag, False), bool):
                raise PolicyError(f"{where}.{flag} must be true or false")
        if "require" in rule:
            _check_condition(rule["require"], f"{where}.require")
        if rule.get("allow_unbound", False):
            _check_unbound_rule(rule, where)


def _nesting(value: Any) -> int:
    """How deep ``value`` nests objects and arrays (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def _non_finite(value: Any) -> bool:
    """Whether ``value`` holds NaN or an infinity anywhere (Python's JSON reader takes them; no
    JSON text carries them, so the admin API could not show the policy back)."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return True
        if isinstance(value, (dict, list)):
            stack.extend(value.values() if isinstance(value, dict) else value)
    return False


def _check_unbound_rule(rule: dict[str, Any], where: str) -> None:
    """A rule that accepts unbound evidence must pin the image and the platforms: anyone can launch a public
    image on AMD hardware of their own, so the operator names the chips (the CEKs) it trusts."""
    require = rule.get("require", {})
    if not _pins(require, MEASUREMENT_CLAIMS):
        raise PolicyError(f"{where} sets allow_unbound but pins no measurement (for SEV/SEV-ES the launch digest, "
                          "claim sev.launch_digest or measurement): unbound evidence is acceptable only for a "
                          "known image")
    if not _pins(require, UNBOUND_PLATFORM_CLAIMS):
        raise PolicyError(f"{where} sets allow_unbound but pins no platform (claim sev.chip_key equals or in the "
                          "CEK digests of your own machines): anyone can launch the same image on AMD hardware "
                          "of their own")


def _check_condition(cond: Any, where: str, depth: int = 0) -> None:
    if not isinstance(cond, dict) or len(cond) == 0:
        raise PolicyError(f"{where} must be a condition object")
    if depth > _DEPTH_MAX:
        raise PolicyError(f"{where}: conditions nest deeper than {_DEPTH_MAX} levels")
    for combinator in ("allOf", "anyOf"):
        if combinator in cond:
            subs = cond[combinator]
            if len(cond) != 1 or not isinstance(subs, list) or not subs:
                raise PolicyError(f"{where}.{combinator} must be the only member, a non-empty list")
            for j, sub in enumerate(subs):
                _check_condition(sub, f"{where}.{combinator}[{j}]", depth + 1)
            return
    if "not" in cond:
        if len(cond) != 1:
            raise PolicyError(f"{where}.not must be the only member")
        _check_condition(cond["not"], f"{where}.not", depth + 1)
        return
    claim = cond.get("claim")
    if not isinstance(claim, str) or not claim:
        raise PolicyError(f"{where} needs a 'claim' name (or allOf, anyOf, not)")
    ops = [op for op in _OPERATORS if op in cond]
    unknown = set(cond) - {"claim", *_OPERATORS}
    if len(ops) != 1 or unknown:
        raise PolicyError(f"{where} needs exactly one of {', '.join(_OPERATORS)} besides 'claim'")
    op, value = ops[0], cond[ops[0]]
    if op == "in" and (not isinstance(value, list) or not value):
        raise PolicyError(f"{where}.in must be a non-empty list")
    if op == "contains" and (isinstance(value, list) or value == {}
                             or (isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()))):
        raise PolicyError(f"{where}.contains must be a value or a non-empty object of field values "
                          "(strings, numbers, booleans) that one element must have")
    if op == "exists" and not isinstance(value, bool):
        raise PolicyError(f"{where}.exists must be true or false")
    if op in ("atLeast", "atMost") and _comparable(value) is None:
        raise PolicyError(f"{where}.{op} must be a number or a dotted version such as \"1.55.43\"")


#: Version 0 of every key server: no rules, nothing is released.
NONE = Policy({"version": VERSION, "rules": []})
