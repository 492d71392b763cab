"""A simulated Attestation Evidence Broker: the host service SEV/SEV-ES guests ask for evidence.

Serves :mod:`..wire.aeb` (ttrpc) on a Unix socket or, where the machine has vsock, a vsock
port, for one simulated SEV-ES guest (its handle, launch digest and policy) on the simulated
platform of :mod:`.sevlegacy`. Faults, for tests and demos: ``wrong-handle`` (the broker
knows the guest by another handle), ``corrupt-signature``, ``broken-chain`` (a CEK that the
ASK did not sign), ``debug`` (a guest policy without NODBG), ``ignore-mnonce`` (a broker
that does not pass the guest's MNONCE, as the proposal's original broker).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProtocolError
from ..wire import aeb
from .roots import SimState
from .sevlegacy import SevPlatform, platform

FAULTS = ("wrong-handle", "corrupt-signature", "broken-chain", "debug", "ignore-mnonce")
#: SEV-ES guest policy: NODBG, NOKS, ES.
POLICY = 0x7
NODBG = 0x1
#: What the firmware reports for a handle that is not a guest's (SEV API status INVALID_GUEST).
INVALID_GUEST = 0x0B
_CONNECTION_TIMEOUT = 10.0


@dataclass(frozen=True)
class Guest:
    """The simulated guest the broker serves evidence for."""

    handle: int
    launch_digest: bytes
    policy: int = POLICY


class Broker:
    def __init__(self, platform: SevPlatform, guest: Guest, faults: frozenset[str] = frozenset()) -> None:
        unknown = faults - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown AEB fault(s) {', '.join(sorted(unknown))} (known: {', '.join(FAULTS)})")
        self.platform, self.guest, self.faults = platform, guest, faults
        self.known_handle = guest.handle + 1 if "wrong-handle" in faults else guest.handle

    def evidence(self, mnonce: bytes) -> bytes:
        policy = self.guest.policy & ~NODBG if "debug" in self.faults else self.guest.policy
        if "ignore-mnonce" in self.faults or not mnonce:
            mnonce = secrets.token_bytes(aeb.MNONCE_SIZE)  # what the firmware does without one
        return self.platform.evidence(mnonce, self.guest.launch_digest, policy,
                                      corrupt_signature="corrupt-signature" in self.faults,
                                      broken_chain="broken-chain" in self.faults)

    def answer(self, call: aeb.Call) -> aeb.Reply:
        if call.method not in (aeb.SIZE_METHOD, aeb.EVIDENCE_METHOD):
            return aeb.Reply(12, f"method {call.method[:64]} is not implemented", b"")  # gRPC UNIMPLEMENTED
        request = aeb.EvidenceRequest.decode(call.payload)
        if request.guest_handle != self.known_handle:
            return aeb.Reply(0, "", aeb.EvidenceResponse(INVALID_GUEST, 0).encode())
        evidence = self.evidence(request.mnonce)
        if call.method == aeb.SIZE_METHOD:
            return aeb.Reply(0, "", aeb.EvidenceResponse(0, len(evidence)).encode())
        if request.evidence_size < len(evidence):
            return aeb.Reply(0, "", aeb.EvidenceResponse(0, len(evidence)).encode())  # the buffer is too small
        return aeb.Reply(0, "", aeb.EvidenceResponse(0, len(evidence), evidence).encode())

    def serve_connection(self, conn: socket.socket) -> None:
        """Answer one client's calls until it hangs up, stalls or sends what ttrpc is not."""
        with conn:
            conn.settimeout(_CONNECTION_TIMEOUT)
            try:
                while True:
                    head = _read(conn, aeb.HEADER_SIZE)
                    if not head:
                        return
                    length, stream, kind = aeb.parse_header(head)
                    body = _read(conn, length)
                    if kind != aeb.REQUEST or len(body) != length:
                        return
                    reply = self.answer(aeb.Call.decode(body)).encode()
                    conn.sendall(aeb.header(len(reply), stream, aeb.RESPONSE) + reply)
            except (OSError, ProtocolError):
                return


def _read(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 16))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def listen(address: str) -> socket.socket:
    """A listening socket for ``unix:/PATH`` (mode 0600) or ``vsock:PORT`` (any CID)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest.startswith("/"):
        Path(rest).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(rest)
        finally:
            os.umask(old)
    elif kind == "vsock" and rest.isascii() and rest.isdigit():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind((socket.VMADDR_CID_ANY, int(rest)))
    else:
        raise ValueError(f"listen address {address!r} must be unix:/PATH or vsock:PORT")
    sock.listen(64)
    return sock


def serve(listener: socket.socket, broker: Broker) -> None:
    """Accept connections, one thread each, until the listener is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=broker.serve_connection, args=(conn,), daemon=True).start()


def make_broker(state: SimState, handle: int, launch_digest: bytes | None, faults: list[str]) -> Broker:
    """The broker for the state's simulated platform; the launch digest defaults to one kept in the state."""
    digest_file = state.path / "sev" / "launch-digest"
    sev = platform(state)
    if launch_digest is None:
        if not digest_file.exists():
            digest_file.write_text(secrets.token_hex(32))
        launch_digest = bytes.fromhex(digest_file.read_text().strip())
    if len(launch_digest) != 32:
        raise ValueError("a SEV launch digest is 32 bytes")
    return Broker(sev, Guest(handle, launch_digest), frozenset(faults))
