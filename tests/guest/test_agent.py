"""The agent: keybroker-handoff gives it key constructions when it runs, the handler does the round
when it does not, and the deadline holds whatever the agent does."""

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
from keybroker.guest import answer
from support.agent import authorities_in_user_keyring, running, silent_agent
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


def test_the_handoff_gives_constructions_to_a_running_agent(setup, running_agent, syslog):
    assert got(fetch("k0"), "k0") and got(fetch("k1"), "k1")
    lines = [line for line in syslog if "outcome=instantiated" in line]
    assert len(lines) == 2 and all("via=agent" in line and "requester=0:0" in line for line in lines), lines
    assert setup.requests_to("attest") == 1
    mode = SOCKET.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0
    assert stat.S_IMODE(SOCKET.parent.stat().st_mode) == 0o700
    assert not authorities_in_user_keyring()  # the agent unlinked each once its construction ended


def test_access_rules_hold_through_the_agent(tsm_sim, kbs, handler, running_agent, nonroot_upcall, syslog):
    """The agent decides access from the requester the kernel names, as the handler does (whose decisions
    for other users test_request_key covers through --debug --requester where the kernel does not upcall)."""
    if nonroot_upcall:
        pytest.skip(nonroot_upcall)
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/k0", SECRETS["default/disk/k0"])
    server.put("shared/disk/k1", SECRETS["default/disk/k1"])
    handler(server.url, root, extra='[[access]]\nresource = "shared/*"\nuids = [65534]\n')
    out = keyctl_session('keyctl request2 user keybroker:default/disk/k0 "" @s', user="nobody")
    assert "Permission denied" in out.stderr and server.requests_to("auth") == 0
    out = keyctl_session('keyctl pipe $(keyctl request2 user keybroker:shared/disk/k1 "" @s) | sha256sum',
                         user="nobody")
    assert hashlib.sha256(SECRETS["default/disk/k1"]).hexdigest() in out.stdout, out.stderr
    assert all("via=agent" in line for line in syslog if "outcome=" in line)


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


def test_an_agent_that_never_ends_the_construction_is_not_a_dependency(setup, handler, tsm_sim, syslog):
    """An agent that takes the construction and never ends it: after its share (half the deadline) the
    handler does the round, in what is left of the deadline counted from the handoff's start. Meanwhile
    the authority waits in root's user keyring, out of reach of other users."""
    handler(setup.url, tsm_sim("sev_guest"), deadline=6)
    with silent_agent():
        start = time.monotonic()
        requester = subprocess.Popen(["keyctl", "session", "-", "sh", "-c", 'keyctl pipe $(keyctl request2 user '
                                      'keybroker:default/disk/k0 "" @s) | sha256sum'], stdout=subprocess.PIPE,
                                     text=True)
        while not (waiting := authorities_in_user_keyring()):
            assert time.monotonic() - start < 2.5
            time.sleep(0.05)
        serial = waiting.pop()
        attempt = ("import ctypes, os; k = ctypes.CDLL('libkeyutils.so.1', use_errno=True); "
                   f"print(k.keyctl_assume_authority({serial}), k.keyctl_instantiate({serial}, b'x', 1, 0), "
                   f"k.keyctl_reject({serial}, 1, 1, 0))")
        theirs = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                                 "-c", attempt], capture_output=True, text=True, timeout=30)
        assert theirs.stdout.split() == ["-1", "-1", "-1"], theirs.stdout + theirs.stderr
        out, _ = requester.communicate(timeout=30)
        took = time.monotonic() - start
    assert hashlib.sha256(SECRETS["default/disk/k0"]).hexdigest() in out and 3 <= took < 6, (took, out)
    assert any("via=worker" in line for line in syslog if "outcome=instantiated" in line)


@pytest.mark.parametrize("who", ["agent", "handler"])
def test_the_authority_leaves_root_s_user_keyring_once_taken(setup, handler, tsm_sim, who, request):
    """The handoff leaves the authority in root's user keyring only until the agent (or, when the agent does
    not end the construction, the handler) holds it: while either works on slow evidence, it is not there."""
    handler(setup.url, tsm_sim("sev_guest", "slow=3"), deadline=10)
    waiting = request.getfixturevalue("running_agent") if who == "agent" else None
    with contextlib.nullcontext() if waiting else silent_agent():
        start = time.monotonic()
        requester = subprocess.Popen(["keyctl", "session", "-", "keyctl", "request2", "user",
                                      "keybroker:default/disk/k0", "", "@s"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.5 if who == "agent" else 5 + 1.5)  # the handoff gives a silent agent 5 s
        assert requester.poll() is None  # the evidence takes 3 s: the round is under way
        assert not authorities_in_user_keyring()
        requester.communicate(timeout=30)
        assert requester.returncode == 0 and time.monotonic() - start < 10


def test_the_handler_keeps_the_deadline_of_a_drop_in_that_gives_the_agent_more(setup, handler, tsm_sim, syslog):
    """A drop-in installed for a longer deadline (its share 3 s) than the configuration now says (2 s): once a
    silent agent has had the 3 s, nothing is left of the deadline, and the handler rejects the key at once."""
    config = handler(setup.url, tsm_sim("sev_guest"), deadline=6)
    config.write_text(config.read_text().replace("deadline = 6", "deadline = 2"))
    with silent_agent():
        start = time.monotonic()
        out = fetch("k0")
        took = time.monotonic() - start
    assert "Connection timed out" in out.stderr and took < 4, (took, out.stderr)
    assert any("errno=ETIMEDOUT" in line for line in syslog), syslog


def test_the_agent_decides_access_for_the_requester_the_kernel_names(tmp_path, monkeypatch):
    """The agent reads the requester from the key under construction (where the handler sent it, once), and
    refuses before anything leaves the VM. This kernel does not upcall for non-root requesters: the kernel's
    answers are stood in for here, in the agent's own process (a requester that is allowed would have the agent
    attest, which needs the kernel's keyring: the kernel tests above do that for root)."""
    import socket as sockets

    from keybroker.guest import agent as agent_process
    from keybroker.guest import keyring as kr
    from keybroker.systemd import Journal

    config = tmp_path / "client.toml"
    config.write_text('[server]\nurl = "http://127.0.0.1:9"\n[tsm]\nroot = "/nonexistent"\n'
                      '[[access]]\nresource = "shared/*"\nuids = [65534]\n')
    ended: list[tuple] = []
    described = {41: kr.KeyDescription("user", 65534, 65534, 0, "keybroker:default/disk/k0")}
    monkeypatch.setattr(kr, "describe", described.__getitem__)
    monkeypatch.setattr(kr, "read", lambda key: b"")
    monkeypatch.setattr(kr, "reject", lambda key, timeout, error, ring=0: ended.append((key, error, timeout)))
    monkeypatch.setattr("keybroker.guest.broker.obtain", lambda *a, **k: pytest.fail("went for the key"))
    log = Journal("keybroker-test", stream=True)
    ours, theirs = sockets.socketpair()
    with ours, theirs:
        start = time.monotonic()
        agent_process._construct(ours, 41, str(config), start, start + 5, os.getpid(), None, log)
        assert theirs.recv(10) == agent.DONE
    # default/*: not for uid 65534 (root, the peer, may have anything), refused before anything left the VM
    assert ended == [(41, errno.EACCES, 60)]


def test_the_agent_ends_no_construction_past_its_share(tmp_path, monkeypatch):
    """The handoff gives up on the agent at the end of its share, and the handler takes over: a key the
    agent obtains after that (a key server that stalled, then answered) is neither instantiated nor
    rejected by the agent, nor announced, or the two would race (the kernel's stand-ins as below)."""
    import socket as sockets

    from keybroker.guest import agent as agent_process
    from keybroker.guest import broker
    from keybroker.guest import keyring as kr
    from keybroker.systemd import Journal

    config = tmp_path / "client.toml"
    config.write_text('[server]\nurl = "http://127.0.0.1:9"\n[tsm]\nroot = "/nonexistent"\n')
    ended: list[str] = []
    monkeypatch.setattr(kr, "describe", lambda key: kr.KeyDescription("user", 0, 0, 0, "keybroker:default/disk/k0"))
    monkeypatch.setattr(kr, "read", lambda key: b"")
    for call in ("reject", "instantiate", "setperm", "set_timeout"):
        monkeypatch.setattr(kr, call, lambda *args, call=call: ended.append(call))

    def stalled(*args, deadline: float, **kwargs) -> broker.ReleasedKey:
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
        return broker.ReleasedKey(bytearray(b"k" * 32), None)

    monkeypatch.setattr(broker, "obtain", stalled)
    ours, theirs = sockets.socketpair()
    with ours, theirs:
        start = time.monotonic()
        agent_process._construct(ours, 41, str(config), start, start + 0.3, os.getpid(), None,
                                 Journal("keybroker-test", stream=True))
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(10)  # no "done": the handoff runs the handler
    assert ended == []


def test_a_key_made_possessor_only_already_is_still_instantiated(monkeypatch):
    """An agent stopped between its setperm and its instantiate leaves the key possessor-only, without
    SETATTR: the handler's own setperm then fails (EACCES), and the key is instantiated all the same. Any
    other permissions the setperm could not set are an error, as before."""
    from keybroker.errors import KeyringError
    from keybroker.guest import keyring as kr
    from keybroker.guest.handler import Construction

    calls: list[str] = []

    def refused(key: int, perm: int) -> None:
        raise KeyringError("keyctl_setperm", errno.EACCES)

    monkeypatch.setattr(kr, "setperm", refused)
    monkeypatch.setattr(kr, "set_timeout", lambda key, seconds: calls.append("set_timeout"))
    monkeypatch.setattr(kr, "instantiate", lambda key, payload, ring=0: calls.append("instantiate"))
    for perm, instantiated in ((kr.POSSESSOR_ONLY, True), (kr.POSSESSOR_ONLY | 0x3F0000, False)):
        calls.clear()
        monkeypatch.setattr(kr, "describe", lambda key, perm=perm: kr.KeyDescription("user", 0, 0, perm, "k"))
        if instantiated:
            Construction(41).instantiate(bytearray(b"k"), 600)
            assert calls == ["set_timeout", "instantiate"]
        else:
            with pytest.raises(KeyringError):
                Construction(41).instantiate(bytearray(b"k"), 600)
            assert calls == []


def test_a_stopped_handoff_logs_the_description_on_one_line_of_its_own(setup, syslog):
    """The description is any local user's text: the handoff's log line (the handler's repr() quotes it)
    keeps it inside its quotes, without the quote or backslash that would let it fake another field."""
    import signal

    with silent_agent() as held:
        requester = subprocess.Popen(["keyctl", "session", "-", "keyctl", "request2", "user",
                                      "keybroker:x' outcome=instantiated via='agent\\", "", "@s"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start = time.monotonic()
        while not held:
            assert time.monotonic() - start < 10
            time.sleep(0.02)
        handoffs = [int(pid) for pid in subprocess.run(["pgrep", "-f", "keybroker-handoff --config"],
                                                       capture_output=True, text=True).stdout.split()]
        for pid in handoffs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _, err = requester.communicate(timeout=30)
    assert "Operation canceled" in err, err
    line = next(entry for entry in syslog if "via=handoff" in entry)
    assert "description='keybroker:x? outcome=instantiated via=?agent?' requester=0:0 outcome=rejected" in line, line
    assert line.count("'") == 4, line


def test_the_agent_answers_root_only(setup, running_agent):
    """Another user cannot reach the socket; a root peer with a malformed request, or one for a key whose
    authority it was not given, gets nothing."""
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                            f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(SOCKET)!r})"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    for request in (b"x" * 10**6, b"construct 123 5 /etc/keybroker/client.toml\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(SOCKET))
            with contextlib.suppress(OSError):  # closed with our bytes unread: the same refusal
                conn.sendall(request)
            said = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := conn.recv(100):
                    said += chunk
            assert said == b"", (request[:40], said)
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


def test_the_workers_answer_frames_are_strict():
    """The handler reads what its worker sends field by field: anything but the exact shape is refused,
    so a stray or truncated frame can never be taken for a key or a rejection."""
    key = answer.encode_answer({"size": 32, "lease": 600})
    assert answer.decode_answer(key[4:]) == {"size": 32, "lease": 600}
    assert answer.decode_answer(answer.encode_answer({"size": 1, "lease": None})[4:]) == {"size": 1, "lease": None}
    refusal = answer.encode_answer({"errno": errno.EKEYREJECTED, "timeout": 60, "reason": "x" * 5000})
    assert answer.decode_answer(refusal[4:]) == {"errno": errno.EKEYREJECTED, "timeout": 60, "reason": "x" * 2000}
    for body in (b"", b"\0\0\0\x03key", key[4:-1], key[4:] + b"\0", answer.frame("key", 32)[4:],
                 answer.frame("key", 32, 0, 0)[4:], answer.frame("key", 40000, 0)[4:], answer.frame("key", -1, 0)[4:],
                 answer.frame("key", "+3", 0)[4:], answer.frame("rejected", 0, 60, "")[4:],
                 answer.frame("deadline", 6000)[4:], b"\xff" * 64):
        with pytest.raises(ValueError):
            answer.decode_answer(body)


def test_construct_lines_are_strict():
    """The agent takes a construction only from a line of the exact grammar: a serial the kernel can give,
    an uptime as /proc/uptime gives it, a share from 0 to 300 seconds (exclusive of 0), an absolute path;
    nothing before, after or between."""
    assert agent.parse_request(b"construct 123 4567.89 5 /etc/keybroker/client.toml\n") == \
        (123, 4567.89, 5.0, "/etc/keybroker/client.toml")
    assert agent.parse_request(b"construct 2147483647 0.00 300 /c\n") == (2147483647, 0.0, 300.0, "/c")
    assert agent.parse_request(b"construct 1 1.00 0.5 /\xff\n") == (1, 1.0, 0.5, os.fsdecode(b"/\xff"))
    for line in (b"construct 123 1.00 5 /c", b"construct 0 1.00 5 /c\n", b"construct 2147483648 1.00 5 /c\n",
                 b"construct 01 1.00 5 /c\n", b"construct 1 1.00 0 /c\n", b"construct 1 1.00 301 /c\n",
                 b"construct 1 1.00 1.2345 /c\n", b"construct 1 1.00 5 c\n", b"construct 1 1.00 5 /c d\n",
                 b"construct  1 1.00 5 /c\n", b"construct 1 1.00 5 /c\n\n", b"construct -1 1.00 5 /c\n",
                 b" construct 1 1.00 5 /c\n", b"Construct 1 1.00 5 /c\n", b"construct 1 1.00 5\n",
                 b"construct 1 5 /c\n", b"construct 1 1.0 5 /c\n", b"construct 1 1 5 /c\n",
                 b"construct 1 12345678901.00 5 /c\n", b"construct 1 -1.00 5 /c\n",
                 b"construct 1 1.00 5 /" + b"c" * 4096 + b"\n", b"construct 1 1.00 5 /c\0\n", b""):
        with pytest.raises(ValueError):
            agent.parse_request(line)


def test_a_line_longer_than_its_limit_is_refused_before_it_ends():
    """The length is checked as the bytes come: a peer cannot make the reader hold more than the limit, nor
    wait for the end of a line it never sends."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"x" * (agent.REQUEST_MAX + 1))
        with pytest.raises(ValueError):
            agent.read_line(ours, agent.REQUEST_MAX, time.monotonic() + 5)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"one\ntwo\n")
        with pytest.raises(ValueError):
            agent.read_line(ours, agent.REQUEST_MAX, time.monotonic() + 5)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"x" * (agent.REQUEST_MAX - 1) + b"\n")
        assert len(agent.read_line(ours, agent.REQUEST_MAX, time.monotonic() + 5)) == agent.REQUEST_MAX


def test_a_peer_that_trickles_its_line_is_given_up_on_at_the_deadline(tmp_path):
    """Every byte in time is not the line in time: the reader stops at ``until`` however often bytes come."""
    import threading

    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.05):
                theirs.sendall(b"x")

    sender = threading.Thread(target=trickle)
    sender.start()
    with ours, theirs:
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                agent.read_line(ours, agent.REQUEST_MAX, start + 1)
            assert time.monotonic() - start < 2
        finally:
            stop.set()
            sender.join()


def test_the_drop_in_gives_the_agent_half_the_deadline():
    """The handoff reads the agent's share from the drop-in: half the configured deadline, in whole seconds
    (nc -w takes no fraction), so that the handler has the other half; the shipped sample says the same."""
    from keybroker.guest.install import conf_text
    from support import REPO

    for deadline, share in ((2, 1), (3, 1), (7.5, 3), (30, 15), (600, 300)):
        lines = conf_text(Path("/h/keybroker-handoff"), Path("/c.toml"), deadline).splitlines()[1:]
        line = f"keybroker:*\t*\t/h/keybroker-handoff --config /c.toml --agent-share {share} %k"
        assert lines == [f"create\t{kind}\t{line}" for kind in ("user", "logon")]
    shipped = [line for line in (REPO / "request-key.d" / "keybroker.conf").read_text().splitlines()
               if line.startswith("create")]
    assert shipped == conf_text(Path("/usr/local/bin/keybroker-handoff"), Path("/etc/keybroker/client.toml"),
                                30).splitlines()[1:]


def test_the_handler_takes_when_the_handoff_started_in_its_grammar_only():
    """``--since`` is the uptime /proc/uptime gave the handoff (digits, a dot, two digits): anything else is a
    usage error, before the handler touches the kernel."""
    handler = Path(sys.executable).parent / "keybroker-request-key"
    for since in ("1.5", "-1.00", "1e3", "12345678901.00", "1.00.00", "", "0x10.00"):
        out = subprocess.run([str(handler), "--config", "/nonexistent", "--since", since, "123"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "--since: expected seconds since boot" in out.stderr, (since, out.stderr)
