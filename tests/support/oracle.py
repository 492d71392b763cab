"""The Rust test oracle (tests/oracle): the sev and kbs-types crates reading keybroker's JSON.

Built once per test session with cargo when the machine has it; a test that needs it is
skipped, saying why, when cargo or the crates registry is not there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "oracle"
#: Outside the checkout, so that a fresh clone on the same machine builds incrementally.
TARGET = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keybroker-oracle"
BUILD_TIMEOUT = 900


class Oracle:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def ask(self, command: str, question: Any) -> Any:
        done = subprocess.run([str(self.binary), command], input=json.dumps(question), capture_output=True,
                              text=True, timeout=60, check=True)
        return json.loads(done.stdout)


def build() -> Oracle:
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    if not os.access(cargo, os.X_OK):
        pytest.skip("the Rust test oracle needs cargo, which this machine does not have")
    env = os.environ | {"CARGO_TARGET_DIR": str(TARGET)}
    fetch = subprocess.run([cargo, "fetch", "--locked"], cwd=SOURCE, env=env, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    if fetch.returncode != 0:
        pytest.skip(f"the Rust test oracle's crates cannot be fetched: {fetch.stderr.strip()[-300:]}")
    built = subprocess.run([cargo, "build", "--release", "--frozen", "--quiet"], cwd=SOURCE, env=env,
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, f"the Rust test oracle does not build:\n{built.stderr[-3000:]}"
    return Oracle(TARGET / "release" / "keybroker-oracle")
