"""Load generator for keybroker's key server: complete, verified releases, measured.

Each release is what a guest does: POST /auth, a fresh P-256 tee key, a fresh SEV-SNP report
(signed under the emulator's simulated roots) binding the nonce and that key, POST /attest,
GET the resource, decrypt the JWE and compare with the stored value. The server is
``keybroker serve`` in its own processes; its CPU time is read from /proc, so the load
generator's own work (signing reports, decrypting) is not counted against it.

    python bench/server.py                      # releases/s, p50/p99, server CPU per release vs the crypto floor
    python bench/server.py --db postgresql      # the same on a PostgreSQL of its own
    python bench/server.py --drift              # throughput per window over 20,000 releases
    python bench/server.py --storm              # 10,000 guests x 2 keys against 2 replicas on PostgreSQL
    python bench/server.py --hostile            # hostile clients while legitimate releases continue
    python bench/server.py --against REV        # the same load on REV's server and this tree's, in turn

Run it as root on an idle machine (PostgreSQL is started as the postgres user). It prints
figures and ratios; it asserts nothing about speed. This host's speed moves within minutes (the
crypto floor by 2x within a run, 4x between days): figures from different runs compare through
their floors, or, better, through ``--against``, which runs both servers under the same load in
the same minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.sim.providers import snp_cert_table, snp_report
from keybroker.sim.roots import SimState, SnpIdentity
from keybroker.wire import envelope, jwe
from keybroker.wire import rcar as p
from support.postgres import fresh_database, running_postgres
from support.servers import KeyServerProcess, ServerSecrets, free_port

RESOURCES = {"bench/disk/root": os.urandom(32), "bench/disk/data": os.urandom(32)}


# -- one guest -----------------------------------------------------------------------------

class Guest:
    """A simulated SEV-SNP guest talking RCAR over one keep-alive connection per server."""

    def __init__(self, ident: SnpIdentity, ports: list[int]) -> None:
        self.ident = ident
        self.table = snp_cert_table(ident)
        self.connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for port in ports]

    def _call(self, server: int, method: str, path: str, body: dict | None, cookie: str | None
              ) -> tuple[int, str | None, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if cookie:
            headers["Cookie"] = f"{p.SESSION_COOKIE}={cookie}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
            conn = self.connections[server]
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                if attempt:
                    raise
        set_cookie = response.getheader("set-cookie") or ""
        session = set_cookie.split(";", 1)[0].partition("=")[2] if set_cookie.startswith(p.SESSION_COOKIE) else None
        return response.status, session, payload

    def release(self, paths: list[str], server: int = 0) -> None:
        """One attestation and the release of ``paths``; raises unless every value decrypts as stored."""
        status, cookie, body = self._call(server, "POST", f"{p.PREFIX}/auth", p.AuthRequest("snp").to_json(), None)
        if status != 200 or cookie is None:
            raise RuntimeError(f"/auth: {status} {body[:200]!r}")
        nonce = json.loads(body)["nonce"]
        key = ec.generate_private_key(ec.SECP256R1())
        public = jwe.public_jwk(key.public_key()) | {"alg": jwe.ALGORITHM}
        binding = p.report_data(nonce, public)
        report = snp_report(self.ident, report_data=binding, vmpl=0)
        evidence = envelope.to_json(envelope.TsmReport("sev_guest", 1, binding, report, self.table, privlevel=0))
        status, _, body = self._call(server, "POST", f"{p.PREFIX}/attest",
                                     p.Attestation(nonce, public, evidence).to_json(), cookie)
        if status != 200:
            raise RuntimeError(f"/attest: {status} {body[:200]!r}")
        for path in paths:
            status, _, body = self._call(server, "GET", f"{p.PREFIX}/resource/{path}", None, cookie)
            if status != 200:
                raise RuntimeError(f"/resource/{path}: {status} {body[:200]!r}")
            if jwe.unwrap(json.loads(body), key) != RESOURCES[path]:
                raise RuntimeError(f"/resource/{path}: the value does not decrypt to what was stored")


def _client(ident_dir: str, ports: list[int], paths: list[str], counter, total: int, out) -> None:
    guest = Guest(SimState(ident_dir).snp(), ports)
    samples: list[tuple[float, float]] = []  # (finished at, latency)
    failures: list[str] = []
    server = os.getpid() % len(ports)
    while True:
        with counter.get_lock():
            if counter.value >= total:
                break
            counter.value += 1
        start = time.perf_counter()
        try:
            guest.release(paths, server)
            samples.append((time.time(), time.perf_counter() - start))
        except Exception as exc:  # a failed release is a result to report, not a reason to stop
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
        server = (server + 1) % len(ports)
    out.put((samples, failures))


# -- the server under test ---------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its children (live and reaped), in seconds."""
    total = 0.0
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
            total += sum(int(f) for f in fields[11:15 if one == pid else 13])
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for one in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@contextlib.contextmanager
def servers(work: Path, sim: SimState, db: str, count: int, workers: int | None,
            source: Path | None = None) -> Iterator[list[KeyServerProcess]]:
    secrets = ServerSecrets(work / "secrets")
    extra = ["--rate-limit", "0", "--kds-url", "", "--token-key-file", str(secrets.token_key)]
    if workers:
        extra += ["--workers", str(workers)]
    started = []
    try:
        for n in range(count):
            (work / f"kbs{n}").mkdir()
            server = KeyServerProcess(work / f"kbs{n}", sim.trust_dir, *extra, "--name", f"bench-{n}", db=db,
                                      secrets=secrets, source=source)
            started.append(server.start())
        for path, value in RESOURCES.items():
            started[0].put(path, value)
        yield started
    finally:
        for server in started:
            server.stop()


@dataclass
class Run:
    releases: int
    seconds: float
    cpu: float
    latencies: list[float]
    finished: list[float]
    failures: list[str]

    @property
    def rate(self) -> float:
        return self.releases / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load(sim_dir: Path, fleet: list[KeyServerProcess], total: int, clients: int, paths: list[str],
         on_tick=None) -> Run:
    counter = multiprocessing.Value("q", 0)
    out: multiprocessing.Queue = multiprocessing.Queue()
    ports = [s.port for s in fleet]
    pids = [s.proc.pid for s in fleet if s.proc]
    cpu0, t0 = sum(map(cpu_seconds, pids)), time.perf_counter()
    procs = [multiprocessing.Process(target=_client, args=(str(sim_dir), ports, paths, counter, total, out))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    results = []
    while len(results) < clients:
        with contextlib.suppress(Exception):
            results.append(out.get(timeout=0.5))
        if on_tick:
            on_tick(counter.value, sum(map(cpu_seconds, pids)))
    for proc in procs:
        proc.join()
    seconds, cpu = time.perf_counter() - t0, sum(map(cpu_seconds, pids)) - cpu0
    samples = [s for r in results for s in r[0]]
    return Run(len(samples), seconds, cpu, [lat for _, lat in samples], sorted(at for at, _ in samples),
               [f for r in results for f in r[1]])


# -- the crypto floor ----------------------------------------------------------------------

def crypto_floor(ident: SnpIdentity, rounds: int = 300, clock=time.perf_counter) -> float:
    """Seconds of the cryptography one release needs: a P-384 report signature check, an ES256
    token signature, an ECDH-ES key wrap (with its ephemeral key) and an AES-256-GCM seal; the
    median of ``rounds``, timed by ``clock``."""
    report = snp_report(ident, report_data=bytes(64), vmpl=0)
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    signature = encode_dss_signature(int.from_bytes(report[0x2A0:0x2E8], "little"),
                                     int.from_bytes(report[0x2E8:0x330], "little"))
    vcek = ident.vcek.public_key()
    token_key = ec.generate_private_key(ec.SECP256R1())
    guest = ec.generate_private_key(ec.SECP256R1()).public_key()

    def one() -> None:
        vcek.verify(signature, report[:0x2A0], ec.ECDSA(hashes.SHA384()))  # type: ignore[union-attr]
        token_key.sign(b"x" * 600, ec.ECDSA(hashes.SHA256()))
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        ephemeral.exchange(ec.ECDH(), guest)
        AESGCM(AESGCM.generate_key(256)).encrypt(os.urandom(12), b"k" * 32, b"header")

    times = []
    for _ in range(rounds):
        start = clock()
        one()
        times.append(clock() - start)
    return statistics.median(times)


def _floor_sampler(sim_dir: str, stop, out) -> None:
    """The crypto floor in CPU time, once a second while the load runs: this host's speed moves
    within minutes, and the server's CPU is counted over the same minutes, on the same busy cores."""
    ident = SimState(sim_dir).snp()
    while not stop.is_set():
        out.put((time.time(), crypto_floor(ident, rounds=15, clock=time.thread_time)))
        stop.wait(1.0)


@contextlib.contextmanager
def floor_alongside(sim_dir: Path) -> Iterator[list[tuple[float, float]]]:
    """Samples of the crypto floor, (when, seconds), taken while the block runs (in the list once it has ended)."""
    samples: list[tuple[float, float]] = []
    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    sampler = multiprocessing.Process(target=_floor_sampler, args=(str(sim_dir), stop, out))
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()
        while not out.empty():
            samples.append(out.get())


# -- the HTTP floor ------------------------------------------------------------------------

_EMPTY_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop", lifespan="off",
            access_log=False, log_level="error")
"""


def http_floor(requests: int = 3000) -> float:
    """CPU seconds uvicorn (with httptools and uvloop, as the server runs it) spends on one keep-alive request to an
    ASGI app that answers at once: what each of a release's three requests costs before any of
    keybroker's code (Starlette, the store, the verifier) runs."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _EMPTY_APP, str(port)])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.connect()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("uvicorn did not start")

        def post(count: int) -> None:
            for _ in range(count):
                conn.request("POST", "/kbs/v0/attest", body=b'{"tee": "snp"}',
                             headers={"Content-Type": "application/json"})
                conn.getresponse().read()

        post(200)
        before = cpu_seconds(server.pid)
        post(requests)
        return (cpu_seconds(server.pid) - before) / requests
    finally:
        server.terminate()
        server.wait()


# -- modes -------------------------------------------------------------------------------

def throughput(args, work: Path, sim: SimState, db: str, source: Path | None = None) -> tuple[float, float]:
    """Prints the run's figures; returns the server's CPU seconds per release and the crypto floor."""
    before, request = crypto_floor(sim.snp()), http_floor()
    with servers(work, sim, db, 1, args.workers, source) as fleet:
        load(sim.path, fleet, min(200, args.releases), args.clients, ["bench/disk/root"])  # warm up
        with floor_alongside(sim.path) as samples:
            run = load(sim.path, fleet, args.releases, args.clients, ["bench/disk/root"])
    after = crypto_floor(sim.snp())
    floors = [floor for _, floor in samples]
    floor = statistics.mean(floors) if floors else (before + after) / 2  # as the server's CPU: over the run
    per = run.cpu / max(run.releases, 1)
    print(f"{run.releases} releases by {args.clients} clients in {run.seconds:.1f} s: {run.rate:.0f} releases/s, "
          f"p50 {run.percentile(0.5) * 1e3:.1f} ms, p99 {run.percentile(0.99) * 1e3:.1f} ms, "
          f"{len(run.failures)} failures")
    print(f"server CPU per release {per * 1e3:.2f} ms; crypto floor {floor * 1e6:.0f} us in CPU time alongside the "
          f"run (mean of {len(floors)} samples, {min(floors, default=0) * 1e6:.0f}-"
          f"{max(floors, default=0) * 1e6:.0f}; idle, before the run {before * 1e6:.0f}, after {after * 1e6:.0f}); "
          f"ratio {per / floor:.1f}x the floor")
    print(f"HTTP floor: uvicorn alone spends {request * 1e6:.0f} us of CPU on a request to an empty app, "
          f"{3 * request * 1e3:.2f} ms on a release's three; both floors {(floor + 3 * request) * 1e3:.2f} ms, "
          f"the rest ({(per - floor - 3 * request) * 1e3:.2f} ms) is keybroker's own code")
    _failures(run)
    return per, floor


def against(args, work: Path, sim: SimState, new_db: Callable[[], str]) -> None:
    """The same load on the server of revision ``args.against`` and on this tree's, in turn, ``args.rounds``
    times, each on a database of its own: how much server CPU per release this tree saves, measured
    in the same minutes on the same host."""
    repo = Path(__file__).resolve().parent.parent
    source = work / "against"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", args.against, "keybroker"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    costs: dict[str, list[tuple[float, float]]] = {args.against: [], "this tree": []}
    for n in range(args.rounds):
        for side, (label, tree) in enumerate(((args.against, source), ("this tree", None))):
            print(f"## round {n + 1}, the server of {label}")
            (work / f"run-{n}-{side}").mkdir()
            costs[label].append(throughput(args, work / f"run-{n}-{side}", sim, new_db(), tree))
    ratios = [new[0] / old[0] for old, new in zip(costs[args.against], costs["this tree"], strict=True)]
    for label, runs in costs.items():
        print(f"{label}: server CPU per release {', '.join(f'{per * 1e3:.2f}' for per, _ in runs)} ms "
              f"({', '.join(f'{per / floor:.1f}' for per, floor in runs)}x the crypto floor)")
    print(f"this tree's server CPU per release over {args.against}'s, round by round: "
          f"{', '.join(f'{ratio:.2f}' for ratio in ratios)}; mean {statistics.mean(ratios):.2f} "
          f"({1 / statistics.mean(ratios):.2f}x less)")


def drift(args, work: Path, sim: SimState, db: str) -> None:
    """Throughput and server CPU per window of a tenth of the releases, each window's CPU also over the
    crypto floor sampled in it: a server that slows as its tables grow has a ratio that climbs, a host
    that slows down has not."""
    window = args.releases // 10
    ticks: list[tuple[int, float, float]] = []
    with servers(work, sim, db, 1, args.workers) as fleet, floor_alongside(sim.path) as samples:
        run = load(sim.path, fleet, args.releases, args.clients, ["bench/disk/root"],
                   on_tick=lambda done, cpu: ticks.append((done, time.time(), cpu)))
    rates, ratios = [], []
    for n in range(1, 11):
        lo = next(t for t in ticks if t[0] >= (n - 1) * window) if n > 1 else ticks[0]
        hi = next((t for t in ticks if t[0] >= n * window), ticks[-1])
        if hi[0] <= lo[0]:
            continue
        rate, per = (hi[0] - lo[0]) / (hi[1] - lo[1]), (hi[2] - lo[2]) / (hi[0] - lo[0])
        floors = [floor for at, floor in samples if lo[1] <= at <= hi[1]]
        floor = statistics.mean(floors) if floors else float("nan")
        rates.append(rate)
        ratios.append(per / floor)
        print(f"window {n:2d} (releases {lo[0]:6d}-{hi[0]:6d}): {rate:6.0f} releases/s, "
              f"server CPU {per * 1e3:.2f} ms/release, crypto floor {floor * 1e6:.0f} us, {per / floor:.1f}x")
    print(f"{run.releases} releases, {len(run.failures)} failures; last window / first window: "
          f"{rates[-1] / rates[0]:.2f} in releases/s, {ratios[-1] / ratios[0]:.2f} in CPU over the floor "
          "(above 1: the server costs more)")
    _failures(run)


def storm(args, work: Path, sim: SimState, db: str) -> None:
    with servers(work, sim, db, 2, args.workers) as fleet:
        run = load(sim.path, fleet, args.guests, args.clients, list(RESOURCES))
    print(f"boot storm: {args.guests} guests x {len(RESOURCES)} keys on 2 replicas ({args.clients} at a time): "
          f"{run.releases} guests served in {run.seconds:.1f} s ({run.rate:.0f} guests/s), "
          f"{len(run.failures)} failures, p50 {run.percentile(0.5) * 1e3:.0f} ms, "
          f"p99 {run.percentile(0.99) * 1e3:.0f} ms, max {max(run.latencies, default=0) * 1e3:.0f} ms")
    _failures(run)


def _failures(run: Run) -> None:
    for failure in sorted(set(run.failures))[:5]:
        print(f"  failure: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workers", type=int, default=None, help="server worker processes (default: the server's)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent guests")
    parser.add_argument("--releases", type=int, default=None)
    parser.add_argument("--guests", type=int, default=10_000, help="--storm: guests, each fetching 2 keys")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--drift", action="store_true", help="throughput per window over 20,000 releases")
    mode.add_argument("--storm", action="store_true", help="10,000 guests x 2 keys against 2 replicas (PostgreSQL)")
    mode.add_argument("--hostile", action="store_true", help="hostile clients during legitimate releases")
    mode.add_argument("--against", metavar="REV", help="the same load on the server of git revision REV and on "
                                                      "this tree's, in turn")
    parser.add_argument("--rounds", type=int, default=3, help="--against: runs of each server")
    args = parser.parse_args()
    args.releases = args.releases or (20_000 if args.drift else 2_000)
    if args.storm:
        args.db = "postgresql"
        args.clients = max(args.clients, 32)
    with tempfile.TemporaryDirectory(prefix="keybroker-bench-") as tmp:
        work = Path(tmp)
        sim = SimState(work / "sim")
        sim.snp()
        with contextlib.ExitStack() as stack:
            if args.db == "postgresql":
                postgres = stack.enter_context(running_postgres(400))
                databases = (stack.enter_context(fresh_database(postgres)) for _ in itertools.count())
            else:
                databases = (f"sqlite:///{work / f'kbs-{n}.db'}" for n in itertools.count())
            print(f"# keybroker key server, {args.db}, {os.cpu_count()} CPUs")
            if args.against:
                against(args, work, sim, lambda: next(databases))
                return
            db = next(databases)
            if args.hostile:
                from hostile import hostile  # bench/hostile.py

                hostile(args, work, sim, db)
            else:
                (drift if args.drift else storm if args.storm else throughput)(args, work, sim, db)


if __name__ == "__main__":
    main()
