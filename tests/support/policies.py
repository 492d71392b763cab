"""Release policies for tests."""

from __future__ import annotations

import json
from pathlib import Path

from keybroker.server.policy import PLATFORM_REQUIREMENTS, Policy

#: Every resource to any verified guest that is not a debug guest and meets the platform
#: requirements, whatever it runs: what the tests' key servers use unless a test sets its
#: own. No operator should run with it (`keybroker policy check` warns that it pins nothing).
ANY_GUEST_DOCUMENT = {"version": 1, "rules": [{"resources": ["*"], "require": {"anyOf": [
    {"allOf": [{"claim": "tee", "equals": tee}, *requirements]}
    for tee, requirements in PLATFORM_REQUIREMENTS.items()]}}]}
ANY_GUEST = Policy(ANY_GUEST_DOCUMENT)


def write(path: Path, document: dict = ANY_GUEST_DOCUMENT) -> Path:
    path.write_text(json.dumps(document))
    return path
