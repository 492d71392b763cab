"""Tools: offline verification, the configfs-tsm emulator, the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EvidenceError
from ..verifier.core import PROVIDERS, TSM_PROVIDERS
from .args import add_evidence_options, hex_bytes, load_evidence, verification_context
from .show import check_lines, claim_lines, verdict_json

DEFAULT_SIM_STATE = Path("/var/lib/keybroker/tsm-sim")


def _tsm_sim(args: argparse.Namespace) -> int:
    from ..sim import fs, providers, roots
    from ..wire import initdata

    try:
        faults = providers.Faults.parse(args.fault)
        digest = initdata.parse(args.init_data.read_text()).digest if args.init_data else None
        provider = providers.make_provider(args.provider, roots.SimState(args.state), faults, svsm=args.svsm,
                                           launch_digest=digest)
    except (ValueError, EvidenceError) as exc:
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
    p.add_argument("--provider", required=True, choices=TSM_PROVIDERS)
    p.add_argument("--svsm", action="store_true", help="SEV-SNP guest under an SVSM (service attestation)")
    p.add_argument("--state", type=Path, default=DEFAULT_SIM_STATE,
                   help=f"simulated roots and platform identity (default {DEFAULT_SIM_STATE})")
    p.add_argument("--init-data", type=Path, metavar="FILE",
                   help="launch the guest with this init-data (TOML), as a Confidential Containers host does: "
                        "its digest in HOST_DATA, MRCONFIGID or the realm personalization value")
    p.add_argument("--fault", action="append", default=[], metavar="NAME",
                   help="inject a provider failure when a report is generated: eio, ebusy, etimedout, "
                        "enxio, empty-outblob, corrupt-signature, debug, slow=SECONDS (repeatable)")
    p.set_defaults(run=_tsm_sim)


def _verify(args: argparse.Namespace) -> int:
    from ..verifier import verify

    evidence = load_evidence(args.file, args.provider)
    verdict = verify(evidence, verification_context(args, args.report_data))
    if args.json:
        print(verdict_json(verdict))
        return 0 if verdict.ok else 1
    print("\n".join(check_lines(verdict)))
    print(f"=> {'OK: every check passed' if verdict.ok else 'FAILED: ' + verdict.reason()}")
    if verdict.claims:
        print("claims:")
        print("\n".join(claim_lines(verdict.claims)))
    return 0 if verdict.ok else 1


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify evidence offline and print each check and the claims",
                       description="Verify an evidence envelope, Trustee's evidence form (what guest-components "
                                   "sends), or a raw SEV-SNP report, TDX quote, CCA token or SEV AEB evidence. "
                                   "Exit status 0 only when every check that ran passed.")
    p.add_argument("file", type=Path, help="an envelope or Trustee evidence (JSON), or a raw report, quote or token")
    p.add_argument("--provider", choices=PROVIDERS,
                   help="the provider of a raw blob (guessed when unambiguous)")
    add_evidence_options(p)
    p.add_argument("--report-data", type=hex_bytes, metavar="HEX", help="the REPORT_DATA to expect, byte for byte")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(run=_verify)


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    return demo.run()


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole path on this machine (emulator, server, kernel upcall)",
                       description="Start the configfs-tsm emulator and a key server, install the handler, "
                                   "request a key through the kernel, show it, and clean up. Needs root.")
    p.set_defaults(run=_demo)


def add_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_verify, _add_tsm_sim, _add_demo):
        add(sub)
