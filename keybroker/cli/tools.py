"""Tools: offline verification, the configfs-tsm emulator, the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EvidenceError
from ..verifier.core import PROVIDERS, TSM_PROVIDERS
from .args import add_evidence_options, hex_bytes, load_evidence, read_init_data, verification_context
from .show import check_lines, claim_lines, verdict_json

DEFAULT_SIM_STATE = Path("/var/lib/keybroker/tsm-sim")


def _tsm_sim(args: argparse.Namespace) -> int:
    from ..sim import fs, providers, roots, sysfs

    try:
        faults = providers.Faults.parse(args.fault)
        digest = read_init_data(args.init_data).digest if args.init_data else None
        provider = providers.make_provider(args.provider, roots.SimState(args.state), faults, svsm=args.svsm,
                                           launch_digest=digest)
    except (ValueError, EvidenceError, OSError) as exc:
        print(f"keybroker tsm-sim: {exc}", file=sys.stderr)
        return 2
    extra = (f", measurement registers at {args.mountpoint}{sysfs.MEASUREMENTS}, CCEL at "
             f"{args.mountpoint}{sysfs.TABLES}" if args.provider == "tdx_guest" else "")
    print(f"keybroker tsm-sim: {args.provider} at {args.mountpoint}/tsm/report{extra} "
          f"(trust anchors in {roots.SimState(args.state).trust_dir})", file=sys.stderr, flush=True)
    fs.serve(str(args.mountpoint), provider, sysfs.operations(provider))
    return 0


def _add_tsm_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tsm-sim", help="emulate configfs-tsm with FUSE (testing and demos)",
                       description="Mount a FUSE emulator of the kernel's configfs-tsm report interface "
                                   "at MOUNTPOINT/tsm/report, with simulated SEV-SNP, TDX or CCA evidence "
                                   "signed under simulated vendor roots; for tdx_guest also the tsm-mr "
                                   "registers (MOUNTPOINT/sys/class/misc/tdx_guest/measurements) and the "
                                   "CCEL (MOUNTPOINT/sys/firmware/acpi/tables). Runs until SIGTERM or unmount.")
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


def _event_log(args: argparse.Namespace) -> bytes:
    """The --event-log files joined in order (the CCEL log, then runtime logs), checked against --ccel-table."""
    from ..files import read_bounded
    from ..wire import eventlog

    if args.ccel_table and not args.event_log:
        raise EvidenceError("--ccel-table describes an event log: give the log with --event-log")
    parts = [read_bounded(path, eventlog.LOG_MAX, "event log", EvidenceError) for path in args.event_log]
    if args.ccel_table:
        table = eventlog.parse_ccel_table(read_bounded(args.ccel_table, 4096, "CCEL table", EvidenceError))
        table.check_area(parts[0])
        print(f"CCEL table: {table.cc_name}, log area {table.laml} bytes at 0x{table.lasa:x}; "
              f"{args.event_log[0]} is {len(parts[0])} bytes")
    return eventlog.join_logs(*parts)


def _replay_only(log: bytes) -> int:
    from ..verifier.tdx import eventlog as replayed
    from ..wire.eventlog import parse_event_log

    result = replayed.replay(parse_event_log(log))
    print("\n".join(replayed.describe(result)))
    return 0


def _aeb_sim(args: argparse.Namespace) -> int:
    from ..sim import aeb, roots

    try:
        digest = bytes.fromhex(args.launch_digest) if args.launch_digest else None
        broker = aeb.make_broker(roots.SimState(args.state), args.guest_handle, digest, args.fault)
        listener = aeb.listen(args.listen)
    except (ValueError, OSError) as exc:
        print(f"keybroker aeb-sim: {exc}", file=sys.stderr)
        return 2
    print(f"keybroker aeb-sim: SEV-ES guest {args.guest_handle} (launch digest {broker.guest.launch_digest.hex()}) "
          f"on {args.listen} (trust anchors in {roots.SimState(args.state).trust_dir})", file=sys.stderr, flush=True)
    aeb.serve(listener, broker)
    return 0


def _add_aeb_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aeb-sim", help="emulate a host's SEV/SEV-ES Attestation Evidence Broker (testing and demos)",
                       description="Serve the AEB protocol (ttrpc) for one simulated SEV-ES guest on a "
                                   "simulated platform whose AMD chain is kept in --state. Runs until SIGTERM.")
    p.add_argument("--listen", default="vsock:5577", metavar="ADDRESS",
                   help="unix:/PATH or vsock:PORT (default vsock:5577)")
    p.add_argument("--guest-handle", type=int, default=1, help="the guest's firmware handle (default 1)")
    p.add_argument("--launch-digest", metavar="HEX", help="the guest's 32-byte launch digest (default: one kept "
                                                             "in the state folder)")
    p.add_argument("--state", type=Path, default=DEFAULT_SIM_STATE,
                   help=f"simulated roots and platform identity (default {DEFAULT_SIM_STATE})")
    p.add_argument("--fault", action="append", default=[], metavar="NAME",
                   help="wrong-handle, corrupt-signature, broken-chain, debug, ignore-mnonce (repeatable)")
    p.set_defaults(run=_aeb_sim)


def _verify(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..verifier import verify

    log = _event_log(args) if args.event_log else b""
    if args.file is None:
        if not log:
            raise EvidenceError("give evidence to verify, or --event-log FILE to replay a log")
        return _replay_only(log)
    evidence = load_evidence(args.file, args.provider)
    if log:
        if evidence.provider != "tdx_guest":
            raise EvidenceError(f"{args.file} is {evidence.provider} evidence: event logs are replayed against "
                                "TDX quotes (RTMRs) only")
        evidence = replace(evidence, event_log=log)
    verdict = verify(evidence, verification_context(args, args.report_data))
    if args.json:
        print(verdict_json(verdict))
        return 0 if verdict.ok else 1
    if evidence.event_log:  # the --event-log files, else the log the evidence carries
        _print_replay(evidence.event_log, verdict.claims)
    print("\n".join(check_lines(verdict)))
    print(f"=> {'OK: every check passed' if verdict.ok else 'FAILED: ' + verdict.reason()}")
    if verdict.claims:
        shown = dict(verdict.claims)
        if "tdx.events" in shown:
            shown["tdx.events"] = f"<{len(shown['tdx.events'])} events: --json shows them>"
        print("claims:")
        print("\n".join(claim_lines(shown)))
    return 0 if verdict.ok else 1


def _print_replay(log: bytes, claims: dict) -> None:
    """The replay per RTMR against the quote's (when the quote parsed); the event_log check says the rest."""
    from ..errors import EventLogError
    from ..verifier.tdx import eventlog as replayed
    from ..wire.eventlog import parse_event_log

    try:
        result = replayed.replay(parse_event_log(log))
    except EventLogError:
        return  # the event_log check names the problem
    quoted = None
    if all(f"tdx.rtmr{i}" in claims for i in range(4)):
        quoted = tuple(bytes.fromhex(claims[f"tdx.rtmr{i}"]) for i in range(4))
    print("\n".join(replayed.describe(result, quoted)))


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify evidence offline and print each check and the claims",
                       description="Verify an evidence envelope, Trustee's evidence form (what guest-components "
                                   "sends), or a raw SEV-SNP report, TDX quote, CCA token or SEV AEB evidence. "
                                   "With --event-log, replay a TDX event log against the quote's RTMRs (or, "
                                   "without evidence, just replay it). Exit status 0 only when every check that "
                                   "ran passed.")
    p.add_argument("file", type=Path, nargs="?",
                   help="an envelope or Trustee evidence (JSON), or a raw report, quote or token")
    p.add_argument("--provider", choices=PROVIDERS,
                   help="the provider of a raw blob (guessed when unambiguous)")
    add_evidence_options(p)
    p.add_argument("--report-data", type=hex_bytes, metavar="HEX", help="the REPORT_DATA to expect, byte for byte")
    p.add_argument("--event-log", type=Path, action="append", default=[], metavar="FILE",
                   help="a TDX event log: the CCEL log (/sys/firmware/acpi/tables/data/CCEL), then runtime logs "
                        "(/run/attestation-agent/eventlog), joined in order (repeatable)")
    p.add_argument("--ccel-table", type=Path, metavar="FILE",
                   help="the ACPI CCEL table (/sys/firmware/acpi/tables/CCEL): the first --event-log must fit "
                        "its log area")
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
    for add in (_add_verify, _add_tsm_sim, _add_aeb_sim, _add_demo):
        add(sub)
