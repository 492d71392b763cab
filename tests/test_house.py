"""The house keeps its rules: which rooms may import which, no cycles, small modules.

Read from the source with ``ast`` (every import, also those inside functions), so that a
lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "keybroker"
LINES_MAX = 500

#: room -> the rooms it may import besides itself
ALLOWED = {
    "wire": {"errors"},
    "guest": {"wire", "errors", "systemd", "files"},
    "verifier": {"wire", "errors", "files"},
    "server": {"wire", "verifier", "errors", "systemd", "files"},
    "sim": {"wire", "errors"},
    "systemd": set(),
    "files": {"errors"},
    "errors": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The keybroker modules ``name`` imports (a ``from X import y`` names X.y when that is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("keybroker"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("keybroker"):
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return found - {name}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "keybroker"


GRAPH = {name: imports(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if room(n) in ALLOWED))
def test_rooms_import_only_what_they_may(name):
    foreign = {target for target in GRAPH[name] if room(target) not in ALLOWED[room(name)] | {room(name)}}
    assert not foreign, f"{name} imports {sorted(foreign)}"


def test_only_the_command_line_imports_the_emulator():
    users = {name for name, targets in GRAPH.items() if room(name) not in ("sim", "cli")
             and any(room(t) == "sim" for t in targets)}
    assert not users


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target in GRAPH and target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_modules_stay_small():
    large = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > LINES_MAX}
    assert not large


def test_the_handler_starts_without_the_network_stack():
    """The request-key handler runs once per key request: its start imports no HTTP, JOSE or X.509 stack."""
    code = ("import sys, keybroker.guest.handler, keybroker.guest.config, keybroker.guest.keyring, "
            "keybroker.guest.request; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('requests', 'urllib3', 'jwcrypto', 'cryptography', 'sqlalchemy', 'starlette', 'rfc8785'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
