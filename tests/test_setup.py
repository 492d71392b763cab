"""`.ci/setup` installs what the tests run: the README's test command works on a fresh Debian 12."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import REPO

RUNS = {"run", "Popen", "check_output", "check_call", "call"}


def _programs() -> dict[str, str]:
    """The programs the tests start by name (``subprocess.run(["name", ...])``), with a file that does."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RUNS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                    and node.args and isinstance(node.args[0], ast.List) and node.args[0].elts
                    and isinstance(node.args[0].elts[0], ast.Constant)
                    and isinstance(node.args[0].elts[0].value, str)):
                found.setdefault(node.args[0].elts[0].value, str(path.relative_to(REPO)))
    return found


def _dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-query", *args], capture_output=True, text=True, timeout=60).stdout


def _package_of(program: str) -> str | None:
    path = shutil.which(program)
    if path is None:
        return None
    # Debian 12 merged /usr after dpkg recorded the paths: /usr/bin/x may be known as /bin/x.
    real = str(Path(path).resolve())
    for candidate in dict.fromkeys([path, real, re.sub(r"^/usr(?=/s?bin/)", "", path),
                                    re.sub(r"^/usr(?=/s?bin/)", "", real)]):
        owner = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True, timeout=60)
        for line in owner.stdout.splitlines():  # not "diversion by dash from: /bin/sh"
            if owner.returncode == 0 and not line.startswith("diversion by "):
                return line.split(":", 1)[0].split(",")[0].strip()
    return None


def test_setup_installs_every_program_the_tests_start():
    """pgrep (procps, priority important: not on a minimal Debian 12, such as its container image)
    stopped PostgreSQL's backends in the replica tests, and .ci/setup did not install it: the
    README's test command failed there with FileNotFoundError."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system")
    text = (REPO / ".ci" / "setup").read_text()
    listed = set(re.search(r'^packages="([^"]*)"', text, re.M)[1].split())
    # What .ci/setup's packages depend on comes with them; Debian's required packages are always there.
    depends = {re.sub(r"[\s(:].*", "", alternative.strip())
               for line in _dpkg("-W", "-f", "${Depends}\n", *listed).splitlines()
               for part in line.split(",") for alternative in part.split("|") if alternative.strip()}
    missing = []
    for program, where in _programs().items():
        package = _package_of(program)
        if package is None:
            missing.append(f"{program} ({where}): not installed or not from a package")
            continue
        if package in listed or package in depends:
            continue
        priority, _, essential = _dpkg("-W", "-f", "${Priority}/${Essential}", package).partition("/")
        if priority != "required" and essential != "yes":
            missing.append(f"{program} ({where}): from {package} ({priority}), which .ci/setup does not install")
    assert missing == []
