"""A key request at the speed of a local secret? Measures, through the real kernel upcall:

- a cold key: no kept token (``keybroker forget-tokens`` first): evidence, /auth, /attest, the resource;
- a warm key: another resource under the token the previous request kept;
- N concurrent keys for N different resources, cold: one attestation shared by all;
- ``clevis decrypt`` of a Tang-bound secret on loopback, where clevis and tang are installed,

each a number of times in one run, with the handler alone and with ``keybroker agent``
running, printing medians and the ratios to Clevis.

    python bench/keys.py [--rounds 15] [--concurrent 8]

Run as root on an idle machine with FUSE (the configfs-tsm emulator) and a kernel keyring.
It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from keybroker.guest import install as installer
from keybroker.guest.agentsocket import SOCKET as AGENT_SOCKET
from keybroker.sim.roots import SimState
from support.emulator import run_tsm_sim
from support.keyctl import new_attestation_locks_removed
from support.servers import KeyServerProcess

CONF = Path("/etc/request-key.d/keybroker.conf")
KEYBROKER = [sys.executable, "-m", "keybroker"]


def timed(script: str) -> float:
    """Seconds ``script`` takes in a fresh session keyring (so every request upcalls)."""
    start = time.perf_counter()
    out = subprocess.run(["keyctl", "session", "-", "sh", "-ec", script], capture_output=True, timeout=120)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{script}: {out.stderr.decode()[-500:]}")
    return took


def forget() -> None:
    subprocess.run([*KEYBROKER, "forget-tokens"], check=True, capture_output=True)


def request(name: str) -> str:
    return f'keyctl request2 user keybroker:default/bench/{name} "" @s >/dev/null'


@contextlib.contextmanager
def tang() -> object:
    """A Tang server on loopback and a secret bound to it, or None where clevis/tang are missing."""
    tangd = shutil.which("tangd") or next((p for p in ("/usr/libexec/tangd", "/usr/lib/x86_64-linux-gnu/tangd")
                                           if os.path.exists(p)), None)
    if not (shutil.which("clevis") and tangd and shutil.which("socat")):
        yield None
        return
    with tempfile.TemporaryDirectory() as db:
        subprocess.run([next(p for p in ("/usr/libexec/tangd-keygen", "/usr/lib/x86_64-linux-gnu/tangd-keygen")
                             if os.path.exists(p)), db], check=True)
        port = 18000 + os.getpid() % 1000
        server = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                   f"EXEC:{tangd} {db}"], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            jwe = subprocess.run(["clevis", "encrypt", "tang", f'{{"url":"http://127.0.0.1:{port}"}}', "-y"],
                                 input=os.urandom(32), capture_output=True, check=True).stdout
            yield jwe
        finally:
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    saved = CONF.read_bytes() if CONF.exists() else None
    with new_attestation_locks_removed(), tempfile.TemporaryDirectory(prefix="keybroker-bench-") as tmp, \
            run_tsm_sim(Path(tmp) / "tsm", Path(tmp) / "sim", "sev_guest") as root, tang() as tang_jwe:
        work = Path(tmp)
        SimState(work / "sim").snp()
        (work / "kbs").mkdir()
        server = KeyServerProcess(work / "kbs", work / "sim" / "trust", "--rate-limit", "0").start()
        try:
            names = [f"k{i}" for i in range(max(args.concurrent, 2))]
            for name in names:
                server.put(f"default/bench/{name}", os.urandom(32))
            config = work / "client.toml"
            config.write_text(f'[server]\nurl = "{server.url}"\n[tsm]\nroot = "{root}"\n')
            installer.install(config, CONF.parent, Path(sys.executable).parent / "keybroker-handoff")
            results = {mode: measure(args, names, server, tang_jwe, mode) for mode in ("handler", "agent")}
        finally:
            server.stop()
            forget()
            if saved is None:
                CONF.unlink(missing_ok=True)
            else:
                CONF.write_bytes(saved)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:6.1f} ms"

    clevis = results["handler"]["clevis"] + results["agent"]["clevis"]
    base = statistics.median(clevis) if clevis else None
    print(f"# keybroker keys, {args.rounds} rounds, medians")
    for mode, label in (("handler", "handler alone"), ("agent", "with keybroker agent")):
        r = results[mode]
        rows = ((f"cold key (no token), {label}", r["cold"]), (f"warm key (kept token), {label}", r["warm"]),
                (f"{args.concurrent} concurrent keys, cold, {label}", r["many"]))
        for what, values in rows:
            ratio = f"  {statistics.median(values) / base:.2f}x clevis" if base else ""
            print(f"{what:50s} {ms(values)}{ratio}")
        print(f"{'':50s} {args.concurrent} concurrent / one cold: "
              f"{statistics.median(r['many']) / statistics.median(r['cold']):.2f}; attestations per burst: "
              f"{statistics.median(r['attests']):g}")
    if base:
        print(f"{'clevis decrypt (tang, loopback)':50s} {ms(clevis)}  1.00x clevis")
    else:
        print("clevis/tang not installed here: no Clevis comparison (apt install clevis tang socat)")


def measure(args, names: list[str], server: KeyServerProcess, tang_jwe, mode: str) -> dict[str, list[float]]:
    """Cold, warm and concurrent keys (and clevis) for ``args.rounds`` rounds, with or without the agent."""
    out: dict[str, list[float]] = {"cold": [], "warm": [], "many": [], "attests": [], "clevis": []}
    agent = None
    if mode == "agent":
        agent = subprocess.Popen([*KEYBROKER, "agent"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not Path(AGENT_SOCKET).exists():
            if agent.poll() is not None:  # it refused to start (run from a folder root must not import from?)
                raise SystemExit(f"keybroker agent ended: {agent.stderr.read().decode().strip()}")  # type: ignore[union-attr]
            time.sleep(0.05)
    try:
        for _ in range(args.rounds):
            forget()
            out["cold"].append(timed(request(names[0])))
            out["warm"].append(timed(request(names[1])))
            forget()
            before = server.requests_to("attest")
            out["many"].append(timed(" & ".join(request(n) for n in names[:args.concurrent]) + " & wait"))
            out["attests"].append(server.requests_to("attest") - before)
            if tang_jwe is not None:
                start = time.perf_counter()
                subprocess.run(["clevis", "decrypt"], input=tang_jwe, capture_output=True, check=True)
                out["clevis"].append(time.perf_counter() - start)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait()
            Path(AGENT_SOCKET).unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    main()
