"""The README's demo command runs the whole path and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keybroker.guest.install import CONF_DIR, CONF_NAME


def test_demo(tmp_path, system_lock):
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    conf = CONF_DIR / CONF_NAME
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("# an operator's own drop-in, which the demo must put back\n")
    try:
        out = subprocess.run([sys.executable, "-m", "keybroker", "demo"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "the key in the keyring matches the stored resource" in out.stdout
        assert "Operation not supported" in out.stdout  # the logon key is not readable
        assert conf.read_text().startswith("# an operator's own drop-in")
        mounts = open("/proc/mounts").read()
        assert "keybroker-demo" not in mounts
    finally:
        conf.unlink(missing_ok=True)
