"""Commands for a guest: evidence, the request-key drop-in, disk unlock."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import hex_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..guest.config import ClientConfig, MeasureConfig


def _evidence(args: argparse.Namespace) -> int:
    from ..guest.tsm import ReportRequest, TsmClient
    from ..wire import envelope

    request = ReportRequest(inblob=args.nonce, privlevel=args.privlevel,
                            service_provider=args.service_provider, service_guid=args.service_guid,
                            service_manifest_version=args.service_manifest_version)
    client = TsmClient(args.tsm_root)
    if args.no_event_log or client.provider() != "tdx_guest":
        print(envelope.dumps(client.get_report(request)))
        return 0
    import dataclasses

    from ..guest import measure

    with measure.evidence_log(_measure_config(args.config)) as read_log:  # a TD's event log, as the handler sends it
        report = dataclasses.replace(client.get_report(request), event_log=read_log())
    print(envelope.dumps(report))
    return 0


def _add_evidence(sub: argparse._SubParsersAction) -> None:
    from ..guest.tsm import DEFAULT_ROOT

    p = sub.add_parser("evidence", help="collect a configfs-tsm report and print its envelope",
                       description="Collect attestation evidence through configfs-tsm and print the "
                                   "Linux evidence envelope (JSON) on stdout; a TD's carries its event log "
                                   "(the CCEL log and the runtime log) unless --no-event-log.")
    p.add_argument("--tsm-root", type=Path, default=DEFAULT_ROOT,
                   help=f"the configfs-tsm report directory (default {DEFAULT_ROOT})")
    p.add_argument("--nonce", type=hex_bytes, required=True,
                   help="the inblob, in hex: 64 bytes for SEV-SNP and TDX, 32 to 64 for CCA")
    p.add_argument("--privlevel", type=int, help="guest privilege level to report (SEV-SNP VMPL, 0-3)")
    p.add_argument("--service-provider", help="service attestation provider (svsm)")
    p.add_argument("--service-guid", help="the one service to attest (default: all)")
    p.add_argument("--service-manifest-version", type=int, help="manifest version of that service")
    p.add_argument("--config", type=Path, help="TDX: the client configuration whose [measure] paths to read the "
                                               "event logs from (default /etc/keybroker/client.toml when it exists)")
    p.add_argument("--no-event-log", action="store_true",
                   help="TDX: leave the CCEL and runtime event log out (an envelope of version 1)")
    p.set_defaults(run=_evidence)


def _install_handler(args: argparse.Namespace) -> int:
    from ..guest import install

    target = install.install(args.config, args.conf_dir)  # refused when the configuration does not load
    print(f"installed {target}")
    return 0


def _add_install_handler(sub: argparse._SubParsersAction) -> None:
    from ..guest.install import CONF_DIR

    p = sub.add_parser("install-handler", help="install the request-key drop-in for keybroker: keys",
                       description="Write request-key.d/keybroker.conf so that the kernel's upcalls for "
                                   "keybroker: keys run this installation's handler with --config FILE.")
    p.add_argument("--config", type=Path, required=True, help="the client configuration the handler reads")
    p.add_argument("--conf-dir", type=Path, default=CONF_DIR, help=f"drop-in folder (default {CONF_DIR})")
    p.set_defaults(run=_install_handler)


def _client_config(path: Path) -> ClientConfig:
    """The client configuration, held as the handler holds it when root reads it (a unit at boot, an
    operator): one that others could change would choose which keys root serves, places or measures."""
    from ..guest.handler import load_config

    return load_config(str(path), code_checked=True)


def _keyfile_server(args: argparse.Namespace) -> int:
    from ..guest.unlock import keyfile
    from ..guest.unlock.progress import Reporter

    return keyfile.run(_client_config(args.config), args.socket, Reporter())


def _askpass_agent(args: argparse.Namespace) -> int:
    from ..guest.unlock import askpass
    from ..guest.unlock.progress import Reporter

    return askpass.run(_client_config(args.config), args.ask_dir, args.linger, Reporter())


def _place_key(args: argparse.Namespace) -> int:
    from ..guest.unlock import place
    from ..guest.unlock.progress import Reporter

    place.place(_client_config(args.config), args.volume, Reporter())
    return 0


def _add_unlock(sub: argparse._SubParsersAction) -> None:
    from ..guest.config import DEFAULT_PATH
    from ..guest.unlock.askpass import DEFAULT_ASK_DIR
    from ..guest.unlock.keyfile import DEFAULT_SOCKET

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


def _agent(args: argparse.Namespace) -> int:
    from ..guest import agent

    return agent.serve(args.socket)


def _add_agent(sub: argparse._SubParsersAction) -> None:
    from ..guest.agentsocket import SOCKET

    p = sub.add_parser("agent", help="end key constructions for request-key, warm (root only)",
                       description="Keep imports, the HTTP client and the kept attestation tokens warm, and end "
                                   "the key constructions keybroker-handoff gives over a root-only socket "
                                   "(socket-activated by keybroker-agent.socket, or listening itself).")
    p.add_argument("--socket", type=Path, default=SOCKET, help=f"where to listen (default {SOCKET})")
    p.set_defaults(run=_agent)


def _forget_tokens(args: argparse.Namespace) -> int:
    from ..guest import tokens

    print("dropped the kept attestation tokens" if tokens.forget_all() else "no attestation tokens were kept")
    return 0


def _add_forget_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget-tokens", help="drop the attestation tokens the handler keeps (root's keyring)",
                       description="Unlink the keyring in which the request-key handler keeps attestation tokens "
                                   "and their tee keys: the next key request attests again.")
    p.set_defaults(run=_forget_tokens)


def _measure_config(path: Path | None) -> MeasureConfig:
    """[measure] of the client configuration at ``path``, else of the default one when it exists, else the defaults."""
    from ..guest import config

    if path is None and not config.DEFAULT_PATH.exists():
        return config.MeasureConfig()
    return _client_config(path or config.DEFAULT_PATH).measure


def _measure(args: argparse.Namespace) -> int:
    import dataclasses

    from ..guest import measure
    from ..wire.eventlog import RuntimeEvent

    cfg = _measure_config(args.config)
    overrides = {"log": args.log, "root": args.root}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    value = measure.measure(cfg, RuntimeEvent(args.domain, args.operation, args.content))
    print(f"RTMR{measure.RTMR} {value.hex()}")
    return 0


def _add_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure a runtime event into an RTMR and the runtime event log (TDX)",
                       description="Append a runtime event (DOMAIN OPERATION CONTENT, guest-components' AAEL "
                                   "format) to the runtime event log, then extend the RTMR with its SHA-384 "
                                   "digest through the kernel's tsm-mr registers (Linux 6.16+). Prints the "
                                   "RTMR's new value. Paths come from [measure] in the client "
                                   "configuration (when there is one), overridden by the options.")
    p.add_argument("--domain", required=True, help="who measures, one word (e.g. example.org)")
    p.add_argument("--operation", required=True, help="what was done, one word (e.g. image-pull)")
    p.add_argument("--content", required=True, help="what it was done to (one line)")
    p.add_argument("--config", type=Path, help="client configuration whose [measure] table to use "
                                               "(default /etc/keybroker/client.toml when it exists)")
    p.add_argument("--log", type=Path, help="the runtime event log (default /run/keybroker/runtime-eventlog)")
    p.add_argument("--root", type=Path, help="the tsm-mr registers (default /sys/class/misc/tdx_guest/measurements)")
    p.set_defaults(run=_measure)


def add_commands(sub: argparse._SubParsersAction) -> None:
    for add in (_add_evidence, _add_install_handler, _add_agent, _add_forget_tokens, _add_measure, _add_unlock):
        add(sub)
