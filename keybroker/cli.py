"""The ``keybroker`` command: parse arguments, call the modules that do the work.

Each subcommand imports what it needs when it runs, so that one command's dependencies
(the FUSE binding, the server stack) cost nothing to the others.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description="Attested key release for confidential VMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_evidence, _add_tsm_sim):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeybrokerError as exc:
        print(f"keybroker {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
