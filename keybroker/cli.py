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
    from . import envelope
    from .tsm import ReportRequest, TsmClient

    request = ReportRequest(inblob=args.nonce, privlevel=args.privlevel,
                            service_provider=args.service_provider, service_guid=args.service_guid,
                            service_manifest_version=args.service_manifest_version)
    report = TsmClient(args.tsm_root).get_report(request)
    print(envelope.dumps(report))
    return 0


def _add_evidence(sub: argparse._SubParsersAction) -> None:
    from .tsm import DEFAULT_ROOT

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

    from . import envelope
    from .verifier import Context, Evidence, TrustStore, verify

    data = args.file.read_bytes()
    if data[:1] == b"{":
        evidence = Evidence.from_report(envelope.loads(data))
        if args.provider and args.provider != evidence.provider:
            raise SystemExit(f"keybroker verify: the envelope is from {evidence.provider}, not {args.provider}")
    else:
        provider = args.provider or _guess_provider(data)
        if provider is None:
            raise SystemExit("keybroker verify: cannot tell the provider of a raw blob; give --provider")
        evidence = Evidence(provider, data)
    trust = TrustStore.default().with_dirs(args.trust_roots)
    if args.trust_cpak:
        trust = trust.with_cpak_file(args.trust_cpak)
    context = Context(trust=trust, at=args.at or dt.datetime.now(dt.timezone.utc), report_data=args.report_data,
                      certs=tuple(args.certs), collateral=args.collateral, kds_url=args.kds_url,
                      pcs_url=args.pcs_url, cache_dir=args.cache_dir)
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


def _guess_provider(data: bytes) -> str | None:
    if len(data) == 0x4A0:
        return "sev_guest"
    if data[:2] in (b"\x04\x00", b"\x05\x00") and data[4:8] == b"\x81\x00\x00\x00":
        return "tdx_guest"
    if data[:3] == b"\xd9\x01\x8f" or data[:3] == b"\xd9\x03\x8b":  # CBOR tags 399 and 907
        return "arm_cca_guest"
    return None


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

DEFAULT_DB = "sqlite:////var/lib/keybroker/kbs.db"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .policy import DEFAULT, Policy
    from .server.app import serve
    from .server.kbs import KeyServer
    from .server.store import Store
    from .server.tokens import TokenSigner
    from .verifier import TrustStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = Policy.loads(args.policy.read_text()) if args.policy else DEFAULT
    kbs = KeyServer(store=Store(args.db), trust=TrustStore.default().with_dirs(args.trust_roots),
                    policy=policy, tokens=TokenSigner(), certs=tuple(args.certs),
                    kds_url=args.kds_url or None, cache_dir=args.cache_dir, pcs_url=args.pcs_url)
    host, port = args.listen
    serve(kbs, host, port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the key server (KBS RCAR 0.4.0)",
                       description="Run the reference key server: /kbs/v0/auth, /attest and /resource.")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080); plain HTTP only on loopback")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--trust-roots", type=Path, action="append", default=[], metavar="DIR",
                   help="extra trust anchors: root certificates and CCA platform keys (repeatable)")
    p.add_argument("--certs", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of vendor certificates (VCEK/VLEK, ASK, ARK) to use when evidence lacks them")
    p.add_argument("--kds-url", default="https://kdsintf.amd.com",
                   help="AMD KDS for VCEKs and chains the evidence lacks (default AMD's; '' to never fetch)")
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/keybroker"),
                   help="cache for KDS certificates and PCS collateral (default /var/cache/keybroker)")
    p.add_argument("--pcs-url", help="Intel PCS or PCCS base URL for TDX collateral (TCB status); default: TDX "
                                     "TCB status is not evaluated")
    p.add_argument("--policy", type=Path, help="release policy (JSON); default: refuse debug guests")
    p.add_argument("--tls-cert", help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", help="TLS private key (PEM)")
    p.set_defaults(run=_serve)


# -- resource -----------------------------------------------------------------------------

def _resource(args: argparse.Namespace) -> int:
    from .description import ResourcePath
    from .server.store import Store

    store = Store(args.db)
    if args.action == "list":
        for path, size, lease in store.list_resources():
            print(f"{path}\t{size} bytes" + (f"\tlease {lease} s" if lease else ""))
        return 0
    if args.path is None:
        raise SystemExit(f"keybroker resource {args.action}: REPO/TYPE/TAG is required")
    path = str(ResourcePath.parse(args.path))
    if args.action == "put":
        value = args.file.read_bytes() if args.file else sys.stdin.buffer.read()
        if not 1 <= len(value) <= 32767:
            raise SystemExit(f"keybroker resource put: a resource is 1 to 32767 bytes, got {len(value)}")
        store.put_resource(path, value, args.lease)
    elif args.action == "get":
        resource = store.get_resource(path)
        if resource is None:
            raise SystemExit(f"keybroker resource get: no resource {path}")
        if args.file:
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(resource.value)
        else:
            sys.stdout.buffer.write(resource.value)
    elif not store.delete_resource(path):
        raise SystemExit(f"keybroker resource rm: no resource {path}")
    return 0


def _add_resource(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resource", help="manage the key server's resources",
                       description="Put, get, remove or list resources in the key server's database.")
    p.add_argument("action", choices=["put", "get", "rm", "list"])
    p.add_argument("path", nargs="?", metavar="REPO/TYPE/TAG")
    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
    p.add_argument("--file", type=Path, help="put: read the value from FILE (default stdin); get: write it to FILE")
    p.add_argument("--lease", type=int, help="put: seconds the released key stays valid in the keyring")
    p.set_defaults(run=_resource)


# -- install-handler ---------------------------------------------------------------------

def _install_handler(args: argparse.Namespace) -> int:
    from . import config, install

    config.load(args.config)  # refuse to install a handler whose configuration does not load
    target = install.install(args.config, args.conf_dir)
    print(f"installed {target}")
    return 0


def _add_install_handler(sub: argparse._SubParsersAction) -> None:
    from .install import CONF_DIR

    p = sub.add_parser("install-handler", help="install the request-key drop-in for keybroker: keys",
                       description="Write request-key.d/keybroker.conf so that the kernel's upcalls for "
                                   "keybroker: keys run this installation's handler with --config FILE.")
    p.add_argument("--config", type=Path, required=True, help="the client configuration the handler reads")
    p.add_argument("--conf-dir", type=Path, default=CONF_DIR, help=f"drop-in folder (default {CONF_DIR})")
    p.set_defaults(run=_install_handler)


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
    for add in (_add_evidence, _add_tsm_sim, _add_verify, _add_serve, _add_resource, _add_install_handler,
                _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `keybroker verify ... | head` ends quietly
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeybrokerError as exc:
        print(f"keybroker {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
