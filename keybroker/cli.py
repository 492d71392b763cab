"""The ``keybroker`` command: parse arguments, call the modules that do the work.

Each subcommand imports what it needs when it runs, so that one command's dependencies
(the FUSE binding, the server stack) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import KeybrokerError

Command = Callable[[argparse.Namespace], int]


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hexadecimal: {text!r}") from None


# -- evidence ---------------------------------------------------------------------------

def _evidence(args: argparse.Namespace) -> int:
    from .wire import envelope
    from .guest.tsm import ReportRequest, TsmClient

    request = ReportRequest(inblob=args.nonce, privlevel=args.privlevel,
                            service_provider=args.service_provider, service_guid=args.service_guid,
                            service_manifest_version=args.service_manifest_version)
    report = TsmClient(args.tsm_root).get_report(request)
    print(envelope.dumps(report))
    return 0


def _add_evidence(sub: argparse._SubParsersAction) -> None:
    from .guest.tsm import DEFAULT_ROOT

    p = sub.add_parser("evidence", help="collect a configfs-tsm report and print its envelope",
                       description="Collect attestation evidence through configfs-tsm and print the "
                                   "Linux evidence envelope (JSON) on stdout.")
    p.add_argument("--tsm-root", type=Path, default=DEFAULT_ROOT,
                   help=f"the configfs-tsm report directory (default {DEFAULT_ROOT})")
    p.add_argument("--nonce", type=_hex, required=True,
                   help="the inblob, in hex: 64 bytes for SEV-SNP and TDX, 32 to 64 for CCA")
    p.add_argument("--privlevel", type=int, help="guest privilege level to report (SEV-SNP VMPL, 0-3)")
    p.add_argument("--service-provider", help="service attestation provider (svsm)")
    p.add_argument("--service-guid", help="the one service to attest (default: all)")
    p.add_argument("--service-manifest-version", type=int, help="manifest version of that service")
    p.set_defaults(run=_evidence)


# -- tsm-sim ----------------------------------------------------------------------------

DEFAULT_SIM_STATE = Path("/var/lib/keybroker/tsm-sim")


def _tsm_sim(args: argparse.Namespace) -> int:
    from .sim import fs, providers, roots

    try:
        faults = providers.Faults.parse(args.fault)
        provider = providers.make_provider(args.provider, roots.SimState(args.state), faults, svsm=args.svsm)
    except ValueError as exc:
        print(f"keybroker tsm-sim: {exc}", file=sys.stderr)
        return 2
    print(f"keybroker tsm-sim: {args.provider} at {args.mountpoint}/tsm/report "
          f"(trust anchors in {roots.SimState(args.state).trust_dir})", file=sys.stderr, flush=True)
    fs.serve(str(args.mountpoint), provider)
    return 0


def _add_tsm_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tsm-sim", help="emulate configfs-tsm with FUSE (testing and demos)",
                       description="Mount a FUSE emulator of the kernel's configfs-tsm report interface "
                                   "at MOUNTPOINT/tsm/report, with simulated SEV-SNP, TDX or CCA evidence "
                                   "signed under simulated vendor roots. Runs until SIGTERM or unmount.")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--provider", required=True, choices=["sev_guest", "tdx_guest", "arm_cca_guest"])
    p.add_argument("--svsm", action="store_true", help="SEV-SNP guest under an SVSM (service attestation)")
    p.add_argument("--state", type=Path, default=DEFAULT_SIM_STATE,
                   help=f"simulated roots and platform identity (default {DEFAULT_SIM_STATE})")
    p.add_argument("--fault", action="append", default=[], metavar="NAME",
                   help="inject a provider failure when a report is generated: eio, ebusy, etimedout, "
                        "enxio, empty-outblob, corrupt-signature, debug, slow=SECONDS (repeatable)")
    p.set_defaults(run=_tsm_sim)


# -- verify -------------------------------------------------------------------------------

def _rfc3339(text: str):  # type: ignore[no-untyped-def]
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone (e.g. 2025-06-01T00:00:00Z)")
    return when


def _verify(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from .wire import envelope
    from .verifier import Context, Evidence, Fetcher, TrustStore, guess_provider, verify

    data = args.file.read_bytes()
    if data[:1] == b"{":
        evidence = Evidence.from_report(envelope.loads(data))
        if args.provider and args.provider != evidence.provider:
            raise SystemExit(f"keybroker verify: the envelope is from {evidence.provider}, not {args.provider}")
    else:
        provider = args.provider or guess_provider(data)
        if provider is None:
            raise SystemExit("keybroker verify: cannot tell the provider of a raw blob; give --provider")
        evidence = Evidence(provider, data)
    trust = TrustStore.default().with_dirs(args.trust_roots)
    if args.trust_cpak:
        trust = trust.with_cpak_file(args.trust_cpak)
    context = Context(trust=trust, at=args.at or dt.datetime.now(dt.timezone.utc), report_data=args.report_data,
                      certs=tuple(args.certs), collateral=args.collateral, kds_url=args.kds_url,
                      pcs_url=args.pcs_url, fetcher=Fetcher(args.cache_dir))
    verdict = verify(evidence, context)
    if args.json:
        print(json.dumps({"provider": verdict.provider, "ok": verdict.ok,
                          "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in verdict.checks],
                          "claims": verdict.claims}, indent=2))
    else:
        for check in verdict.checks:
            status = {True: "PASS", False: "FAIL", None: "N/A "}[check.ok]
            print(f"{status}  {check.name:<24} {check.detail}")
        print(f"=> {'OK: every check passed' if verdict.ok else 'FAILED: ' + verdict.reason()}")
        if verdict.claims:
            print("claims:")
            for name, value in sorted(verdict.claims.items()):
                print(f"  {name} = {json.dumps(value)}")
    return 0 if verdict.ok else 1


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify evidence offline and print each check and the claims",
                       description="Verify an evidence envelope or a raw SEV-SNP report, TDX quote or CCA token. "
                                   "Exit status 0 only when every check that ran passed.")
    p.add_argument("file", type=Path, help="an envelope (JSON) or a raw report, quote or token")
    p.add_argument("--provider", choices=["sev_guest", "tdx_guest", "arm_cca_guest"],
                   help="the provider of a raw blob (guessed when unambiguous)")
    p.add_argument("--certs", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of PEM/DER certificates to use (VCEK/VLEK, ASK/ASVK, ARK; PCK chains)")
    p.add_argument("--collateral", type=Path, metavar="DIR",
                   help="TDX collateral folder: TCB info, QE identity, CRLs, TCB signing chain")
    p.add_argument("--trust-roots", type=Path, action="append", default=[], metavar="DIR",
                   help="extra trust anchors (root certificates, CCA platform keys)")
    p.add_argument("--trust-cpak", type=Path, metavar="FILE", help="a CCA platform key to trust (PEM or JWK)")
    p.add_argument("--at", type=_rfc3339, metavar="RFC3339", help="check certificate validity at this time")
    p.add_argument("--report-data", type=_hex, metavar="HEX", help="the REPORT_DATA to expect, byte for byte")
    p.add_argument("--kds-url", help="AMD KDS base URL to fetch missing VCEKs and chains from "
                                     "(e.g. https://kdsintf.amd.com); default: no fetching")
    p.add_argument("--pcs-url", help="Intel PCS/PCCS base URL to fetch TDX collateral from; default: no fetching")
    p.add_argument("--cache-dir", type=Path, help="cache for fetched certificates and collateral")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(run=_verify)


# -- serve --------------------------------------------------------------------------------

def _listen(text: str) -> tuple[str, int]:
    from .server.config import parse_listen

    try:
        return parse_listen(text)
    except KeybrokerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_SERVE_OPTIONS = ("listen", "db", "name", "trust_roots", "certs", "kds_url", "cache_dir", "pcs_url", "collateral",
                  "policy",
                  "tls_cert", "tls_key", "kek_file", "old_kek_file", "admin_token_file", "token_key_file")


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .server import config
    from .server.app import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {}
    for name in _SERVE_OPTIONS:
        value = getattr(args, name)
        flags[name] = tuple(value) if isinstance(value, list) else value
    run(config.load(args.config, flags))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .server.config import DEFAULT_CACHE, DEFAULT_DB, DEFAULT_KDS

    p = sub.add_parser("serve", help="run the key server (KBS RCAR 0.4.0, admin API, metrics)",
                       description="Run the key server: /kbs/v0/auth, /attest and /resource for guests; "
                                   "/admin/v1 for operators; /metrics, /healthz and /readyz. Every option "
                                   "can also be set in --config FILE (TOML, same names without dashes).")
    p.add_argument("--config", type=Path, metavar="FILE", help="server configuration (TOML); flags win over it")
    p.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080); plain HTTP only on loopback")
    p.add_argument("--db", help=f"database URL: sqlite:///PATH or postgresql://… (default {DEFAULT_DB})")
    p.add_argument("--name", help="this replica's name in the audit log (default HOSTNAME:PORT)")
    p.add_argument("--trust-roots", type=Path, action="append", metavar="DIR",
                   help="extra trust anchors: root certificates and CCA platform keys (repeatable)")
    p.add_argument("--certs", type=Path, action="append", metavar="DIR",
                   help="folder of vendor certificates (VCEK/VLEK, ASK, ARK) to use when evidence lacks them")
    p.add_argument("--kds-url", help=f"AMD KDS for VCEKs and chains the evidence lacks (default {DEFAULT_KDS}; "
                                     "'' to never fetch)")
    p.add_argument("--cache-dir", type=Path, help=f"cache for KDS certificates and PCS collateral (default "
                                                  f"{DEFAULT_CACHE})")
    p.add_argument("--pcs-url", help="Intel PCS or PCCS base URL for TDX collateral (TCB status); default: TDX "
                                     "TCB status is not evaluated")
    p.add_argument("--collateral", type=Path, metavar="DIR",
                   help="offline TDX collateral (TCB info, QE identity, CRLs, TCB signing chain); wins over --pcs-url")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="release policy (JSON) to make active at start when it differs from the active one; "
                        "default: keep the database's (the built-in one refuses debug guests)")
    p.add_argument("--tls-cert", type=Path, help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--kek-file", type=Path, metavar="FILE",
                   help="key-encryption key for resources at rest: 32 bytes (default: the systemd credential kek)")
    p.add_argument("--old-kek-file", type=Path, action="append", metavar="FILE",
                   help="a previous KEK, still accepted for reading during a rotation (repeatable)")
    p.add_argument("--admin-token-file", type=Path, metavar="FILE",
                   help="admin tokens, one per line (default: the systemd credential admin-token; "
                        "without either the admin API refuses every call)")
    p.add_argument("--token-key-file", type=Path, metavar="FILE",
                   help="EC P-256 private key (PEM) signing attestation tokens, shared by replicas (default: "
                        "the systemd credential token-key, else an ephemeral key)")
    p.set_defaults(run=_serve)


# -- resource, policy, audit, rotate-kek: the key server's data ---------------------------

def _add_store_options(p: argparse.ArgumentParser, *, remote: bool) -> None:
    from .server.config import DEFAULT_DB

    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--kek-file", type=Path, metavar="FILE",
                   help="key-encryption key (for values: put, get; default: the systemd credential kek)")
    p.add_argument("--old-kek-file", type=Path, action="append", default=[], metavar="FILE",
                   help="a previous KEK (repeatable)")
    if remote:
        p.add_argument("--server", metavar="URL", help="manage a running key server through its admin API "
                                                       "instead of the database")
        p.add_argument("--admin-token-file", type=Path, metavar="FILE", help="with --server: the admin token")
        p.add_argument("--ca", type=Path, metavar="FILE", help="with --server: CA bundle for its TLS certificate")


def _administrator(args: argparse.Namespace, *, values: bool = False):  # type: ignore[no-untyped-def]
    """The admin API client with --server, else local administration of --db (KEK only for values)."""
    if getattr(args, "server", None):
        from .server.admin_client import AdminClient

        if not args.admin_token_file:
            raise SystemExit(f"keybroker {args.command}: --server needs --admin-token-file")
        return AdminClient(args.server, args.admin_token_file, ca=args.ca)
    import getpass
    import socket

    from .server.admin import Admin
    from .server.sealing import load_sealer
    from .server.store import Store

    sealer = load_sealer(args.kek_file, args.old_kek_file) if values else None
    return Admin(Store(args.db), sealer, f"local:{getpass.getuser()}", f"cli@{socket.gethostname()}")


def _resource(args: argparse.Namespace) -> int:
    if args.action == "list":
        for info in _administrator(args).list_resources():
            print(f"{info.path}\t{info.size} bytes" + (f"\tlease {info.lease} s" if info.lease else ""))
    elif args.action == "put":
        value = args.file.read_bytes() if args.file else sys.stdin.buffer.read()
        _administrator(args, values=True).put_resource(args.path, value, args.lease)
    elif args.action == "get":
        if args.server:
            raise SystemExit("keybroker resource get: values are read only locally (--db with --kek-file); "
                             "the admin API never returns them")
        value = _administrator(args, values=True).read_resource(args.path)
        if value is None:
            raise SystemExit(f"keybroker resource get: no resource {args.path}")
        if args.file:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
        else:
            sys.stdout.buffer.write(value)
    elif not _administrator(args).delete_resource(args.path):
        raise SystemExit(f"keybroker resource rm: no resource {args.path}")
    return 0


def _add_resource(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resource", help="manage the key server's resources",
                       description="Put, get, remove or list resources: in the database (--db; values sealed "
                                   "under --kek-file) or through a running server's admin API (--server).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser("put", help="store the value of a resource (from --file, or stdin)")
    put.add_argument("--file", type=Path, help="read the value from FILE (default stdin)")
    put.add_argument("--lease", type=int, help="seconds the released key stays valid in the keyring")
    get = actions.add_parser("get", help="print a resource's value (locally only, with the KEK)")
    get.add_argument("--file", type=Path, help="write the value to FILE (mode 0600) instead of stdout")
    actions.add_parser("rm", help="remove a resource")
    actions.add_parser("list", help="list the resources: path, size, lease")
    for action in ("put", "get", "rm"):
        actions.choices[action].add_argument("path", metavar="REPO/TYPE/TAG")
    for action in ("put", "get", "rm", "list"):
        _add_store_options(actions.choices[action], remote=True)
    p.set_defaults(run=_resource)


def _policy(args: argparse.Namespace) -> int:
    import datetime as dt

    if args.action == "check":
        return _policy_check(args)
    admin = _administrator(args)
    if args.action == "put":
        version, changed = admin.put_policy(args.file.read_bytes())
        print(f"policy version {version} is active" + ("" if changed else " (unchanged)"))
    elif args.action == "rm":
        version, changed = admin.reset_policy()
        print(f"policy version {version} (the built-in default) is active" + ("" if changed else " (unchanged)"))
    elif args.action == "get":
        stored = admin.get_policy(args.version)
        if stored is None:
            raise SystemExit(f"keybroker policy get: there is no policy version {args.version}")
        print(stored.policy.dumps())
    else:
        for info in admin.list_policies():
            when = dt.datetime.fromtimestamp(info.created, dt.timezone.utc).isoformat(timespec="seconds")
            print(f"{info.version}\t{info.digest[:16]}\t{when if info.version else '-'}\t{info.actor}")
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from .wire import envelope
    from .server.policy import Policy
    from .verifier import Context, Evidence, TrustStore, verify

    policy = Policy.loads(args.policy.read_bytes())
    evidence = Evidence.from_report(envelope.loads(args.evidence.read_bytes()))
    context = Context(trust=TrustStore.default().with_dirs(args.trust_roots),
                      at=args.at or dt.datetime.now(dt.timezone.utc), certs=tuple(args.certs),
                      collateral=args.collateral)
    verdict = verify(evidence, context)
    print("evidence (the binding to a session's nonce is the server's to check):")
    for check in verdict.checks:
        print(f"  {({True: 'PASS', False: 'FAIL', None: 'N/A '})[check.ok]} {check.name:<24} {check.detail}")
    if not verdict.ok:
        print(f"=> DENY: the evidence does not verify ({verdict.reason()}); the policy is not consulted")
        return 1
    print(f"claims: {json.dumps(verdict.claims, sort_keys=True)}" if args.claims else
          f"claims: {len(verdict.claims)} (show them with --claims)")
    print(f"policy (sha256 {policy.digest[:16]}) for {args.resource}:")
    for line in policy.explain(args.resource, verdict.claims):
        print(line)
    return 0 if policy.decide(args.resource, verdict.claims).allowed else 1


def _add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="check a release policy offline; set, show, list or remove the active one",
                       description="Release policies (JSON, see keybroker/policy.py). `check` evaluates one "
                                   "against evidence offline and explains every condition; the others manage "
                                   "the versions in the database (--db) or on a server (--server).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="verify EVIDENCE and explain POLICY's decision for a resource")
    check.add_argument("policy", type=Path, metavar="POLICY")
    check.add_argument("evidence", type=Path, metavar="EVIDENCE", help="an evidence envelope (keybroker evidence)")
    check.add_argument("--resource", required=True, metavar="REPO/TYPE/TAG", help="the resource asked for")
    check.add_argument("--trust-roots", type=Path, action="append", default=[], metavar="DIR",
                       help="extra trust anchors (root certificates, CCA platform keys)")
    check.add_argument("--certs", type=Path, action="append", default=[], metavar="DIR",
                       help="folder of PEM/DER certificates to use (VCEK/VLEK, ASK/ASVK, ARK; PCK chains)")
    check.add_argument("--collateral", type=Path, metavar="DIR", help="TDX collateral folder")
    check.add_argument("--at", type=_rfc3339, metavar="RFC3339", help="check certificate validity at this time")
    check.add_argument("--claims", action="store_true", help="print the appraised claims")
    put = actions.add_parser("put", help="make the policy in FILE the active version")
    put.add_argument("file", type=Path, metavar="FILE")
    get = actions.add_parser("get", help="print the active policy (or --version N)")
    get.add_argument("--version", type=int, metavar="N")
    actions.add_parser("list", help="list the policy versions: version, digest, time, who set it")
    actions.add_parser("rm", help="go back to the built-in default policy (as a new version)")
    for action in ("put", "get", "list", "rm"):
        _add_store_options(actions.choices[action], remote=True)
    p.set_defaults(run=_policy)


def _audit(args: argparse.Namespace) -> int:
    import json

    from .server import audit
    from .server.store import Store

    store = Store(args.db)
    if args.action == "verify":
        result = audit.verify(store.engine)
        for problem in result.problems:
            print(f"BROKEN: {problem}")
        print(f"{'audit log intact' if result.ok else 'audit log BROKEN'}: {result.records} records; head "
              f"{result.head_seq} {result.head_hash} (keep this elsewhere to detect a rewrite later)")
        return 0 if result.ok else 1
    for record in audit.records(store.engine, after=args.after, limit=args.limit):
        if args.json:
            print(json.dumps(record.to_json(), sort_keys=True))
            continue
        e = record.event
        fields = [f"{record.seq}", record.time, e.server, e.event, e.decision]
        fields += [f"{name}={value}" for name, value in (("peer", e.peer), ("actor", e.actor), ("session", e.session),
                   ("provider", e.provider), ("measurement", e.measurement[:16]), ("resource", e.resource),
                   ("policy", e.policy_version)) if value not in ("", None)]
        print(" ".join(fields) + f" reason={json.dumps(e.reason)}")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from .server.config import DEFAULT_DB

    p = sub.add_parser("audit", help="list or verify the key server's audit log",
                       description="The audit log: one record per attestation, release, refusal and admin action, "
                                   "each chained to the previous one by hash. `verify` exits 1 when a record was "
                                   "edited or removed.")
    p.add_argument("action", choices=["list", "verify"])
    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="list: records after SEQ")
    p.add_argument("--limit", type=int, metavar="N", help="list: at most N records")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.set_defaults(run=_audit)


def _rotate_kek(args: argparse.Namespace) -> int:
    record = _administrator(args, values=True).rotate_kek()
    print(record.event.reason)
    return 0


def _add_rotate_kek(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotate-kek", help="re-wrap every resource under a new key-encryption key",
                       description="Re-seal every resource that is not under --kek-file (the new KEK) with it, "
                                   "opening them with the --old-kek-file KEKs, in one transaction. Servers keep "
                                   "serving when they were given both (--kek-file NEW --old-kek-file OLD).")
    _add_store_options(p, remote=False)
    p.set_defaults(run=_rotate_kek)


# -- install-handler ---------------------------------------------------------------------

def _install_handler(args: argparse.Namespace) -> int:
    from .guest import config, install

    config.load(args.config)  # refuse to install a handler whose configuration does not load
    target = install.install(args.config, args.conf_dir)
    print(f"installed {target}")
    return 0


def _add_install_handler(sub: argparse._SubParsersAction) -> None:
    from .guest.install import CONF_DIR

    p = sub.add_parser("install-handler", help="install the request-key drop-in for keybroker: keys",
                       description="Write request-key.d/keybroker.conf so that the kernel's upcalls for "
                                   "keybroker: keys run this installation's handler with --config FILE.")
    p.add_argument("--config", type=Path, required=True, help="the client configuration the handler reads")
    p.add_argument("--conf-dir", type=Path, default=CONF_DIR, help=f"drop-in folder (default {CONF_DIR})")
    p.set_defaults(run=_install_handler)


# -- disk unlock ---------------------------------------------------------------------------

def _keyfile_server(args: argparse.Namespace) -> int:
    from .guest import config
    from .guest.unlock import keyfile
    from .guest.unlock.progress import Reporter

    return keyfile.run(config.load(args.config), args.socket, Reporter())


def _askpass_agent(args: argparse.Namespace) -> int:
    from .guest import config
    from .guest.unlock import askpass
    from .guest.unlock.progress import Reporter

    return askpass.run(config.load(args.config), args.ask_dir, args.linger, Reporter())


def _place_key(args: argparse.Namespace) -> int:
    from .guest import config
    from .guest.unlock import place
    from .guest.unlock.progress import Reporter

    place.place(config.load(args.config), args.volume, Reporter())
    return 0


def _add_unlock(sub: argparse._SubParsersAction) -> None:
    from .guest.config import DEFAULT_PATH
    from .guest.unlock.askpass import DEFAULT_ASK_DIR
    from .guest.unlock.keyfile import DEFAULT_SOCKET

    p = sub.add_parser("keyfile-server", help="serve crypttab key files on an AF_UNIX socket (disk unlock)",
                       description="Serve the keys of [volumes.<name>] to systemd-cryptsetup, which connects to a "
                                   "crypttab key file that is a socket. Socket-activated by "
                                   "keybroker-keyfile.socket, or listening on --socket.")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"client configuration (default {DEFAULT_PATH})")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help=f"socket path when not socket-activated (default {DEFAULT_SOCKET})")
    p.set_defaults(run=_keyfile_server)

    p = sub.add_parser("askpass-agent", help="answer systemd disk passphrase prompts (disk unlock)",
                       description="A systemd password agent: answer Id=cryptsetup:<device> prompts for the devices "
                                   "of [volumes.<name>] with the released key; exit when the directory stays empty.")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"client configuration (default {DEFAULT_PATH})")
    p.add_argument("--ask-dir", type=Path, default=DEFAULT_ASK_DIR,
                   help=f"the ask-password directory (default {DEFAULT_ASK_DIR})")
    p.add_argument("--linger", type=float, default=10.0, metavar="SECONDS",
                   help="exit once the directory has been empty this long (default 10)")
    p.set_defaults(run=_askpass_agent)

    p = sub.add_parser("place-key", help="put a volume's key in root's user keyring (disk unlock)",
                       description="Request the key of [volumes.VOLUME] into the user keyring (like keyctl request2 "
                                   "KEY_TYPE keybroker:RESOURCE '' @u), retrying until the volume's deadline; for "
                                   "dm-crypt keyring keys and LUKS2 keyring tokens.")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"client configuration (default {DEFAULT_PATH})")
    p.add_argument("volume", help="the crypttab volume name")
    p.set_defaults(run=_place_key)


# -- demo ------------------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    from . import demo
    return demo.run()


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole path on this machine (emulator, server, kernel upcall)",
                       description="Start the configfs-tsm emulator and a key server, install the handler, "
                                   "request a key through the kernel, show it, and clean up. Needs root.")
    p.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description="Attested key release for confidential VMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_evidence, _add_tsm_sim, _add_verify, _add_serve, _add_resource, _add_policy, _add_audit,
                _add_rotate_kek, _add_install_handler, _add_unlock, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # inside the try: a reader that went away is a BrokenPipeError here
        return status
    except KeybrokerError as exc:
        print(f"keybroker {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Only standard output can get here (`keybroker audit list | head`): end quietly. SIGPIPE
        # keeps Python's disposition (ignored) so that a server whose client hangs up gets EPIPE on
        # that connection instead of dying.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
