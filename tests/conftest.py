"""Shared fixtures: the configfs-tsm emulator, key servers, the request-key drop-in, syslog.

Everything a fixture starts or installs is stopped and removed after the test, also on
failure. The helpers behind them live in ``support/``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keybroker.sim.roots import SimState
from support import policies
from support.emulator import run_tsm_sim
from support.keyctl import new_attestation_locks_removed
from support.servers import KeyServerProcess, ServerSecrets


@pytest.fixture(scope="session")
def sim_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated-roots folder per test session (generating RSA-4096 roots takes seconds)."""
    return tmp_path_factory.mktemp("sim-state")


@pytest.fixture
def tsm_sim(tmp_path: Path, sim_state: Path) -> Iterator[Callable[..., Path]]:
    """Factory: ``tsm_sim("sev_guest", "slow=2", svsm=False)`` mounts an emulator for this test.

    ``state=DIR`` runs it on another simulated platform than the session's; ``init_data=FILE``
    launches the guest with that init-data.
    """
    stack: list = []

    def start(provider: str, *faults: str, svsm: bool = False, state: Path | None = None,
              init_data: Path | None = None) -> Path:
        cm = run_tsm_sim(tmp_path / f"m{len(stack)}", state or sim_state, provider, *faults, svsm=svsm,
                         init_data=init_data)
        root = cm.__enter__()
        stack.append(cm)
        return root

    try:
        yield start
    finally:
        while stack:
            stack.pop().__exit__(None, None, None)


# -- the key server --------------------------------------------------------------------

@pytest.fixture
def kbs(tmp_path: Path, sim_state: Path) -> Iterator[Callable[..., KeyServerProcess]]:
    """Factory: ``kbs()`` starts a key server trusting the simulated roots; stopped after the test.

    ``kbs(*extra_args, trust=True, db=None, secrets=None, policy=...)``: replicas share ``db`` and
    ``secrets``; ``policy`` is the release policy (any verified guest by default; None: none).
    """
    servers: list[KeyServerProcess] = []

    def start(*extra: str, trust: bool = True, db: str | None = None, secrets: ServerSecrets | None = None,
              policy: dict | None = policies.ANY_GUEST_DOCUMENT) -> KeyServerProcess:
        workdir = tmp_path / f"kbs{len(servers)}"
        workdir.mkdir()
        if trust:  # the folder exists whether or not an emulator ran first in this session
            SimState(sim_state).snp()
        server = KeyServerProcess(workdir, sim_state / "trust" if trust else None, *extra, db=db, secrets=secrets,
                                  policy=policy)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


# -- PostgreSQL, for the replica tests -------------------------------------------------

@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of the module's own; yields the URL of its maintenance database."""
    from support.postgres import Unavailable, running_postgres

    try:
        with running_postgres() as url:
            yield url
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _no_process_keyring() -> Iterator[None]:
    """pytest's process must not get a process (or thread) keyring: a request_key from it would then pass
    over a negative key in its session keyring, and the tests of the negative cache would see new upcalls.
    A test that gives it one fails, named (broker.obtain makes one: run it in support.child.in_child)."""
    had = _own_keyrings()
    yield
    if _own_keyrings() - had:
        pytest.fail("this test gave pytest's process a process or thread keyring (run what made it in "
                    "support.child.in_child)")


def _own_keyrings() -> set[int]:
    from keybroker.errors import KeyringError
    from keybroker.guest import keyring

    found = set()
    for special in (-1, keyring.PROCESS_KEYRING):  # -1: KEY_SPEC_THREAD_KEYRING
        with contextlib.suppress(KeyringError):
            found.add(keyring.serial_of(special))
    return found


# -- the request-key handler -----------------------------------------------------------

CONF = Path("/etc/request-key.d/keybroker.conf")
SYSTEM_LOCK = Path("/run/lock/keybroker-tests.lock")


@contextmanager
def _machine_lock() -> Iterator[None]:
    import fcntl

    SYSTEM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(SYSTEM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def system_lock() -> Iterator[None]:
    """Exclusive use of machine-wide state (the request-key drop-in, /dev/log) across test runs.

    The attestation locks a test's requests left in /run/keybroker (one per key server URL: the
    tests' servers have a port each) are removed after it, while nothing else can hold them, and
    so are the attestation tokens they kept in root's user keyring (a CI run left three).
    """
    from keybroker.guest import tokens

    with _machine_lock(), new_attestation_locks_removed():
        try:
            yield
        finally:
            if os.geteuid() == 0:
                tokens.forget_all()


def _probe_upcall(folder: Path, user: str | None) -> tuple[bool, str]:
    """Does the kernel run /sbin/request-key for a request by ``user`` (None: root)?

    A throwaway drop-in routes ``keybroker-probe:`` keys to a script that only records
    that it ran; the kernel then negates the key. Returns (ran, what the requester saw).
    """
    import secrets

    marker = folder / "ran"
    marker.unlink(missing_ok=True)
    description = f"keybroker-probe:{secrets.token_hex(8)}"
    cmd = ["keyctl", "session", "-", "keyctl", "request2", "user", description, "", "@s"]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    said = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
    return marker.exists(), said


@pytest.fixture(scope="session")
def nonroot_upcall(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """None when this kernel upcalls for non-root requesters; else a reason to skip, saying what it did.

    Some kernels answer a non-root ``request_key`` that finds no key with ENOENT at once,
    never running /sbin/request-key. Probed once, with a drop-in of its own that is removed.
    """
    if os.geteuid() != 0:
        return "probing the kernel's request-key upcall needs root"
    folder = tmp_path_factory.mktemp("upcall-probe")
    script = folder / "probe"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {folder / 'ran'}\n")
    script.chmod(0o755)
    conf = CONF.parent / "keybroker-probe.conf"
    with _machine_lock():
        CONF.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"create\tuser\tkeybroker-probe:*\t*\t{script} %k\n\n")
        try:
            root_ran, root_said = _probe_upcall(folder, None)
            nobody_ran, nobody_said = _probe_upcall(folder, "nobody")
        finally:
            conf.unlink(missing_ok=True)
    if not root_ran:
        return f"the kernel did not run /sbin/request-key even for root (the requester saw: {root_said})"
    if not nobody_ran:
        return (f"this kernel ({os.uname().release}) does not upcall for non-root requesters: request_key as "
                f"'nobody' answered '{nobody_said}' without running /sbin/request-key")
    return None


@pytest.fixture
def handler(tmp_path: Path, system_lock: None) -> Iterator[Callable[..., Path]]:
    """Factory: write a client config and install the handler's drop-in; both removed after."""
    if os.geteuid() != 0:
        pytest.skip("installing a request-key handler needs root")
    saved = CONF.read_bytes() if CONF.exists() else None

    def install(server_url: str, tsm_root: Path | None, *, deadline: float = 10, extra: str = "",
                ca: Path | None = None) -> Path:
        from keybroker.guest import install as installer

        config = tmp_path / "client.toml"
        trust = f'ca = "{ca}"\n' if ca else ""
        tsm = f'[tsm]\nroot = "{tsm_root}"\n' if tsm_root else ""  # None: the evidence source is in extra
        config.write_text(f'[server]\nurl = "{server_url}"\n{trust}{tsm}[handler]\ndeadline = {deadline}\n{extra}')
        installer.install(config, CONF.parent, Path(sys.executable).parent / "keybroker-handoff")
        return config

    from keybroker.guest import tokens

    tokens.forget_all()  # every test starts without attestation tokens kept by another
    try:
        yield install
    finally:
        tokens.forget_all()
        if saved is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_bytes(saved)


@pytest.fixture
def syslog(system_lock: None) -> Iterator[list[str]]:
    """Capture what the handler sends to /dev/log (when no syslog daemon owns it)."""
    import socket
    import threading

    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log belongs to a syslog daemon here")
    lines: list[str] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    os.chmod("/dev/log", 0o666)

    def collect() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            lines.append(data.decode("utf-8", "replace"))

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        os.unlink("/dev/log")
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def stalled_syslog(system_lock: None) -> Iterator[int]:
    """A /dev/log whose daemon has stopped reading: its queue is full (yields how many datagrams filled it)."""
    import socket

    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log belongs to a syslog daemon here")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    try:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        queued = 0
        with contextlib.suppress(BlockingIOError), filler:
            while True:
                filler.sendto(b"x" * 100, "/dev/log")
                queued += 1
        yield queued
    finally:
        os.unlink("/dev/log")
        sock.close()
