"""Key servers for tests: ``keybroker serve`` on loopback with an operator's secret files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from support import policies


@contextmanager
def raw_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback TCP server that gives each connection it accepts to ``handle`` (one at a time, on its accept
    thread: a handler that must not hold the next one starts a thread of its own); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            handle(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


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

    It gets a KEK and an admin token from ``secrets`` (made in ``workdir`` unless shared), and
    ``policy`` as its release policy (any verified guest, unless the test gives another, or
    None to start with none, as a fresh server does; ``--policy`` in ``extra`` wins).
    """

    def __init__(self, workdir: Path, trust: Path | None, *extra: str, db: str | None = None,
                 secrets: ServerSecrets | None = None, policy: dict | None = policies.ANY_GUEST_DOCUMENT,
                 source: Path | None = None) -> None:
        self.workdir = workdir
        # The keybroker the processes run: this checkout's, or another's (a benchmark's baseline).
        self._source = {"cwd": source, "env": os.environ | {"PYTHONPATH": str(source)}} if source else {}
        self.db = db or f"sqlite:///{workdir / 'kbs.db'}"
        self.secrets = secrets or ServerSecrets(workdir / "secrets")
        self.args = [sys.executable, "-m", "keybroker", "serve", "--listen", "",
                     "--db", self.db, "--kek-file", str(self.secrets.kek),
                     "--admin-token-file", str(self.secrets.admin_token_file),
                     *(["--trust-roots", str(trust)] if trust else []), *extra]
        if "--kds-url" not in extra and "--config" not in extra:
            self.args += ["--kds-url", ""]  # AMD's KDS has nothing for the emulator's simulated chips
        if policy is not None and "--policy" not in extra:
            self.args += ["--policy", str(policies.write(workdir / "policy.json", policy))]
        self.proc: subprocess.Popen | None = None
        self._use_port(free_port(), https="--tls-cert" in extra)

    def _use_port(self, port: int, *, https: bool) -> None:
        self.port = port
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{port}"
        self.args[self.args.index("--listen") + 1] = f"127.0.0.1:{port}"
        self.log_path = self.workdir / f"server-{port}.log"

    def get(self, path: str) -> bytes:
        """GET ``path`` from the server (over TLS without checking its certificate: this is the test's own)."""
        import ssl
        import urllib.request

        context = ssl._create_unverified_context() if self.url.startswith("https") else None
        return urllib.request.urlopen(f"{self.url}{path}", timeout=10, context=context).read()

    def start(self) -> KeyServerProcess:
        """Start the server and wait until it serves. A first start whose port another process took
        between free_port() and the bind (tests run in parallel) starts again on another port; a
        restart keeps its port, which its clients know."""
        for attempt in range(5 if self.proc is None else 1):
            if attempt:
                self._use_port(free_port(), https=self.url.startswith("https"))
            if self._serving():
                return self
            if "Address already in use" not in self.log():
                break
        raise RuntimeError(f"key server did not start: {self.log()}")

    def _serving(self) -> bool:
        """Whether this process came to serve on its port: not merely that something answers there."""
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, **self._source)
        log.close()
        bound = f"running on {self.url} ".encode()  # uvicorn's line once it has bound the port (every revision's)
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            if bound in self.log_path.read_bytes()[logged:]:
                with suppress(OSError):
                    self.get("/healthz")
                    return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def workers(self) -> list[int]:
        assert self.proc is not None
        return [int(pid) for pid in open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()]

    def crash(self) -> None:
        """SIGKILL the workers and the supervisor at once: what a power cut does to requests in flight."""
        import signal

        assert self.proc is not None
        for pid in self.workers():
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples with these labels, from /metrics."""
        import re

        text = self.get("/metrics").decode()
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            if all(have.get(key) == value for key, value in labels.items()):
                total += float(match[2])
        return total

    def denials(self, reason: str) -> int:
        return int(self.metric("keybroker_denials_total", reason=reason))

    def requests_to(self, route: str) -> int:
        """How many requests the server answered on ``route`` (``auth``, ``attest``, ``resource``…), from /metrics."""
        return int(self.metric("keybroker_http_requests_total", route=route))

    def put(self, path: str, value: bytes, *extra: str) -> None:
        subprocess.run([sys.executable, "-m", "keybroker", "resource", "put", path, "--db", self.db,
                        "--kek-file", str(self.secrets.kek), *extra], input=value, check=True, timeout=30,
                       **self._source)
