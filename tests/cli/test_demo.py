"""The README's demo command runs the whole path and cleans up after itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from keybroker.errors import KeyringError
from keybroker.guest import keyring, tokens
from keybroker.guest.install import CONF_DIR, CONF_NAME
from support.keyctl import serials


def _kept_tokens() -> set[int] | None:
    """The keys in the keyring where the handler keeps attestation tokens (root's), by serial; None
    when there is no such keyring."""
    try:
        ring = keyring.search(keyring.USER_KEYRING, "keyring", tokens.KEYRING)
    except KeyringError:
        return None
    return set(serials(ring))


def test_demo(tmp_path, system_lock):
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    conf = CONF_DIR / CONF_NAME
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("# an operator's own drop-in, which the demo must put back\n")
    kept, locks = _kept_tokens(), set(tokens.LOCK_DIR.glob("attest-*.lock"))
    try:
        out = subprocess.run([sys.executable, "-m", "keybroker", "demo"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "the key in the keyring matches the stored resource" in out.stdout
        assert "Operation not supported" in out.stdout  # the logon key is not readable
        assert conf.read_text().startswith("# an operator's own drop-in")
        mounts = open("/proc/mounts").read()
        assert "keybroker-demo" not in mounts
        # Nor does it leave the token its server issued, and the token's tee key, in root's keyring
        # (they outlived the demo's server by minutes), or the attestation lock of that server.
        # (An empty tokens keyring, left by tokens that expired before the demo, may go with the demo's.)
        assert (_kept_tokens() or set()) == (kept or set())
        assert set(tokens.LOCK_DIR.glob("attest-*.lock")) == locks
    finally:
        conf.unlink(missing_ok=True)


# The demo with its programs replaced by `sleep` and its drop-in folder by a scratch one, stopped by a
# signal once the drop-in is installed, where it would ask the kernel for the key.
STOPPED_DEMO = """
import os, signal, subprocess, sys, time
from pathlib import Path
from keybroker.cli import demo
from keybroker.guest import install

conf_dir = Path(sys.argv[1])
install.CONF_DIR = conf_dir
installing = install.install
install.install = lambda config: installing(config, conf_dir)
demo.SIM_STATE = conf_dir.parent / "sim"
demo._wait = lambda *args, **kwargs: None
popen = subprocess.Popen

def started(args, **kwargs):
    proc = popen(["sleep", "600"], **kwargs)
    print(proc.pid, flush=True)
    return proc

def asked(args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[2]))
    time.sleep(30)

subprocess.Popen = started
subprocess.run = asked
demo.run()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stopped_by_a_signal_cleans_up(tmp_path, signum):
    """`kill` or a closed terminal ended the demo without unwinding: the operator's drop-in stayed
    replaced by the demo's, and the emulator, the key server and the work folder stayed behind."""
    if os.geteuid() != 0:
        pytest.skip("installing the drop-in checks that root owns what it runs")
    conf_dir = tmp_path / "request-key.d"
    conf_dir.mkdir()
    (conf_dir / CONF_NAME).write_text("# an operator's own drop-in, which the demo must put back\n")
    work = tmp_path / "tmp"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", STOPPED_DEMO, str(conf_dir), str(int(signum))],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(work)})
    children = [int(line) for line in out.stdout.splitlines() if line.isdigit()]
    try:
        assert len(children) == 2, out.stdout + out.stderr
        assert out.returncode == 128 + signum, out.stdout + out.stderr
        assert (conf_dir / CONF_NAME).read_text().startswith("# an operator's own drop-in")
        assert list(work.iterdir()) == []
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# The demo under umask 0, its drop-in folder and simulated roots in scratch ones, stopped by a signal
# where it first asks the kernel for a key: the emulator has made its state folder by then.
UMASK0_DEMO = """
import os, signal, subprocess, sys, time
from pathlib import Path
from keybroker.cli import demo
from keybroker.guest import install

conf_dir = Path(sys.argv[1])
install.CONF_DIR = conf_dir
installing = install.install
install.install = lambda config: installing(config, conf_dir)
demo.SIM_STATE = Path(sys.argv[2]) / "sim"

def asked(args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

subprocess.run = asked
os.umask(0)
demo.run()
"""


def test_demo_under_umask_0_leaves_no_folder_others_may_write(tmp_path):
    """Under root's umask 0 the emulator's state folder's parent (/var/lib/keybroker) was made 0777 and
    left behind: anyone could swap the simulated roots the next demo's key server trusts."""
    if os.geteuid() != 0:
        pytest.skip("installing the drop-in checks that root owns what it runs")
    conf_dir = tmp_path / "request-key.d"
    conf_dir.mkdir()
    state = tmp_path / "lib" / "keybroker"
    out = subprocess.run([sys.executable, "-c", UMASK0_DEMO, str(conf_dir), str(state)],
                         capture_output=True, text=True, timeout=120)
    assert (state / "sim").is_dir(), out.stdout + out.stderr
    assert os.stat(state).st_mode & 0o022 == 0, oct(os.stat(state).st_mode)
    # (and its key server, which refuses trust roots in such a folder, started)
    assert out.returncode == 128 + signal.SIGTERM, out.stdout + out.stderr
