"""A key server (SQLite, several workers) killed with SIGKILL in a burst of releases: every release
a guest received is in the audit log, and the chain still verifies."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from support.kbs import attest, audit_records, keybroker

SECRET = b"\x03crash-proof key\xfc"


def test_sigkill_during_a_burst_loses_no_acknowledged_release(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs("--workers", "2", "--rate-limit", "0")
    server.put("default/disk/root", SECRET)
    guests = [attest(root, server.url) for _ in range(4)]
    completed: list[str] = []
    lock = threading.Lock()

    def release(i: int) -> None:
        try:
            response = guests[i % len(guests)].fetch(server.url, "default/disk/root", bearer=i % 2 == 0, timeout=10)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            return  # killed before it answered (or while it sent the answer's body): no promise was made
        if response.status_code != 200:
            return
        with lock:
            completed.append(response.headers["Keybroker-Audit"])
            if len(completed) == 80:
                server.crash()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(release, range(400)))
    assert server.proc.returncode == -9 and len(completed) >= 80
    recorded = {r["hash"]: r for r in audit_records(server.db)}
    missing = [h for h in completed if h not in recorded]
    assert not missing, f"{len(missing)} acknowledged releases have no audit record"
    assert all(recorded[h]["event"] == "release" and recorded[h]["decision"] == "allow" for h in completed)
    assert keybroker("audit", "verify", "--db", server.db).returncode == 0
