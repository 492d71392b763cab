"""``keybroker demo``: the whole path on one machine, then clean up.

Starts the configfs-tsm emulator (simulated SEV-SNP) and a key server on loopback, puts a
random resource, installs the request-key drop-in, asks the kernel for the key with
``keyctl request2`` in a fresh session keyring, and shows the key's serial, description
and a digest that matches the stored resource. Everything it started or installed is
removed at the end, also on failure, but for the emulator's simulated vendor roots (their
private keys too) in /var/lib/keybroker/demo-sim, root's alone (0700): kept so that the next
run does not generate RSA-4096 roots again, trusted by no server but the demo's; remove the
folder to drop them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from ..guest import install
from ..server.admin import Admin
from ..server.sealing import load_sealer
from ..server.store import Store

SIM_STATE = Path("/var/lib/keybroker/demo-sim")
RESOURCE = "default/disk/root"


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _wait(what: str, ready: Callable[[], object], proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"keybroker demo: {what} did not start")
        time.sleep(0.05)


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
        return True
    except OSError:
        return False


def _stopped(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP (`kill`, a terminal or SSH session gone): clean up as on failure, which a
    second one does not cut short."""
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _forget_token(config: Path) -> None:
    """The token the demo's key server issued, with its tee key, kept in root's user keyring for minutes
    after that server is gone, and that server's attestation lock; the operator's tokens stay."""
    from ..errors import KeyringError
    from ..guest import config as client_config
    from ..guest import keyring, tokens

    cache = tokens.TokenCache(client_config.load(config), None)  # as the handler names it: no privlevel asked
    cache.drop()
    with contextlib.suppress(KeyringError):  # the keyring too, when the demo's token was all it held
        ring = keyring.search(keyring.USER_KEYRING, "keyring", tokens.KEYRING)
        if not keyring.read(ring):
            keyring.unlink(ring, keyring.USER_KEYRING)
    cache.lock_path.unlink(missing_ok=True)


def run() -> int:
    if os.geteuid() != 0:
        raise SystemExit("keybroker demo: run as root (it installs a request-key handler)")
    if not shutil.which("keyctl") or not os.path.exists("/sbin/request-key"):
        raise SystemExit("keybroker demo: install keyutils first (apt-get install keyutils)")
    # By default these end the interpreter without unwinding: the demo's drop-in stayed in place of the
    # operator's, and the emulator, its mount, the key server and the work folder stayed too.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _stopped)
    # Under umask 0 the emulator's state folder's parent (/var/lib/keybroker) was made, and left, 0777.
    os.umask(os.umask(0o022) | 0o022)
    with ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="keybroker-demo-"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)

        def start(args: list[str], log: str) -> subprocess.Popen:
            out = open(work / log, "w")
            proc = subprocess.Popen([sys.executable, "-m", "keybroker", *args], stdout=out, stderr=subprocess.STDOUT)
            out.close()

            def stop() -> None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            cleanup.callback(stop)
            return proc

        mount = work / "configfs"
        _step(f"starting the configfs-tsm emulator (sev_guest) at {mount}/tsm/report")
        sim = start(["tsm-sim", str(mount), "--provider", "sev_guest", "--state", str(SIM_STATE)], "tsm-sim.log")
        _wait("the emulator", (mount / "tsm" / "report").is_dir, sim)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        db = f"sqlite:///{work / 'kbs.db'}"
        kek = work / "kek"
        os.close(os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        kek.write_bytes(os.urandom(32))
        _step(f"starting the key server at {url} (trusting the emulator's simulated roots only, so AMD's KDS "
              f"is not asked; resources sealed under the KEK in {kek})")
        server = start(["serve", "--listen", f"127.0.0.1:{port}", "--db", db, "--kek-file", str(kek),
                        "--trust-roots", str(SIM_STATE / "trust"), "--kds-url", ""], "server.log")
        _wait("the key server", lambda: _healthy(url), server)

        secret = secrets.token_bytes(32)
        sealer = load_sealer(kek)
        admin = Admin(Store(db, sealer), sealer, "local:demo", "demo")
        admin.put_resource(RESOURCE, secret)
        digest = hashlib.sha256(secret).hexdigest()
        del secret
        _step(f"stored a random 32-byte resource {RESOURCE} (sha256 {digest})")

        config = work / "client.toml"
        config.write_text(f'[server]\nurl = "{url}"\n[tsm]\nroot = "{mount}/tsm/report"\n[handler]\ndeadline = 10\n')
        conf = install.CONF_DIR / install.CONF_NAME
        saved = conf.read_bytes() if conf.exists() else None
        cleanup.callback(lambda: conf.write_bytes(saved) if saved is not None else conf.unlink(missing_ok=True))
        cleanup.callback(_forget_token, config)
        install.install(config)
        _step(f"installed {conf}:")
        print(conf.read_text(), end="", flush=True)

        def keybroker(*args: str) -> str:
            shown = " ".join(Path(a).name if a.startswith(str(work)) or a.startswith(str(SIM_STATE)) else a
                             for a in args)
            _step(f"keybroker {shown}")
            return subprocess.run([sys.executable, "-m", "keybroker", *args], capture_output=True, text=True,
                                  check=True, timeout=60).stdout

        refused = subprocess.run(["keyctl", "session", "-", "keyctl", "request2", "user", f"keybroker:{RESOURCE}", "",
                                  "@s"], capture_output=True, text=True, timeout=60)
        _step("a fresh key server releases nothing until its operator sets a release policy: "
              f"{refused.stderr.strip().splitlines()[-1]}")
        evidence = work / "evidence.json"
        evidence.write_text(keybroker("evidence", "--tsm-root", str(mount / "tsm" / "report"),
                                      "--nonce", secrets.token_hex(64)))
        policy = keybroker("policy", "from-evidence", str(evidence), "--resources", "default/*",
                           "--trust-roots", str(SIM_STATE / "trust"))
        print(policy, end="", flush=True)
        version, _ = admin.put_policy(policy)
        _step(f"made it the active release policy (version {version}): this guest's image may obtain default/*")

        _step(f'keyctl request2 user keybroker:{RESOURCE} "" @s   (in a fresh session keyring)')
        script = (f'id=$(keyctl request2 user keybroker:{RESOURCE} "" @s) || exit 1; '
                  'echo "serial:      $id"; echo "description: $(keyctl rdescribe $id)"; '
                  'echo "sha256:      $(keyctl pipe $id | sha256sum | cut -d" " -f1)"; '
                  f'id2=$(keyctl request2 logon keybroker:{RESOURCE} "" @s) || exit 1; '
                  'echo "logon key:   $id2 ($(keyctl rdescribe $id2)); keyctl read refuses it:"; '
                  'keyctl read $id2 2>&1 | sed "s/^/             /"; '
                  f'echo "unknown:     $(keyctl request2 user keybroker:default/disk/absent "" @s 2>&1)"')
        result = subprocess.run(["keyctl", "session", "-", "sh", "-c", script], capture_output=True, text=True,
                                timeout=60)
        print(result.stdout, end="")
        matches = f"sha256:      {digest}" in result.stdout
        if result.returncode != 0 or not matches:
            print(result.stderr, end="")
            print(f"--- key server log ---\n{(work / 'server.log').read_text()}")
            _step("FAILED: the key from the keyring does not match the stored resource")
            return 1
        _step("the key in the keyring matches the stored resource; cleaning up")
    return 0
