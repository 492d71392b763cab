"""keybroker-request-key: the handler /sbin/request-key runs for ``keybroker:`` keys.

The drop-in (``request-key.d/keybroker.conf``) runs ``keybroker-handoff``, which hands the
construction to ``keybroker agent`` when one runs (see :mod:`.agentsocket`) and runs this
otherwise, in exec mode with the key serial (``%k``) and ``--since`` the system's uptime when the
handoff started (the deadline counts from there: the agent may have had up to half of it). It reads the key's
type and description with KEYCTL_DESCRIBE and the callout from the authorisation key, checks
that the requester (the key's uid/gid) may have the resource, attests the VM to the key server,
tightens the key's permissions to its possessors, sets the lease the server gave as expiry, and
instantiates it (the agent does the same in its process, through :func:`end` too).

Every run ends the construction exactly once, within a hard deadline: instantiate, or
reject with a deliberate errno and a negative-cache timeout. The round runs in a forked worker
(which drops the authority): a provider can block a read uninterruptibly, and this process,
the one the kernel waits for, must be able to give up on time.

Which errno and negative-cache timeout each failure gets is :mod:`.rejection`'s.

It logs one line per request to syslog (the journal, else stderr, when /dev/log is
missing; facility authpriv), never key material. ``--debug TYPE DESC CALLOUT`` runs the same flow without
the kernel and prints the outcome, not the secret. This module imports little at start:
it runs for key requests that no agent serves, at boot too.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # not signal: its enums cost milliseconds
import errno as E
import os
import sys
import time

from ..systemd import ERROR, INFO, Journal, no_core_dumps
from .rejection import FAILED, FORBIDDEN_ERRNOS, TRANSIENT, Rejection, Stopped, classify

# The rest (configuration, argument parsing, the attestation round) is imported when a request
# needs it. Not even typing or dataclasses: they cost the handler milliseconds on every key request.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .broker import ReleasedKey
    from .config import ClientConfig
    from .keyring import KeyDescription
    from .request import KeyRequest

DEFAULT_CONFIG = "/etc/keybroker/client.toml"


class Construction:
    """Ends one key construction exactly once: instantiate or reject (in the handler, a stopping signal
    rejects it: see ``stop_on_signals``)."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.done = self.ending = False

    def stop_on_signals(self) -> None:
        """SIGTERM, SIGHUP and SIGINT reject the construction (in the main thread of the handler's process)."""
        for signum, name in ((_signal.SIGTERM, "SIGTERM"), (_signal.SIGHUP, "SIGHUP"), (_signal.SIGINT, "SIGINT")):
            _signal.signal(signum, lambda *_, name=name: self._stop(name))

    def _stop(self, name: str) -> None:
        if not self.ending:  # once, and never while the construction is being ended
            self.ending = True
            raise Stopped(f"the handler was stopped by {name}")

    def instantiate(self, payload: bytearray, lease: int | None) -> None:
        from ..errors import KeyringError
        from . import keyring

        self.ending = True  # with the key in hand, a stopping signal waits for the end of this
        # Permissions that take SETATTR away first: until then the requester, who possesses the
        # key under construction, could lift a lease set before them. The lease after them: the
        # authority to instantiate the key lets this process set it still.
        try:
            keyring.setperm(self.serial, keyring.POSSESSOR_ONLY)
        except KeyringError as exc:  # made possessor-only already, by an agent stopped before it instantiated
            if exc.errno != E.EACCES or keyring.describe(self.serial).perm != keyring.POSSESSOR_ONLY:
                raise
        if lease:
            keyring.set_timeout(self.serial, lease)
        keyring.instantiate(self.serial, payload, 0)
        self.done = True

    def reject(self, rejection: Rejection) -> None:
        from . import keyring

        self.ending = True
        if not self.done:
            self.done = True
            keyring.reject(self.serial, max(rejection.timeout, 1), rejection.errno, 0)


class Failed(Exception):
    """The worker (or the deadline) decided to reject."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


def _describe_outcome(rejection: Rejection | None, size: int | None = None) -> str:
    if rejection is None:
        return f"outcome=instantiated size={size}"
    return (f"outcome=rejected errno={E.errorcode.get(rejection.errno, rejection.errno)} "
            f"timeout={rejection.timeout}s reason={rejection.reason!r}")


def end(construction: Construction, obtain: Callable[[], tuple[bytearray, int | None]]) -> tuple[Rejection | None,
                                                                                                 int | None]:
    """Instantiate the key ``obtain`` returns (with its lease), or reject the construction with what it raised;
    the key is wiped after. (rejection or None, the key's size)."""
    from ..errors import KeyringError

    try:
        value, lease = obtain()
        try:
            size = len(value)
            construction.instantiate(value, lease)
            return None, size
        finally:
            value[:] = bytes(len(value))
    except BaseException as exc:
        rejection = exc.rejection if isinstance(exc, Failed) else classify(exc)
        try:
            construction.reject(rejection)
        except KeyringError as reject_error:
            rejection = Rejection(rejection.errno, rejection.timeout,
                                  f"{rejection.reason}; reject failed: {reject_error}")
        return rejection, None


def log_outcome(log: Journal, serial: int, key: KeyDescription, rejection: Rejection | None, size: int | None,
                via: str, start: float) -> None:
    """The request's one syslog line: never the key."""
    log.line(INFO if rejection is None else ERROR,
             f"serial={serial} type={key.type} description={key.description[:160]!r} requester={key.uid}:{key.gid} "
             f"{_describe_outcome(rejection, size)} via={via} duration={time.monotonic() - start:.2f}s")


def load_config(path: str, *, code_checked: bool = False) -> ClientConfig:
    """The client configuration, once it and what root runs for a request are found to be root's alone
    (the code only unless ``code_checked``: the agent checks its code once, when it starts)."""
    from pathlib import Path

    from . import config, ownership

    if os.geteuid() == 0:
        ownership.check(Path(path), "client configuration")  # before a byte of it is believed
    cfg = config.load(path)
    if os.geteuid() == 0:
        ownership.check_config(cfg.path, cfg.server_ca)
        if not code_checked:
            ownership.check_code()
    return cfg


def _authorise(cfg: ClientConfig, key_type: str, description: str, callout: bytes, uid: int, gid: int) -> KeyRequest:
    """Check the request's grammar and the requester's right to the resource."""
    from ..errors import AccessDenied
    from .request import parse_request

    request = parse_request(key_type, description, callout)
    if not cfg.may_obtain(uid, _groups(uid, gid), str(request.resource), request.key_type):
        raise AccessDenied(f"requester uid {uid} gid {gid} may not obtain {request.resource} as a "
                           f"{request.key_type} key (see [[access]] in {cfg.path})")
    return request


def _groups(uid: int, gid: int) -> frozenset[int]:
    """The requester's groups: the key's gid and the user's supplementary groups in the group database.

    The kernel gives the handler the requester's fsuid and fsgid only; the groups a user is a
    member of come from the system's database (what newgrp or a dropped group did to one
    process is not seen).
    """
    import pwd

    try:
        return frozenset({gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)})
    except (KeyError, OSError):
        return frozenset({gid})


def _outcome(obtain: Callable[[], ReleasedKey], key_type: str, resource: str) -> tuple[dict[str, object], bytearray]:
    """Run ``obtain``: the answer's header and the key (to wipe after use), or a rejection's header."""
    from ..wire.resource import VALUE_MAX

    value = bytearray()
    try:
        released = obtain()
        value = released.value
        if not 1 <= len(value) <= VALUE_MAX:
            from ..errors import ResourceUnfit

            raise ResourceUnfit(f"resource {resource} is {len(value)} bytes; {key_type} keys hold 1 to "
                                 f"{VALUE_MAX}")
        return {"size": len(value), "lease": released.lease}, value
    except BaseException as exc:
        value[:] = bytes(len(value))
        rejection = classify(exc)
        return {"errno": rejection.errno, "timeout": rejection.timeout, "reason": rejection.reason}, bytearray()


def answer_frame(header: dict[str, object], value: bytearray) -> list[memoryview]:
    """The answer as the worker sends it to the handler (see :mod:`.answer`): its frame, then the key."""
    from .answer import encode_answer

    return [memoryview(encode_answer(header)), memoryview(value)]


def _worker(cfg: ClientConfig, request: KeyRequest, deadline: float, out: int, parent: int) -> None:
    """In the forked worker: obtain the key, then send the outcome (and key) to the parent."""
    import ctypes

    # Dies with the handler (killed, or its alarm): nobody would receive the key it fetched.
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        return  # the handler died before that
    from ..errors import KeybrokerError
    from . import broker, keyring

    try:
        keyring.assume_authority(0)  # the worker never touches the key under construction
    except KeybrokerError:
        pass
    header, value = _outcome(lambda: broker.obtain(cfg, request, deadline=deadline), request.key_type,
                             str(request.resource))
    for part in answer_frame(header, value):
        while part:
            part = part[os.write(out, part):]
    value[:] = bytes(len(value))


def obtain_within(cfg: ClientConfig, request: KeyRequest, deadline: float) -> ReleasedKey:
    """Run the attestation round in a forked worker and wait for it until ``deadline``.

    A provider or a FUSE file can block a read uninterruptibly, even for fatal signals; the
    kernel waits for this process, so the blocking work happens in a child this process
    can abandon: on the deadline it kills the worker and returns at once. The report entry a
    killed worker holds is removed by the next configfs-tsm client (see :mod:`.tsm`): an rmdir
    can block too, and there it blocks a worker, not this process. The answer is read into one
    buffer, wiped before return; the key leaves it only into the bytearray returned.
    """
    import select

    from ..wire.resource import VALUE_MAX
    from .answer import ANSWER_HEADER_MAX, decode_answer
    from .broker import ReleasedKey

    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            _worker(cfg, request, deadline - 0.5, write_end, parent)
        finally:
            os._exit(0)
    os.close(write_end)
    buffer = bytearray(4 + ANSWER_HEADER_MAX + VALUE_MAX + 1)
    view, filled = memoryview(buffer), 0
    try:
        poller = select.poll()
        poller.register(read_end, select.POLLIN | select.POLLHUP)
        while filled < len(buffer):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise Failed(Rejection(E.ETIMEDOUT, TRANSIENT, f"deadline of {cfg.deadline:g} s passed"))
            got = os.readv(read_end, [view[filled:]])
            if not got:
                break
            filled += got
        size = int.from_bytes(buffer[:4], "big")
        if filled < 4 or not 4 <= size <= ANSWER_HEADER_MAX or filled < 4 + size:
            raise Failed(Rejection(E.EIO, FAILED, "the worker ended without an answer"))
        try:
            header = decode_answer(buffer[4:4 + size])
        except ValueError:
            raise Failed(Rejection(E.EIO, FAILED, "the worker's answer was malformed")) from None
        value, lease = _from_answer(header, bytearray(view[4 + size:filled]))
        return ReleasedKey(value, lease)
    finally:
        view.release()
        buffer[:] = bytes(len(buffer))
        os.close(read_end)
        try:  # never waited for (it may be stuck in the kernel); killed when given up on (deadline, signal)
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, _signal.SIGKILL)
        except ChildProcessError:
            pass


def _from_answer(header: dict[str, object], value: bytearray) -> tuple[bytearray, int | None]:
    """The key and lease an answer (the worker's, or the agent's own, see ``answer_frame``) carries; Failed
    with the rejection it carries, or when it is malformed or cut short."""
    def failed(why: str) -> Failed:
        value[:] = bytes(len(value))
        return Failed(Rejection(E.EIO, FAILED, f"the answer for the key was {why}"))

    if "errno" in header:
        errno, timeout, reason = header.get("errno"), header.get("timeout"), header.get("reason")
        if not (isinstance(errno, int) and isinstance(timeout, int) and isinstance(reason, str)):
            raise failed("malformed")
        value[:] = bytes(len(value))
        raise Failed(Rejection(E.EIO if errno in FORBIDDEN_ERRNOS else errno, timeout, reason))
    if header.get("size") != len(value):
        raise failed("cut short")
    lease = header.get("lease")
    return value, lease if isinstance(lease, int) else None


def run_kernel(serial: int, config_path: str, log: Journal, since: float | None = None) -> int:
    """End the construction of ``serial``, which keybroker-handoff started at uptime ``since`` (None: now)."""
    from ..errors import KeyringError
    from . import keyring

    start = time.monotonic()
    try:
        key = keyring.describe(serial)
        callout = keyring.read(keyring.REQKEY_AUTH_KEY)
    except KeyringError as exc:
        # Without the authority nothing can end the construction: the kernel negates it (ENOKEY, 60 s).
        # (Also when the agent ended it just after its share: the authority is gone with the construction.)
        log.line(ERROR, f"serial={serial} outcome=failed reason={f'cannot read the request: {exc}'!r}")
        return 1
    try:  # where the handoff linked the authority for the agent, which did not end the construction
        keyring.unlink(keyring.serial_of(keyring.REQKEY_AUTH_KEY), keyring.USER_KEYRING)
    except KeyringError:
        pass  # not linked there (no agent runs)
    construction = Construction(serial)
    construction.stop_on_signals()
    via = "handler"  # who decided: the handler itself or its worker

    def obtain() -> tuple[bytearray, int | None]:
        nonlocal via
        cfg = load_config(config_path)
        # What is left of the deadline, counted from the handoff's start (the agent had up to half of it):
        # none left (a drop-in that gives the agent more than the configuration's half) is ETIMEDOUT at once.
        deadline = start + cfg.deadline - (0.0 if since is None else max(uptime() - since, 0.0))
        # Last resort: should anything below (the group database, say) block past the deadline,
        # SIGALRM ends the process; the kernel then negates the key (ENOKEY, 60 s).
        _signal.alarm(max(1, int(deadline - time.monotonic()) + 2))
        via = "worker"
        request = _authorise(cfg, key.type, key.description, callout, key.uid, key.gid)
        released = obtain_within(cfg, request, deadline)
        return released.value, released.lease

    rejection, size = end(construction, obtain)
    log_outcome(log, serial, key, rejection, size, via, start)
    return 0 if rejection is None else 1


def run_debug(key_type: str, description: str, callout: str, config_path: str,
              requester: tuple[int, int] | None = None) -> int:
    """The whole flow without the kernel; prints the outcome, never the secret.

    ``requester`` (uid, gid) stands in for the key's owner, as the kernel would report it
    (default: the caller's own ids): a testing aid for the access rules on kernels that do
    not upcall for non-root requesters. It grants nothing: this process keeps the caller's
    own privileges.
    """
    uid, gid = requester or (os.getuid(), os.getgid())
    start = time.monotonic()
    try:
        cfg = load_config(config_path)
        request = _authorise(cfg, key_type, description, os.fsencode(callout), uid, gid)  # argv's bytes
        released = obtain_within(cfg, request, start + cfg.deadline)
    except Exception as exc:
        rejection = exc.rejection if isinstance(exc, Failed) else classify(exc)
        print(f"{key_type} {description}: would reject: {_describe_outcome(rejection)}")
        return 1
    size = len(released.value)
    released.value[:] = bytes(size)
    lease = f", expiring after {released.lease} s" if released.lease else ""
    print(f"{key_type} {description}: would instantiate a {size}-byte key{lease} "
          f"({time.monotonic() - start:.2f} s)")
    return 0


def _requester(text: str) -> tuple[int, int]:
    import argparse
    import re

    ids = re.fullmatch(r"([0-9]{1,10}):([0-9]{1,10})", text)
    if not ids or max(int(ids[1]), int(ids[2])) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected UID:GID in decimal, got {text!r}")
    return int(ids[1]), int(ids[2])


def _serial(text: str) -> int | None:
    """The key serial the kernel passes (``%k``): 1 to 10 decimal digits."""
    return int(text) if 1 <= len(text) <= 10 and text.isascii() and text.isdigit() else None


def uptime(text: str | None = None) -> float:
    """Seconds since boot: now (/proc/uptime, which the handoff reads too), or as ``text`` gives them
    (``--since``: 1 to 10 digits, a dot and 2; ValueError otherwise)."""
    if text is None:
        with open("/proc/uptime", "rb") as f:
            text = f.read(64).split()[0].decode()
    whole, dot, part = text.partition(".")
    if not (whole.isascii() and whole.isdigit() and len(whole) <= 10 and dot and part.isascii() and part.isdigit()
            and len(part) == 2):
        raise ValueError(f"expected seconds since boot (/proc/uptime), got {text[:40]!r}")
    return float(text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # What keybroker-handoff runs: ``--config FILE --since UPTIME SERIAL``, read without argparse.
    fast = len(args) == 5 and args[0] == "--config" and not args[1].startswith("-") and args[2] == "--since"
    serial = _serial(args[4]) if fast else None
    try:
        since = uptime(args[3]) if serial is not None else None
    except ValueError:
        serial = None
    if serial is not None:
        config_path = args[1]
    else:
        config_path, since, serial = _parse(args)
    os.umask(0o077)
    no_core_dumps()
    code = run_kernel(serial, config_path, Journal("keybroker-request-key", stream=False, facility=10), since)
    # The construction is ended and logged: the kernel waits for this process to exit, so skip
    # the interpreter's tear-down (tens of milliseconds of freeing what the exit frees anyway).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse(argv: list[str]) -> tuple[str, float | None, int]:
    """Every other command line: the options (``--debug`` runs and exits here)."""
    import argparse

    parser = argparse.ArgumentParser(prog="keybroker-request-key",
                                     description="request-key handler for keybroker: keys (exec mode, %%k)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"client configuration (default {DEFAULT_CONFIG})")
    parser.add_argument("--since", metavar="UPTIME",
                        help="when keybroker-handoff started, in seconds since boot (the deadline counts from there)")
    parser.add_argument("--debug", nargs=3, metavar=("TYPE", "DESC", "CALLOUT"),
                        help="run the flow without the kernel and print the outcome")
    parser.add_argument("--requester", type=_requester, metavar="UID:GID",
                        help="with --debug: decide access as for a key requested by UID:GID (testing aid)")
    parser.add_argument("serial", nargs="?", help="the key under construction (%%k)")
    args = parser.parse_args(argv)
    try:
        since = None if args.since is None else uptime(args.since)
    except ValueError as exc:
        parser.error(f"--since: {exc}")
    if args.requester and not args.debug:
        parser.error("--requester is only for --debug")
    if args.debug:
        os.umask(0o077)
        no_core_dumps()
        key_type, description, callout = args.debug
        sys.exit(run_debug(key_type, description, callout, args.config, args.requester))
    serial = _serial(args.serial or "")
    if serial is None:
        parser.error("the key serial (%k) is required")
    return args.config, since, serial


if __name__ == "__main__":
    sys.exit(main())
