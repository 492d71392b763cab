"""The agent: the handler hands it key requests when it runs, does the round itself when it does
not, and keeps its deadline whatever the agent does."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.guest import agentsocket as agent
from support.keyctl import keyctl_session

SECRETS = {f"default/disk/k{i}": hashlib.sha256(b"agent key %d" % i).digest() for i in range(4)}


@pytest.fixture
def running_agent(handler) -> Iterator[subprocess.Popen]:
    """``keybroker agent`` on /run/keybroker/agent.sock (the handler's fixture holds the machine lock)."""
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "agent"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not agent.SOCKET.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        agent.SOCKET.unlink(missing_ok=True)


@pytest.fixture
def setup(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    for path, value in SECRETS.items():
        server.put(path, value)
    handler(server.url, root)
    return server


def fetch(name: str) -> subprocess.CompletedProcess:
    return keyctl_session(f'keyctl pipe $(keyctl request2 user keybroker:default/disk/{name} "" @s) | sha256sum')


def got(out: subprocess.CompletedProcess, name: str) -> bool:
    return hashlib.sha256(SECRETS[f"default/disk/{name}"]).hexdigest() in out.stdout


def test_the_handler_hands_requests_to_a_running_agent(setup, running_agent, syslog):
    assert got(fetch("k0"), "k0") and got(fetch("k1"), "k1")
    lines = [line for line in syslog if "outcome=instantiated" in line]
    assert len(lines) == 2 and all("via=agent" in line for line in lines), lines
    assert setup.requests_to("attest") == 1
    mode = agent.SOCKET.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0
    assert stat.S_IMODE(agent.SOCKET.parent.stat().st_mode) == 0o700


def test_access_rules_hold_through_the_agent(tsm_sim, kbs, handler, running_agent):
    """The agent decides access as the handler does (asked directly: this kernel does not upcall for
    non-root requesters)."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/k0", SECRETS["default/disk/k0"])
    config = handler(server.url, root, extra='[[access]]\nresource = "shared/*"\nuids = [65534]\n')
    header, value = agent.ask(agent.SOCKET, str(config), "user", "keybroker:default/disk/k0", b"", 65534, 65534,
                              time.monotonic() + 10)
    assert header["errno"] == errno.EACCES and "may not obtain default/disk/k0" in header["reason"]
    assert not value and server.requests_to("auth") == 0
    header, value = agent.ask(agent.SOCKET, str(config), "user", "keybroker:default/disk/k0", b"", 0, 0,
                              time.monotonic() + 10)
    assert header["size"] == 32 and bytes(value) == SECRETS["default/disk/k0"]


def test_without_an_agent_the_handler_does_the_round(setup, syslog):
    assert not agent.SOCKET.exists()
    assert got(fetch("k0"), "k0")
    assert any("via=worker" in line for line in syslog if "outcome=instantiated" in line)


def test_an_agent_that_never_answers_is_not_a_dependency(setup, handler, tsm_sim, syslog):
    """A socket that accepts and stays silent: after half its deadline the handler does the round itself."""
    handler(setup.url, tsm_sim("sev_guest"), deadline=6)
    agent.SOCKET.parent.mkdir(mode=0o700, exist_ok=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(agent.SOCKET))
    silent.listen(8)
    held: list[socket.socket] = []

    def hold() -> None:
        try:
            while True:
                held.append(silent.accept()[0])
        except OSError:
            return  # the test closed the socket

    threading.Thread(target=hold, daemon=True).start()
    try:
        start = time.monotonic()
        out = fetch("k0")
        took = time.monotonic() - start
    finally:
        silent.close()
        for conn in held:
            conn.close()
        agent.SOCKET.unlink(missing_ok=True)
    assert got(out, "k0") and 3 <= took < 6, (took, out.stderr)
    assert any("via=worker" in line for line in syslog if "outcome=instantiated" in line)


def test_the_agent_answers_root_only(setup, running_agent):
    """Another user cannot reach the socket; a root peer with a malformed request gets nothing."""
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                            f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(agent.SOCKET)!r})"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(agent.SOCKET))
        conn.sendall((10**6).to_bytes(4, "big") + b"{}")
        try:
            assert conn.recv(100) == b""  # refused: closed without an answer
        except ConnectionResetError:
            pass  # closed with our bytes unread: the same refusal
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # its handler gave up long ago
        conn.settimeout(10)
        conn.connect(str(agent.SOCKET))
        stale = json.dumps({"config": "/nonexistent", "type": "user", "description": "keybroker:default/disk/k0",
                            "callout": "", "uid": 0, "gid": 0, "deadline": time.monotonic() - 1}).encode()
        conn.sendall(len(stale).to_bytes(4, "big") + stale)
        assert conn.recv(100) == b""  # dropped unanswered
    assert running_agent.poll() is None and got(fetch("k2"), "k2")
    assert os.path.exists(agent.SOCKET)


def test_agent_units_verify(tmp_path):
    import shutil

    from support import REPO

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    socket_unit = (REPO / "systemd" / "keybroker-agent.socket").read_text()
    assert "SocketMode=0600" in socket_unit and "ListenStream=/run/keybroker/agent.sock" in socket_unit
    for name in ("keybroker-agent.socket", "keybroker-agent.service"):
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/keybroker", str(Path(sys.executable).parent /
                                                                                    "keybroker")))
    out = subprocess.run([analyze, "verify", str(tmp_path / "keybroker-agent.service")], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if str(tmp_path) in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
