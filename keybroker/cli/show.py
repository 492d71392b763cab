"""How the command line prints what the rooms return: verdicts and their checks."""

from __future__ import annotations

import json
from typing import Any

MARK = {True: "PASS", False: "FAIL", None: "N/A "}


def check_lines(verdict: Any, indent: str = "") -> list[str]:
    """One line per check: PASS, FAIL or N/A, its name and what it found."""
    return [f"{indent}{MARK[check.ok]}  {check.name:<24} {check.detail}" for check in verdict.checks]


def verdict_json(verdict: Any) -> str:
    return json.dumps({"provider": verdict.provider, "ok": verdict.ok,
                       "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in verdict.checks],
                       "claims": verdict.claims}, indent=2)


def claim_lines(claims: dict[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}{name} = {json.dumps(value)}" for name, value in sorted(claims.items())]
