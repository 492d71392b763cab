"""Shared fixtures: the configfs-tsm emulator as a real FUSE mount, run as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

def _needs_root_and_fuse() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


@pytest.fixture(scope="session")
def sim_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated-roots folder per test session (generating RSA-4096 roots takes seconds)."""
    return tmp_path_factory.mktemp("sim-state")


def _unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextmanager
def run_tsm_sim(mountpoint: Path, state: Path, provider: str, *faults: str, svsm: bool = False
                ) -> Iterator[Path]:
    """Run ``keybroker tsm-sim``; yield its report root; stop and unmount it whatever happens."""
    reason = _needs_root_and_fuse()
    if reason:
        pytest.skip(f"configfs-tsm emulator {reason}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "keybroker", "tsm-sim", str(mountpoint), "--provider", provider,
           "--state", str(state)]
    cmd += [arg for fault in faults for arg in ("--fault", fault)]
    if svsm:
        cmd.append("--svsm")
    log = open(mountpoint.parent / f"{mountpoint.name}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    root = mountpoint / "tsm" / "report"
    try:
        deadline = time.monotonic() + 60  # first use generates the simulated roots
        while not root.is_dir():
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tsm-sim exited with {proc.returncode}: {log.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("tsm-sim did not mount in time")
            time.sleep(0.05)
        yield root
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _unmount(mountpoint)
        log.close()


@pytest.fixture
def tsm_sim(tmp_path: Path, sim_state: Path) -> Iterator[Callable[..., Path]]:
    """Factory: ``tsm_sim("sev_guest", "slow=2", svsm=False)`` mounts an emulator for this test."""
    stack: list = []

    def start(provider: str, *faults: str, svsm: bool = False) -> Path:
        cm = run_tsm_sim(tmp_path / f"m{len(stack)}", sim_state, provider, *faults, svsm=svsm)
        root = cm.__enter__()
        stack.append(cm)
        return root

    try:
        yield start
    finally:
        while stack:
            stack.pop().__exit__(None, None, None)


# -- the key server --------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_secret(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class ServerSecrets:
    """A key server's secret files, as an operator makes them: KEK, admin token, token-signing key."""

    def __init__(self, folder: Path) -> None:
        import secrets

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        folder.mkdir(parents=True, exist_ok=True)
        self.kek = write_secret(folder / "kek", os.urandom(32))
        self.admin_token = secrets.token_hex(32)
        self.admin_token_file = write_secret(folder / "admin-token", self.admin_token.encode() + b"\n")
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.token_key = write_secret(folder / "token-key.pem", key)


class KeyServerProcess:
    """``keybroker serve`` on a loopback port (SQLite unless ``db`` is given), trusting the simulated roots.

    It gets a KEK and an admin token from ``secrets`` (made in ``workdir`` unless shared).
    """

    def __init__(self, workdir: Path, trust: Path | None, *extra: str, db: str | None = None,
                 secrets: ServerSecrets | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db or f"sqlite:///{workdir / 'kbs.db'}"
        self.secrets = secrets or ServerSecrets(workdir / "secrets")
        self.args = [sys.executable, "-m", "keybroker", "serve", "--listen", f"127.0.0.1:{self.port}",
                     "--db", self.db, "--kek-file", str(self.secrets.kek),
                     "--admin-token-file", str(self.secrets.admin_token_file),
                     *(["--trust-roots", str(trust)] if trust else []), *extra]
        self.log_path = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "KeyServerProcess":
        import urllib.request

        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"key server did not start: {self.log()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def requests_to(self, route: str) -> int:
        """How many requests the server answered on ``route`` (its metrics name: ``auth``, ``attest``, ``resource``…), from /metrics."""
        import re
        import urllib.request

        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        pattern = rf'^keybroker_http_requests_total\{{route="{re.escape(route)}",status="\d+"\}} (\S+)$'
        return int(sum(float(count) for count in re.findall(pattern, text, re.M)))

    def put(self, path: str, value: bytes, *extra: str) -> None:
        subprocess.run([sys.executable, "-m", "keybroker", "resource", "put", path, "--db", self.db,
                        "--kek-file", str(self.secrets.kek), *extra], input=value, check=True, timeout=30)


@pytest.fixture
def kbs(tmp_path: Path, sim_state: Path) -> Iterator[Callable[..., KeyServerProcess]]:
    """Factory: ``kbs()`` starts a key server trusting the simulated roots; stopped after the test.

    ``kbs(*extra_args, trust=True, db=None, secrets=None)``: replicas share ``db`` and ``secrets``.
    """
    servers: list[KeyServerProcess] = []

    def start(*extra: str, trust: bool = True, db: str | None = None,
              secrets: ServerSecrets | None = None) -> KeyServerProcess:
        workdir = tmp_path / f"kbs{len(servers)}"
        workdir.mkdir()
        server = KeyServerProcess(workdir, sim_state / "trust" if trust else None, *extra, db=db, secrets=secrets)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


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
    """Exclusive use of machine-wide state (the request-key drop-in, /dev/log) across test runs."""
    with _machine_lock():
        yield


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

    def install(server_url: str, tsm_root: Path, *, deadline: float = 10, extra: str = "") -> Path:
        from keybroker.guest import install as installer

        config = tmp_path / "client.toml"
        config.write_text(f'[server]\nurl = "{server_url}"\n[tsm]\nroot = "{tsm_root}"\n'
                          f"[handler]\ndeadline = {deadline}\n{extra}")
        installer.install(config, CONF.parent, Path(sys.executable).parent / "keybroker-request-key")
        return config

    try:
        yield install
    finally:
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
