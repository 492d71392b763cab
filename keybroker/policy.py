"""Release policy: which appraised claims may obtain which resources.

A policy is a small JSON document::

    {
      "version": 1,
      "rules": [
        {"resources": ["default/disk/*"],
         "require": {"allOf": [
            {"claim": "tee", "in": ["snp", "tdx"]},
            {"claim": "measurement", "in": ["9f4c...", "77aa..."]},
            {"claim": "snp.reported_tcb.microcode", "atLeast": 72},
            {"anyOf": [{"claim": "tdx.tcb_status", "equals": "UpToDate"},
                       {"claim": "tdx.tcb_status", "exists": false}]}]}}
      ]
    }

The first rule whose ``resources`` pattern matches (``*`` matches anything, ``/``
included) decides; when none matches, the release is denied. A rule allows the release
when its ``require`` condition holds. Conditions: ``{"claim", "equals"}``,
``{"claim", "in"}``, ``{"claim", "atLeast"}`` / ``{"claim", "atMost"}`` (numbers, or
dotted versions such as ``"1.55.43"``), ``{"claim", "exists"}``, and ``allOf``,
``anyOf``, ``not``. A claim that is absent fails every comparison.

Debug guests are refused whatever the rule says, unless the rule sets
``"allow_debug": true``: a debug guest's memory is readable by its host.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from .errors import PolicyError

VERSION = 1
_VERSION_TEXT = re.compile(r"\d+(\.\d+)*")

#: What the key server applies when the operator gave no policy: every resource to any
#: verified guest that is not a debug guest, runs at VMPL0 without a migration agent
#: (SEV-SNP), and whose TCB, when it was evaluated (TDX with collateral), is not out of date.
DEFAULT_POLICY: dict[str, Any] = {
    "version": VERSION,
    "rules": [{
        "resources": ["*"],
        "require": {"allOf": [
            {"anyOf": [{"claim": "tee", "in": ["tdx", "cca"]},
                       {"allOf": [{"claim": "snp.vmpl", "equals": 0},
                                  {"claim": "snp.policy.migrate_ma", "equals": False}]}]},
            {"anyOf": [{"claim": "tdx.tcb_status", "exists": False},
                       {"claim": "tdx.tcb_status", "in": ["UpToDate", "SWHardeningNeeded",
                                                          "ConfigurationNeeded",
                                                          "ConfigurationAndSWHardeningNeeded"]}]},
        ]},
    }],
}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None


class Policy:
    """A parsed, validated policy document."""

    def __init__(self, document: Any) -> None:
        _check_document(document)
        self.document = document

    @classmethod
    def loads(cls, text: str | bytes) -> "Policy":
        try:
            return cls(json.loads(text))
        except ValueError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None

    def dumps(self) -> str:
        return json.dumps(self.document, indent=2, sort_keys=True)

    def decide(self, resource: str, claims: dict[str, Any]) -> Decision:
        for index, rule in enumerate(self.document["rules"]):
            if not any(fnmatchcase(resource, pattern) for pattern in rule["resources"]):
                continue
            where = f"rule {index} ({', '.join(rule['resources'])})"
            if claims.get("debug") is not False and not rule.get("allow_debug", False):
                return Decision(False, f"{where}: the guest is a debug guest (claim debug is "
                                       f"{_show(claims.get('debug'))}) and the rule does not set allow_debug",
                                index)
            failure = _evaluate(rule.get("require"), claims)
            if failure:
                return Decision(False, f"{where}: {failure}", index)
            return Decision(True, f"{where}: all conditions hold", index)
        return Decision(False, f"no policy rule covers resource {resource!r}")


def _evaluate(cond: Any, claims: dict[str, Any]) -> str | None:
    """None when ``cond`` holds, else a sentence naming the condition that failed."""
    if cond is None:
        return None
    if "allOf" in cond:
        for sub in cond["allOf"]:
            failure = _evaluate(sub, claims)
            if failure:
                return failure
        return None
    if "anyOf" in cond:
        failures = [_evaluate(sub, claims) for sub in cond["anyOf"]]
        if all(failures):
            return "none of these holds: " + " | ".join(f or "" for f in failures)
        return None
    if "not" in cond:
        return None if _evaluate(cond["not"], claims) else f"condition must not hold: {json.dumps(cond['not'])}"
    name = cond["claim"]
    present = name in claims and claims[name] is not None
    if "exists" in cond:
        if present == cond["exists"]:
            return None
        return f"claim {name} is {'present' if present else 'absent'}"
    if not present:
        return f"claim {name} is absent"
    value = claims[name]
    if "equals" in cond:
        return None if _same(value, cond["equals"]) else \
            f"claim {name} is {_show(value)}, not {_show(cond['equals'])}"
    if "in" in cond:
        return None if any(_same(value, v) for v in cond["in"]) else \
            f"claim {name} is {_show(value)}, not one of {_show(cond['in'])}"
    bound_name = "atLeast" if "atLeast" in cond else "atMost"
    bound = cond[bound_name]
    got, want = _comparable(value), _comparable(bound)
    if got is None or type(got) is not type(want):
        return f"claim {name} is {_show(value)}, which cannot be compared with {_show(bound)}"
    ok = got >= want if bound_name == "atLeast" else got <= want  # type: ignore[operator]
    return None if ok else f"claim {name} is {_show(value)}, {'below' if bound_name == 'atLeast' else 'above'} {_show(bound)}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower() if _is_hex(a) and _is_hex(b) else a == b
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

_OPERATORS = ("equals", "in", "atLeast", "atMost", "exists")


def _check_document(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise PolicyError("policy must be a JSON object")
    unknown = set(doc) - {"version", "rules"}
    if unknown:
        raise PolicyError(f"policy has unknown member(s): {', '.join(sorted(unknown))}")
    if doc.get("version") != VERSION:
        raise PolicyError(f"policy version must be {VERSION}")
    rules = doc.get("rules")
    if not isinstance(rules, list):
        raise PolicyError("policy 'rules' must be a list")
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise PolicyError(f"{where} must be an object")
        unknown = set(rule) - {"resources", "require", "allow_debug", "comment"}
        if unknown:
            raise PolicyError(f"{where} has unknown member(s): {', '.join(sorted(unknown))}")
        patterns = rule.get("resources")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise PolicyError(f"{where}.resources must be a non-empty list of patterns")
        if not isinstance(rule.get("allow_debug", False), bool):
            raise PolicyError(f"{where}.allow_debug must be true or false")
        if "require" in rule:
            _check_condition(rule["require"], f"{where}.require")


def _check_condition(cond: Any, where: str) -> None:
    if not isinstance(cond, dict) or len(cond) == 0:
        raise PolicyError(f"{where} must be a condition object")
    for combinator in ("allOf", "anyOf"):
        if combinator in cond:
            subs = cond[combinator]
            if len(cond) != 1 or not isinstance(subs, list) or not subs:
                raise PolicyError(f"{where}.{combinator} must be the only member, a non-empty list")
            for j, sub in enumerate(subs):
                _check_condition(sub, f"{where}.{combinator}[{j}]")
            return
    if "not" in cond:
        if len(cond) != 1:
            raise PolicyError(f"{where}.not must be the only member")
        _check_condition(cond["not"], f"{where}.not")
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
    if op == "exists" and not isinstance(value, bool):
        raise PolicyError(f"{where}.exists must be true or false")
    if op in ("atLeast", "atMost") and _comparable(value) is None:
        raise PolicyError(f"{where}.{op} must be a number or a dotted version such as \"1.55.43\"")


DEFAULT = Policy(DEFAULT_POLICY)
