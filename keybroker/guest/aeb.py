"""Evidence for SEV and SEV-ES guests, from the host's Attestation Evidence Broker (:mod:`..wire.aeb`).

Used instead of configfs-tsm when the client configuration has an ``[aeb]`` table: SEV and
SEV-ES guests have no report of their own. The broker is asked for the evidence of the
configured guest handle with the first 16 bytes of the inblob as MNONCE; the result goes to
the key server in the envelope as provider ``sev_aeb``, its blob uninterpreted here.

What it proves is less than a report of SEV-SNP or TDX: the guest cannot put its own data in
it and the host chooses the handle, so it shows that *some* guest with this launch digest runs
on this platform (and, through the MNONCE, that the broker made it now), not that the guest
asking is that guest. The key server refuses it unless a policy rule allows such "unbound"
evidence for the resource (docs/policy.md).
"""

from __future__ import annotations

import errno as E
import socket
import time
from dataclasses import dataclass

from ..errors import ConfigError, ProtocolError, TsmError
from ..wire import aeb
from ..wire.envelope import TsmReport

PROVIDER = "sev_aeb"
DEFAULT_ADDRESS = f"vsock:{aeb.HOST_CID}:{aeb.DEFAULT_PORT}"


@dataclass(frozen=True)
class Broker:
    """Where the broker listens (``vsock:CID:PORT``, or ``unix:/PATH`` for tests) and this guest's handle."""

    address: str
    guest_handle: int

    def __post_init__(self) -> None:
        self.endpoint()
        if not 1 <= self.guest_handle < 2**32:
            raise ConfigError(f"the guest handle {self.guest_handle} is not 1 to 2^32-1")

    def endpoint(self) -> tuple[int, str | tuple[int, int]]:
        """(address family, socket address) of ``address``; ConfigError when it is neither form."""
        kind, _, rest = self.address.partition(":")
        if kind == "unix" and rest.startswith("/") and len(rest.encode()) <= 107 and "\0" not in rest:
            return socket.AF_UNIX, rest
        if kind == "vsock":
            cid, _, port = rest.partition(":")
            if all(part.isascii() and part.isdigit() and len(part) <= 10 and int(part) < 2**32 for part in (cid, port)):
                return socket.AF_VSOCK, (int(cid), int(port))
        raise ConfigError(f"broker address {self.address[:120]!r} must be vsock:CID:PORT or unix:/PATH")

    def get_report(self, inblob: bytes, *, deadline: float) -> TsmReport:
        """The evidence for ``inblob`` (its first 16 bytes are the MNONCE), as an envelope's report."""
        mnonce = inblob[:aeb.MNONCE_SIZE]
        with _Connection(self, deadline) as conn:
            size = conn.call(aeb.SIZE_METHOD, aeb.EvidenceRequest(self.guest_handle))
            if not 0 < size.evidence_size <= aeb.EVIDENCE_MAX:
                raise TsmError(f"the evidence broker announced {size.evidence_size} bytes of evidence "
                               f"(expected 1 to {aeb.EVIDENCE_MAX})", errno=E.EPROTO)
            reply = conn.call(aeb.EVIDENCE_METHOD,
                              aeb.EvidenceRequest(self.guest_handle, size.evidence_size, mnonce))
        if len(reply.evidence) != size.evidence_size:
            raise TsmError(f"the evidence broker sent {len(reply.evidence)} bytes of evidence, not the "
                           f"{size.evidence_size} it announced", errno=E.EPROTO)
        return TsmReport(provider=PROVIDER, generation=0, inblob=inblob, outblob=reply.evidence)


class _Connection:
    """One ttrpc connection to the broker; every wait bounded by the deadline."""

    def __init__(self, broker: Broker, deadline: float) -> None:
        self.broker, self.deadline, self.stream = broker, deadline, 1
        family, address = broker.endpoint()
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:  # no vsock transport in this guest, no descriptors left
            raise self._failed(exc, "reach") from None
        try:
            self.sock.settimeout(self._left())
            self.sock.connect(address)
        except BaseException as exc:
            self.sock.close()
            raise self._failed(exc, "connect to") from None

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def call(self, method: str, request: aeb.EvidenceRequest) -> aeb.EvidenceResponse:
        stream, self.stream = self.stream, self.stream + 2  # a client's streams are odd
        try:
            payload = aeb.Call(method, request.encode(), round(self._left() * 1e9)).encode()
            self.sock.sendall(aeb.header(len(payload), stream, aeb.REQUEST) + payload)
            while True:
                length, got_stream, kind = aeb.parse_header(self._read(aeb.HEADER_SIZE))
                body = self._read(length)
                if got_stream == stream and kind == aeb.RESPONSE:
                    break
            reply = aeb.Reply.decode(body)
            if reply.code:
                raise ProtocolError(f"AEB: {method} failed with status {reply.code}: {reply.message[:200]}")
            response = aeb.EvidenceResponse.decode(reply.payload)
        except ProtocolError as exc:
            raise TsmError(f"the evidence broker at {self.broker.address} answered badly: {exc}",
                           errno=E.EPROTO) from None
        except OSError as exc:
            raise self._failed(exc, "talk to") from None
        if response.error_code:
            raise TsmError(f"the evidence broker refused guest handle {self.broker.guest_handle} "
                           f"(error code {response.error_code}): is it this guest's handle?", errno=E.EACCES)
        return response

    def _read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(min(size - len(data), 1 << 16))
            if not chunk:
                raise ConnectionResetError(E.ECONNRESET, "the broker closed the connection")
            data += chunk
        return bytes(data)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(E.ETIMEDOUT, "deadline passed")
        return left

    def _failed(self, exc: BaseException, doing: str) -> TsmError:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else E.ETIMEDOUT
        if isinstance(exc, TimeoutError):
            code = E.ETIMEDOUT
        return TsmError(f"cannot {doing} the evidence broker at {self.broker.address}: "
                        f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}",
                        errno=code, transient=True)
