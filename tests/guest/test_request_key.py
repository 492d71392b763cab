"""Key release through the kernel: keyctl -> /sbin/request-key -> handler -> key server -> keyring.

Every request runs in a fresh session keyring (``keyctl session -`` or a new anonymous
session), against the configfs-tsm emulator and a key server on loopback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keybroker.errors import KeyringError
from keybroker.guest import install as installer
from keybroker.guest import keyring
from support.agent import silent_agent
from support.keyctl import keyctl_session, proc_keys, serials
from support.stub import QuietHandler, StubServer

SECRET = hashlib.sha256(b"disk key").digest()


@pytest.fixture
def broker(tsm_sim, kbs, handler):
    """A working setup: sev_guest emulator, key server with one resource, handler installed."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/root", SECRET)
    handler(server.url, root)
    return server


def test_user_key_is_released_into_the_keyring(broker, syslog):
    out = keyctl_session('id=$(keyctl request2 user keybroker:default/disk/root "" @s) && echo "id=$id" && '
                         'keyctl describe $id && keyctl pipe $id | sha256sum && grep "^$(printf %08x $id) " /proc/keys')
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout
    describe = re.search(r"^ *\d+: (\S+)\s+(\d+)\s+(\d+) user: keybroker:default/disk/root$", out.stdout, re.M)
    assert describe, out.stdout
    perms = describe.group(1)
    assert perms == "-ls-rv" + "-" * 18  # possessor only, without setattr or write; nothing for anyone else
    assert "released" in broker.log()
    assert "form=envelope result=verified" in broker.log()  # keybroker's client and server: the envelope
    line = next(entry for entry in syslog if "keybroker:default/disk/root" in entry)
    assert "outcome=instantiated size=32" in line and "requester=0:0" in line
    assert SECRET.hex() not in "".join(syslog)


def test_logon_key_cannot_be_read_from_user_space(broker):
    out = keyctl_session('id=$(keyctl request2 logon keybroker:default/disk/root "" @s) && echo "id=$id" && '
                         'keyctl describe $id && keyctl read $id')
    assert "id=" in out.stdout and "logon: keybroker:default/disk/root" in out.stdout
    assert out.returncode != 0 and "Operation not supported" in out.stderr


@pytest.mark.parametrize("fault, reason", [("corrupt-signature", "report_signature"),
                                           ("debug", "debug guest")])
def test_bad_evidence_is_rejected_by_the_service(tsm_sim, kbs, handler, fault, reason):
    root = tsm_sim("sev_guest", fault)
    server = kbs()
    server.put("default/disk/root", SECRET)
    handler(server.url, root)
    start = time.monotonic()
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s')
    assert time.monotonic() - start < 5
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr
    assert reason in server.log()  # the server says why


def test_unknown_resource_is_enokey(broker):
    out = keyctl_session('keyctl request2 user keybroker:default/disk/absent "" @s')
    assert "Required key not available" in out.stderr


def test_descriptions_outside_the_grammar_are_enokey(broker, syslog):
    out = keyctl_session('keyctl request2 user "keybroker:default/../root" "" @s; '
                         'keyctl request2 user keybroker:default/disk/root "privlevel=7" @s')
    assert out.stderr.count("Required key not available") == 2
    assert sum("errno=ENOKEY" in line for line in syslog) == 2


def test_non_root_requester_gets_nothing(broker, nonroot_upcall):
    if nonroot_upcall:
        pytest.skip(nonroot_upcall)
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s', user="nobody")
    assert out.returncode != 0 and "Permission denied" in out.stderr
    assert "attest" not in broker.log()  # refused before any evidence left the VM


def test_access_rules_grant_other_users(tsm_sim, kbs, handler, nonroot_upcall):
    if nonroot_upcall:
        pytest.skip(nonroot_upcall)
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("shared/disk/data", SECRET)
    handler(server.url, root, extra=f'[[access]]\nresource = "shared/*"\nuids = [{NOBODY}]\n')
    out = keyctl_session('id=$(keyctl request2 user keybroker:shared/disk/data "" @s) && keyctl pipe $id | sha256sum',
                         user="nobody")
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout, out.stderr


# The same access decisions where the kernel never upcalls for non-root requesters: the real
# handler, through --debug, deciding for a requester that is not root.

NOBODY = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
NOGROUP = int(subprocess.run(["id", "-g", "nobody"], capture_output=True, text=True).stdout)


def debug_request(config, description: str, requester: str, key_type: str = "user") -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "keybroker-request-key"),
                           "--config", str(config), "--debug", key_type, description, "", "--requester", requester],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def member():
    """A user of this machine in a supplementary group of its own (both removed after the test): (uid, gid)."""
    import grp
    import pwd
    import secrets

    name = f"kbt{secrets.token_hex(4)}"
    subprocess.run(["groupadd", name], check=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "--gid", "nogroup", "--groups", name, name],
                       check=True)
        try:
            yield pwd.getpwnam(name).pw_uid, grp.getgrnam(name).gr_gid
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:
        subprocess.run(["groupdel", name], check=False)


def test_access_rules_count_supplementary_groups(tsm_sim, kbs, handler, member):
    uid, group = member
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("team/disk/data", SECRET)
    config = handler(server.url, root, extra=f'[[access]]\nresource = "team/*"\ngids = [{group}]\n')
    out = debug_request(config, "keybroker:team/disk/data", f"{uid}:{NOGROUP}")  # the key carries nogroup
    assert out.returncode == 0 and "would instantiate a 32-byte key" in out.stdout, out.stdout
    out = debug_request(config, "keybroker:team/disk/data", f"{NOBODY}:{NOGROUP}")  # not a member
    assert out.returncode == 1 and "errno=EACCES" in out.stdout


def test_access_rules_restrict_the_key_type(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("secret/disk/data", SECRET)
    config = handler(server.url, root, extra=f'[[access]]\nresource = "secret/*"\nuids = [{NOBODY}]\n'
                                             'key_types = ["logon"]\n')
    out = debug_request(config, "keybroker:secret/disk/data", f"{NOBODY}:{NOGROUP}", key_type="logon")
    assert out.returncode == 0 and "would instantiate" in out.stdout, out.stdout
    out = debug_request(config, "keybroker:secret/disk/data", f"{NOBODY}:{NOGROUP}", key_type="user")
    assert out.returncode == 1 and "errno=EACCES" in out.stdout and "as a user key" in out.stdout


def test_handler_refuses_a_non_root_requester_before_attesting(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/root", SECRET)
    config = handler(server.url, root, extra=f'[[access]]\nresource = "shared/*"\nuids = [{NOBODY}]\n')
    out = debug_request(config, "keybroker:default/disk/root", f"{NOBODY}:{NOGROUP}")
    assert out.returncode == 1 and "errno=EACCES" in out.stdout and "timeout=60s" in out.stdout, out.stdout
    assert f"requester uid {NOBODY} gid {NOGROUP} may not obtain default/disk/root" in out.stdout
    assert server.requests_to("auth") == 0 and server.requests_to("attest") == 0  # nothing sent
    out = debug_request(config, "keybroker:default/disk/root", "0:0")  # root may: the refusal was the rule's
    assert out.returncode == 0 and "would instantiate a 32-byte key" in out.stdout, out.stdout
    assert server.requests_to("auth") == 1 and server.requests_to("attest") == 1


@pytest.mark.parametrize("rule", [f"uids = [{NOBODY}]", f"gids = [{NOGROUP}]"])
def test_handler_access_rules_grant_a_non_root_requester(tsm_sim, kbs, handler, rule):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("shared/disk/data", SECRET)
    config = handler(server.url, root, extra=f'[[access]]\nresource = "shared/*"\n{rule}\n')
    out = debug_request(config, "keybroker:shared/disk/data", f"{NOBODY}:{NOGROUP}")
    assert out.returncode == 0 and "would instantiate a 32-byte key" in out.stdout, out.stdout + out.stderr
    assert SECRET.hex() not in out.stdout + out.stderr
    out = debug_request(config, "keybroker:default/disk/root", f"{NOBODY}:{NOGROUP}")  # outside the rule
    assert out.returncode == 1 and "errno=EACCES" in out.stdout


def test_requester_is_only_a_debug_aid():
    handler = os.path.join(os.path.dirname(sys.executable), "keybroker-request-key")
    out = subprocess.run([handler, "--requester", "0:0", "12345"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--requester is only for --debug" in out.stderr
    out = subprocess.run([handler, "--debug", "user", "keybroker:a/b/c", "", "--requester", "²:0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "expected UID:GID" in out.stderr


def test_server_down_is_transient_and_a_retry_succeeds(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/root", SECRET)
    handler(server.url, root, deadline=10)
    server.stop()
    keyring.join_session_keyring(None)  # the negative key is cached in this fresh session keyring
    start = time.monotonic()
    with pytest.raises(KeyringError) as info:
        keyring.request_key("user", "keybroker:default/disk/root", "", keyring.SESSION_KEYRING)
    rejected = time.monotonic()
    assert info.value.errno == errno.ECONNREFUSED and rejected - start < 10
    negative = serials(keyring.SESSION_KEYRING)  # the rejected key, which caches the failure for 5 s
    assert proc_keys(negative[0])[3] in ("3s", "4s", "5s")  # what is left of 5 s, in whole seconds
    # Asked again at once, the same rejected key answers: no new upcall (a new one would be a new key).
    # Asked before the server is started again, so that however long that takes, the key is still live.
    with pytest.raises(KeyringError) as info:
        keyring.request_key("user", "keybroker:default/disk/root", "", keyring.SESSION_KEYRING)
    assert info.value.errno == errno.ECONNREFUSED and serials(keyring.SESSION_KEYRING) == negative
    server.start()
    time.sleep(max(0.0, rejected + 5.5 - time.monotonic()))  # transient failures are cached for 5 s
    key = keyring.request_key("user", "keybroker:default/disk/root", "", keyring.SESSION_KEYRING)
    assert keyring.read(key) == SECRET


def test_slow_provider_never_hangs_the_requester(tsm_sim, kbs, handler, syslog):
    root = tsm_sim("sev_guest", "slow=60")
    server = kbs()
    server.put("default/disk/root", SECRET)
    handler(server.url, root, deadline=5)
    start = time.monotonic()
    out = keyctl_session('keyctl request2 user keybroker:default/disk/root "" @s')
    elapsed = time.monotonic() - start
    assert out.returncode != 0 and "Connection timed out" in out.stderr
    assert 4.5 < elapsed < 8
    assert any("errno=ETIMEDOUT" in line and "deadline of 5 s passed" in line for line in syslog)


def test_entries_of_killed_workers_do_not_pile_up(tsm_sim, kbs, tmp_path, system_lock):
    # The host makes every report outlast the deadline: each worker is killed holding its report
    # entry, kernel memory a killed process never frees. The next request's worker removes them.
    root = tsm_sim("sev_guest", "slow=5")
    server = kbs()
    server.put("default/disk/root", SECRET)
    config = tmp_path / "client.toml"
    config.write_text(f'[server]\nurl = "{server.url}"\n[tsm]\nroot = "{root}"\n[handler]\ndeadline = 2\n')
    command = [os.path.join(os.path.dirname(sys.executable), "keybroker-request-key"), "--config", str(config),
               "--debug", "user", "keybroker:default/disk/root", ""]

    def request() -> None:
        start = time.monotonic()
        with open(tmp_path / "out", "w+") as out:  # not a pipe: a killed worker holds it until it ends
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=60).returncode
            out.seek(0)
            said = out.read()
        assert code == 1 and "errno=ETIMEDOUT" in said, said
        assert time.monotonic() - start < 4.5  # the handler does not wait for what it left behind

    def owners() -> dict[str, int]:
        return {name: int(name.split("-")[1]) for name in os.listdir(root)}

    def running(pid: int) -> bool:
        try:
            return " Z" not in open(f"/proc/{pid}/stat").read().rpartition(")")[2][:2]
        except FileNotFoundError:
            return False

    for _ in range(3):
        request()
    # A mkdir waits for the report being made (it takes the lock that report holds, as the kernel's
    # does), and a worker killed while it waits leaves no entry: if none was left, more requests.
    for _ in range(3):
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in owners().values()):  # the killed workers end when the host answers
            assert time.monotonic() < deadline, owners()
            time.sleep(0.2)
        if owners():
            break
        request()
    assert owners()  # what they left
    request()
    left = owners()
    assert len(left) <= 1 and all(running(pid) for pid in left.values()), left  # only the latest worker's


def _handlers_of(config: Path, program: str = "keybroker-request-key") -> list[tuple[int, int]]:
    """(pid, parent pid) of each running process of the handler (or ``program``) installed with ``config`` (it
    and its worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if str(config).encode() in argv and any(arg.endswith(program.encode()) for arg in argv) \
                and stat[0] != "Z":
            found.append((int(entry.name), int(stat[1])))
    return found


def _handler_and_worker(config: Path) -> tuple[int, int]:
    deadline = time.monotonic() + 20
    while True:
        found = _handlers_of(config)
        pids = {pid for pid, _ in found}
        pairs = [(parent, pid) for pid, parent in found if parent in pids]
        if pairs:
            return pairs[0]
        assert time.monotonic() < deadline, found
        time.sleep(0.02)


def test_a_killed_handler_takes_its_worker_with_it(tsm_sim, kbs, handler):
    """SIGKILL ends the handler at once (the kernel negates the key); its worker, orphaned, went on to
    attest and have the server release a key that nobody would receive, holding the attestation lock."""
    import signal

    root = tsm_sim("sev_guest", "slow=2")
    server = kbs()
    server.put("default/disk/root", SECRET)
    config = handler(server.url, root)
    requester = subprocess.Popen(["keyctl", "session", "-", "keyctl", "request2", "user",
                                  "keybroker:default/disk/root", "", "@s"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    parent, _ = _handler_and_worker(config)
    time.sleep(0.3)  # the worker is in the provider's read now
    os.kill(parent, signal.SIGKILL)
    _, err = requester.communicate(timeout=30)
    assert "Required key not available" in err  # the kernel's negation
    time.sleep(4)  # the report, had the worker lived, and the round
    assert not _handlers_of(config)
    assert server.requests_to("attest") == 0 and "released" not in server.log()


@pytest.mark.parametrize("agent", [False, True], ids=["worker", "agent"])
def test_a_stopped_handler_rejects_the_key_at_once(tsm_sim, kbs, handler, syslog, agent):
    """SIGTERM (a shutdown, an operator) ends the handler, or the handoff waiting on the agent: it rejects
    the key (ECANCELED, 5 s) and logs it, where the kernel's negation said "Required key not available"
    for 60 s, the word for a key that does not exist, and nothing was logged; the worker does not go on."""
    import signal

    root = tsm_sim("sev_guest", "slow=3")
    server = kbs()
    server.put("default/disk/root", SECRET)
    config = handler(server.url, root)
    # With the agent: one that takes the construction and says nothing more, so the handoff waits on it.
    with silent_agent() if agent else contextlib.nullcontext([]) as held:
        started = time.monotonic()
        requester = subprocess.Popen(["keyctl", "session", "-", "sh", "-c", 'keyctl request2 user '
                                      'keybroker:default/disk/root "" @s; grep " keybroker:default/disk/root" '
                                      '/proc/keys'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if agent:
            while not held:
                assert time.monotonic() - started < 10
                time.sleep(0.02)
            handoffs = _handlers_of(config, "keybroker-handoff")  # and the subshells it forked, by their parent
            parent = next(pid for pid, ppid in handoffs if ppid not in {pid for pid, _ in handoffs})
        else:
            parent, _ = _handler_and_worker(config)
        time.sleep(0.3)
        os.kill(parent, signal.SIGTERM)
        out, err = requester.communicate(timeout=30)
    assert "Operation canceled" in err and time.monotonic() - started < 3, err
    assert re.search(r" [1-5]s +3f010000 ", out), out  # negative for 5 s at most
    line = next(entry for entry in syslog if "keybroker:default/disk/root" in entry)
    assert "errno=ECANCELED timeout=5s" in line and "stopped by SIGTERM" in line, line
    time.sleep(4)
    assert not _handlers_of(config) and server.requests_to("attest") == 0


def test_lease_becomes_the_key_expiry(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/lease", SECRET, "--lease", "600")
    handler(server.url, root)
    out = keyctl_session('id=$(keyctl request2 user keybroker:default/disk/lease "" @s) && '
                         'grep "^$(printf %08x $id) " /proc/keys && '
                         # the requester, who possesses the key, tries to lift the lease and widen its permissions
                         'keyctl timeout $id 0; keyctl setperm $id 0x3f3f3f3f; '
                         'grep "^$(printf %08x $id) " /proc/keys; keyctl describe $id')
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "keybroker:default/disk/lease: 32" in line]
    assert len(lines) == 2 and all(re.search(r" (9m|10m) ", line) for line in lines), out.stdout  # still expires
    assert out.stderr.count("Permission denied") == 2, out.stderr
    assert re.search(r"^ *\d+: -ls-rv-{18} ", out.stdout, re.M), out.stdout  # unchanged: possessor-only


def test_the_lease_is_set_only_once_the_requester_cannot_lift_it(tsm_sim, kbs, handler, tmp_path):
    # The requester possesses the key under construction, with SETATTR, until the handler's
    # setperm: a lease set before it could be lifted in between (a racing keyctl_set_timeout).
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (.ci/setup installs it)")
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/lease", SECRET, "--lease", "600")
    config = handler(server.url, root)
    bin_dir = tmp_path / "bin"  # the handoff, and beside it the handler under strace
    bin_dir.mkdir()
    shutil.copy(Path(sys.executable).parent / "keybroker-handoff", bin_dir)
    traced = bin_dir / "keybroker-request-key"
    trace = tmp_path / "keyctl.trace"
    real = Path(sys.executable).parent / "keybroker-request-key"
    traced.write_text(f'#!/bin/sh\nexec strace -qq -e trace=keyctl -o {trace} {real} "$@"\n')
    traced.chmod(0o755)
    installer.install(config, installer.CONF_DIR, bin_dir / "keybroker-handoff")  # the fixture puts its own back
    out = keyctl_session('keyctl request2 user keybroker:default/disk/lease "" @s')
    assert out.returncode == 0, out.stderr
    calls = [op for op in re.findall(r"keyctl\((KEYCTL_\w+)", trace.read_text())
             if op in ("KEYCTL_SETPERM", "KEYCTL_SET_TIMEOUT", "KEYCTL_INSTANTIATE")]
    assert calls == ["KEYCTL_SETPERM", "KEYCTL_SET_TIMEOUT", "KEYCTL_INSTANTIATE"], trace.read_text()


def test_debug_mode_prints_the_outcome_not_the_secret(broker, handler, tsm_sim):
    config = handler(broker.url, tsm_sim("sev_guest"))
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "keybroker-request-key"),
                          "--config", str(config), "--debug", "user", "keybroker:default/disk/root", ""],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "would instantiate a 32-byte key" in out.stdout
    assert SECRET.hex() not in out.stdout + out.stderr
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "keybroker-request-key"),
                          "--config", str(config), "--debug", "user", "keybroker:default/disk/none", ""],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "would reject" in out.stdout and "errno=ENOKEY" in out.stdout


# -- the handler's worker and what it keeps in memory --------------------------------------------

class ProblemServer(StubServer):
    """A key server that answers every request with one RFC 7807 problem."""

    def __init__(self, status: int, body: dict) -> None:
        import json

        payload = json.dumps(body).encode()

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(Handler)



@contextlib.contextmanager
def trickling_server():
    """A server that answers a byte every 0.2 s (40 s in all), whatever it was asked; yields its port."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * 200:
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


def test_a_server_that_trickles_its_answer_is_cut_off_at_the_deadline():
    """A read's timeout is no bound on an answer sent a byte every 0.2 s: the exchange's is."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ServerUnreachable
    from keybroker.guest.client import RcarClient

    with trickling_server() as port:
        started = time.monotonic()
        client = RcarClient(f"http://127.0.0.1:{port}", deadline=started + 2)
        with pytest.raises(ServerUnreachable) as failed:
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
    assert failed.value.errno == errno.ETIMEDOUT and "did not answer within" in str(failed.value)
    assert time.monotonic() - started < 3  # not the 40 s the trickle would last


def test_an_exchange_whose_time_passed_while_connecting_ends_there(monkeypatch):
    """The watchdog has no socket to shut while the name resolves (or the connection is made): when it
    fires then, the exchange must end once connected, not go on with only each read bounded."""
    import socket

    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ServerUnreachable
    from keybroker.guest.client import RcarClient

    resolve = socket.getaddrinfo

    def late(*args, **kwargs):  # a resolver that answers after the exchange's time
        time.sleep(1.2)
        return resolve(*args, **kwargs)

    with trickling_server() as port:
        monkeypatch.setattr(socket, "getaddrinfo", late)
        started = time.monotonic()
        client = RcarClient(f"http://127.0.0.1:{port}", deadline=started + 1, attempts=1)
        with pytest.raises(ServerUnreachable) as failed:
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
    assert failed.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 3  # not the 40 s the trickle would last


def test_a_negative_chunk_size_does_not_read_the_connection_into_memory():
    """http.client reads a chunk size with int(line, 16), "-1" too; a negative size read the
    connection to its end, a body as large as the server liked, past RESPONSE_MAX."""
    import socket
    import threading

    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ServerUnreachable
    from keybroker.guest.client import RcarClient

    listener = socket.create_server(("127.0.0.1", 0))
    sent = []

    def flood() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n")
                for _ in range(48):
                    conn.sendall(b"x" * (1 << 20))
                    sent.append(1 << 20)

    server = threading.Thread(target=flood, daemon=True)
    server.start()
    client = RcarClient(f"http://127.0.0.1:{listener.getsockname()[1]}", deadline=time.monotonic() + 10, attempts=1)
    try:
        with pytest.raises(ServerUnreachable):
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
        server.join(10)
    finally:
        listener.close()
    assert sum(sent) < 48 << 20  # what the sockets' buffers hold, not all the server had


def test_a_long_non_ascii_reason_arrives_whole_from_the_worker(tsm_sim, handler):
    server = ProblemServer(401, {"type": "urn:keybroker:error:" + "é" * 300, "detail": "ü" * 2000})
    try:
        config = handler(server.url, tsm_sim("sev_guest"))
        out = debug_request(config, "keybroker:default/disk/root", "0:0")
    finally:
        server.close()
    assert out.returncode == 1 and "errno=EPROTO" in out.stdout, out.stdout  # not "the worker ended without an answer"
    assert "é" * 200 + ": " + "ü" * 500 in out.stdout


def test_neither_the_handler_nor_its_worker_can_dump_core(tsm_sim, kbs, handler, tmp_path):
    """A core file of a process holding a released key would put the key on disk."""
    import signal
    import time

    root = tsm_sim("sev_guest", "slow=20")
    server = kbs()
    config = handler(server.url, root, deadline=30)
    work = tmp_path / "cwd"
    work.mkdir()
    script = ("ulimit -c unlimited; exec " + os.path.join(os.path.dirname(sys.executable), "keybroker-request-key")
              + f" --config {config} --debug user keybroker:default/disk/root ''")
    parent = subprocess.Popen(["sh", "-c", script], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (children := open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split()):
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    for pid in (int(children[0]), parent.pid):  # the worker (blocked in the provider), then the handler
        os.kill(pid, signal.SIGSEGV)
    parent.wait(30)
    assert parent.returncode == -signal.SIGSEGV
    time.sleep(0.5)
    assert list(work.iterdir()) == []  # no core file
    # The same crash of a process that may dump core leaves one here: the check can see one.
    control = subprocess.Popen(["sh", "-c", f"ulimit -c unlimited; exec {sys.executable} -c 'import time; "
                                "time.sleep(30)'"], cwd=work)
    time.sleep(0.5)
    os.kill(control.pid, signal.SIGSEGV)
    control.wait(30)
    assert any(path.name.startswith("core") for path in work.iterdir())


MEMORY_SCAN = r"""
import ctypes, os, re, sys, time
from keybroker.guest import config, handler
from keybroker.guest.request import parse_request

needle = bytearray.fromhex(sys.argv[2])  # the one copy this process may hold
cfg = config.load(sys.argv[1])
released = handler.obtain_within(cfg, parse_request("user", "keybroker:default/disk/wipe", b""), time.monotonic() + 20)
assert released.value == needle, "not the stored key"
released.value[:] = bytes(len(released.value))  # what the handler does after instantiating
skip = {ctypes.addressof((ctypes.c_char * len(needle)).from_buffer(needle))}
chunk = bytearray(1 << 20)
skip_range = (ctypes.addressof((ctypes.c_char * len(chunk)).from_buffer(chunk)), len(chunk))
found = 0
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
    for line in maps:
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if line.split()[1][0] != "r" or "[vvar" in line or "[vsyscall" in line:
            continue
        for at in range(start, end, len(chunk) - 64):
            if skip_range[0] <= at < skip_range[0] + skip_range[1]:
                continue
            try:
                got = os.preadv(mem.fileno(), [memoryview(chunk)[:min(len(chunk), end - at)]], at)
            except OSError:
                break
            view = chunk[:got]
            index = view.find(needle)
            while index >= 0:
                found += (at + index) not in skip
                index = view.find(needle, index + 1)
print("copies", found)
"""


def test_the_handler_keeps_no_copy_of_a_released_key(tsm_sim, kbs, handler, tmp_path):
    """After the handler wipes the key it instantiated, no copy of it is left in its memory."""
    key = os.urandom(32)
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/wipe", key)
    config = handler(server.url, root)
    out = subprocess.run([sys.executable, "-c", MEMORY_SCAN, str(config), key.hex()], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "copies 0", out.stdout
