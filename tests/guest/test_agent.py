"""The agent: the handler hands it key requests when it runs, does the round itself when it does
not, and keeps its deadline whatever the agent does."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.guest import agentsocket as agent
from support.agent import running, silent_agent
from support.keyctl import keyctl_session

SOCKET = Path(agent.SOCKET)

SECRETS = {f"default/disk/k{i}": hashlib.sha256(b"agent key %d" % i).digest() for i in range(4)}


@pytest.fixture
def running_agent(handler) -> Iterator[subprocess.Popen]:
    """``keybroker agent`` on /run/keybroker/agent.sock (the handler's fixture holds the machine lock)."""
    with running([sys.executable, "-m", "keybroker", "agent"]) as proc:
        yield proc


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
    mode = SOCKET.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0
    assert stat.S_IMODE(SOCKET.parent.stat().st_mode) == 0o700


def test_access_rules_hold_through_the_agent(tsm_sim, kbs, handler, running_agent):
    """The agent decides access as the handler does (asked directly: this kernel does not upcall for
    non-root requesters)."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/k0", SECRETS["default/disk/k0"])
    config = handler(server.url, root, extra='[[access]]\nresource = "shared/*"\nuids = [65534]\n')
    header, value = agent.ask(agent.SOCKET, str(config), "user", "keybroker:default/disk/k0", b"", 65534, 65534,
                              time.monotonic())
    assert header["errno"] == errno.EACCES and "may not obtain default/disk/k0" in header["reason"]
    assert not value and server.requests_to("auth") == 0
    header, value = agent.ask(agent.SOCKET, str(config), "user", "keybroker:default/disk/k0", b"", 0, 0,
                              time.monotonic())
    assert header["size"] == 32 and bytes(value) == SECRETS["default/disk/k0"]


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "handler"])
def test_a_stalled_syslog_does_not_hold_the_requester(setup, stalled_syslog, agent, request):
    # The kernel holds the requester until the handler exits, and the handler logs last.
    if agent:
        request.getfixturevalue("running_agent")
    started = time.monotonic()
    assert stalled_syslog > 0 and got(fetch("k0"), "k0")
    assert time.monotonic() - started < 5  # the deadline is 10 s; once, the handler waited until then, or forever


def test_a_configuration_the_agent_cannot_see_is_left_to_the_handler(setup, syslog, tmp_path):
    """The agent's unit hides /root, /home and /tmp from it (ProtectHome=, PrivateTmp=): for a
    configuration there, which the handler reads, it used to answer ENOKEY (configuration not found).
    It now leaves a configuration it cannot load to the handler, which fetches the key."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to give the agent a view of its own")
    hidden = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
              'mount -t tmpfs none "$1"; exec "$2" -m keybroker agent', "sh", str(tmp_path), sys.executable]
    with running(hidden):
        assert got(fetch("k0"), "k0")
    lines = [line for line in syslog if "outcome=" in line]
    assert len(lines) == 1 and "outcome=instantiated" in lines[0] and "via=worker" in lines[0], lines


def test_without_an_agent_the_handler_does_the_round(setup, syslog):
    assert not SOCKET.exists()
    assert got(fetch("k0"), "k0")
    assert any("via=worker" in line for line in syslog if "outcome=instantiated" in line)


@pytest.mark.parametrize("first_frame", [None, ("deadline", 6000)], ids=["silent", "silent-after-the-deadline"])
def test_an_agent_that_never_answers_is_not_a_dependency(setup, handler, tsm_sim, syslog, first_frame):
    """A socket that accepts and stays silent: the handler does the round itself, at once when not even
    the agent's first frame comes (within ACK_WAIT), after half its deadline when only that frame came."""
    handler(setup.url, tsm_sim("sev_guest"), deadline=6)
    with silent_agent(first_frame):
        start = time.monotonic()
        out = fetch("k0")
        took = time.monotonic() - start
    if first_frame is None:
        assert got(out, "k0") and took < 3, (took, out.stderr)
    else:
        assert got(out, "k0") and 3 <= took < 6, (took, out.stderr)
    assert any("via=worker" in line for line in syslog if "outcome=instantiated" in line)


def test_the_agent_answers_root_only(setup, running_agent):
    """Another user cannot reach the socket; a root peer with a malformed request gets nothing."""
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                            f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(SOCKET)!r})"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(SOCKET))
        conn.sendall((10**6).to_bytes(4, "big") + b"{}")
        try:
            assert conn.recv(100) == b""  # refused: closed without an answer
        except ConnectionResetError:
            pass  # closed with our bytes unread: the same refusal
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # its handler gave up long ago
        conn.settimeout(10)
        conn.connect(str(SOCKET))
        conn.sendall(agent.frame("request", "/nonexistent", "user", "keybroker:default/disk/k0", b"", 0, 0,
                                 time.monotonic() - agent.DEADLINE_MAX - 1))
        assert conn.recv(100) == b""  # dropped unanswered
    assert running_agent.poll() is None and got(fetch("k2"), "k2")
    assert os.path.exists(SOCKET)


def test_the_agent_cannot_dump_core():
    """It holds keys in memory: a core file would put them on disk, so it makes itself non-dumpable."""
    if os.geteuid() != 0:
        pytest.skip("starting the agent as another user needs root")
    import shutil
    import tempfile

    # Run as nobody, where it shows: the /proc files of a process that may not dump core are root's.
    folder = Path(tempfile.mkdtemp(prefix="keybroker-agent-"))
    shutil.chown(folder, "nobody")
    sock = folder / "agent.sock"
    proc = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
                             "keybroker", "agent", "--socket", str(sock)], cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.05)
        assert os.stat(f"/proc/{proc.pid}").st_uid == 65534  # it is nobody's process
        assert os.stat(f"/proc/{proc.pid}/status").st_uid == 0  # and not dumpable
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder)


def test_the_agent_refuses_to_start_on_code_others_can_change(tmp_path):
    """It checks its interpreter and code once, when it starts (each request then checks the configuration)."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("the agent checks ownership when it runs as root")

    import keybroker

    theirs = tmp_path / "site"
    shutil.copytree(Path(keybroker.__file__).parent, theirs / "keybroker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    planted = theirs / "keybroker" / "guest" / "broker.py"
    os.chown(planted, 65534, -1)  # a module root would import, that nobody can now rewrite
    sock = tmp_path / "agent.sock"
    out = subprocess.run([sys.executable, "-c", "import sys; from keybroker.cli import main; sys.exit(main())",
                          "agent", "--socket", str(sock)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(theirs)}, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert f"refusing keybroker package {planted}: {planted} belongs to uid 65534" in out.stderr
    assert not sock.exists()


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


def test_no_unit_makes_the_agents_folder_before_it_with_another_mode():
    """The agent's socket is 0600 in /run/keybroker, 0700; DirectoryMode= applies only when the socket unit
    makes that folder. keybroker-tsm-sim.service's RuntimeDirectory=keybroker/tsm-sim had systemd make it
    first, as the parent of its own, 0755, and it stayed so for the agent's socket and attestation locks."""
    from support import REPO

    made = [(unit.name, folder) for unit in sorted((REPO / "systemd").glob("*.service"))
            for line in unit.read_text().splitlines() if line.startswith(("RuntimeDirectory=", "RuntimeDirectory ="))
            for folder in line.partition("=")[2].split()]
    assert ("keybroker-tsm-sim.service", "keybroker-tsm-sim") in made
    assert not [(unit, folder) for unit, folder in made if folder == "keybroker" or folder.startswith("keybroker/")]


def test_the_exchange_frames_are_strict():
    """The handler reads what the agent (or its worker) sends field by field: anything but the exact
    shape is refused, so a stray or truncated frame can never be taken for a key or a rejection."""
    key = agent.encode_answer({"size": 32, "lease": 600})
    assert agent.decode_answer(key[4:]) == {"size": 32, "lease": 600}
    assert agent.decode_answer(agent.encode_answer({"size": 1, "lease": None})[4:]) == {"size": 1, "lease": None}
    refusal = agent.encode_answer({"errno": errno.EKEYREJECTED, "timeout": 60, "reason": "x" * 5000})
    assert agent.decode_answer(refusal[4:]) == {"errno": errno.EKEYREJECTED, "timeout": 60, "reason": "x" * 2000}
    for body in (b"", b"\0\0\0\x03key", key[4:-1], key[4:] + b"\0", agent.frame("key", 32)[4:],
                 agent.frame("key", 32, 0, 0)[4:], agent.frame("key", 40000, 0)[4:], agent.frame("key", -1, 0)[4:],
                 agent.frame("key", "+3", 0)[4:], agent.frame("rejected", 0, 60, "")[4:],
                 agent.frame("deadline", 6000)[4:], b"\xff" * 64):
        with pytest.raises(ValueError):
            agent.decode_answer(body)


def _scripted_agent(path: Path, *parts: bytes, uid: int = 0) -> int:
    """A forked stand-in for the agent on ``path`` (listening as ``uid``) that sends ``parts`` to the first
    request, then holds the connection for 5 s; its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            if uid:  # SO_PEERCRED says who called listen()
                os.setgid(65534)
                os.setuid(uid)
            listener.listen(1)
            os.write(ready_w, b"1")
            conn = listener.accept()[0]
            for part in parts:
                conn.sendall(part)
            time.sleep(5)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def _ask(path: Path) -> tuple[object, float]:
    start = time.monotonic()
    answer = agent.ask(str(path), "/etc/keybroker/client.toml", "user", "keybroker:default/disk/k0", b"", 0, 0, start)
    return answer, time.monotonic() - start


def test_the_handler_takes_answers_from_root_s_agent_only_and_within_its_deadline(tmp_path):
    """ask() in the handler's process: an agent not root's is not heard, whatever it answers; one that
    announces a deadline out of range or says nothing after it is given up on within half of it."""
    answer = agent.frame("deadline", 2000) + agent.encode_answer({"size": 3, "lease": 60}) + b"key"
    cases = [(0, answer, ({"size": 3, "lease": 60}, bytearray(b"key")), 0.2),  # root's: heard
             (65534, answer, None, 0.2),  # another user's socket (SO_PEERCRED): never heard
             (0, agent.frame("deadline", 1999), None, 0.2),  # less than a configuration may set
             (0, agent.frame("deadline", round(agent.DEADLINE_MAX * 1000) + 1), None, 0.2),  # more
             (0, agent.frame("deadline", 2000), None, 1.2)]  # then silent: given up after 1 s (half of 2)
    for i, (uid, sent, expected, within) in enumerate(cases):
        path = tmp_path / f"agent{i}.sock"
        pid = _scripted_agent(path, sent, uid=uid)
        try:
            got_answer, took = _ask(path)
            assert got_answer == expected and took < within, (i, got_answer, took)
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def test_a_frame_longer_than_its_limit_is_refused_before_its_body(tmp_path):
    """The length is checked before the body is awaited (or allocated): a peer cannot make the reader hold
    gigabytes, nor wait for bytes it never sends."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for size in (agent.ANSWER_HEADER_MAX + 1, 3):
            theirs.sendall(size.to_bytes(4, "big"))
            with pytest.raises(ValueError):
                agent.read_frame(ours, agent.ANSWER_HEADER_MAX, time.monotonic() + 0.5)


def test_a_peer_that_trickles_its_frame_is_given_up_on_at_the_deadline(tmp_path):
    """Every byte in time is not the frame in time: the reader stops at ``until`` however often bytes come."""
    import threading

    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            theirs.sendall((100).to_bytes(4, "big"))
            while not stop.wait(0.05):
                theirs.sendall(b"x")

    sender = threading.Thread(target=trickle)
    sender.start()
    with ours, theirs:
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                agent.read_frame(ours, agent.ANSWER_HEADER_MAX, start + 1)
            assert time.monotonic() - start < 2
        finally:
            stop.set()
            sender.join()
