"""The configfs-tsm emulator for tests: ``keybroker tsm-sim`` as a real FUSE mount in a subprocess."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _needs_root_and_fuse() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


def _unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


#: The running emulators' processes, by the report root they serve.
_RUNNING: dict[Path, subprocess.Popen] = {}


def guest_driver(root: Path, loaded: bool, *, wait: bool = True) -> None:
    """Load (SIGUSR2) or unload (SIGUSR1) the guest driver of the emulator serving ``root``; with
    ``wait``, return once mkdir there shows it (a probe entry, removed at once)."""
    _RUNNING[root].send_signal(signal.SIGUSR2 if loaded else signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while wait:
        try:
            os.mkdir(root / "driver-probe")
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            wait = loaded
        else:
            os.rmdir(root / "driver-probe")
            wait = not loaded
        assert time.monotonic() < deadline, f"the emulated driver was not {'loaded' if loaded else 'unloaded'}"
        time.sleep(0.02)


@contextmanager
def run_tsm_sim(mountpoint: Path, state: Path, provider: str, *faults: str, svsm: bool = False,
                init_data: Path | None = None) -> Iterator[Path]:
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
    if init_data:
        cmd += ["--init-data", str(init_data)]
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
        _RUNNING[root] = proc
        yield root
    finally:
        _RUNNING.pop(root, None)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _unmount(mountpoint)
        log.close()


@contextmanager
def run_aeb_sim(socket_path: Path, state: Path, *faults: str, launch_digest: bytes | None = None,
                guest_handle: int = 1) -> Iterator[bytes]:
    """Run ``keybroker aeb-sim`` on a Unix socket; yield the guest's launch digest; stop it whatever happens."""
    cmd = [sys.executable, "-m", "keybroker", "aeb-sim", "--listen", f"unix:{socket_path}", "--state", str(state),
           "--guest-handle", str(guest_handle), *(["--launch-digest", launch_digest.hex()] if launch_digest else []),
           *(arg for fault in faults for arg in ("--fault", fault))]
    log = open(socket_path.parent / f"{socket_path.name}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60  # first use generates the simulated AMD chain
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"aeb-sim did not start: {log.read()}")
            time.sleep(0.05)
        log.seek(0)
        yield launch_digest or bytes.fromhex((state / "sev" / "launch-digest").read_text().strip())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        socket_path.unlink(missing_ok=True)
        log.close()
