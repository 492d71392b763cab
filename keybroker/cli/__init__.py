"""The ``keybroker`` command: parse arguments, call the rooms that do the work, print.

Commands by audience: ``guest`` (evidence, install-handler, keyfile-server, askpass-agent,
place-key), ``server`` (serve, resource, policy, audit, rotate-kek) and ``tools`` (verify,
tsm-sim, demo). Each command imports what it needs when it runs, so that one command's
dependencies (the FUSE binding, the server stack) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import KeybrokerError
from . import guest, server, tools


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description="Attested key release for confidential VMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for audience in (guest, server, tools):
        audience.add_commands(sub)
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
    except OSError as exc:
        if exc.filename is None:
            raise
        # A file an argument names that cannot be read or written (a typo, a folder, no right).
        print(f"keybroker {args.command}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
