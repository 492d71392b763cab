"""The SEV/SEV-ES Attestation Evidence Broker protocol: ttrpc over vsock, protobuf messages.

SEV and SEV-ES guests cannot ask the firmware for a report; a host service, the Attestation
Evidence Broker (AEB; Linux proposal "Allow guest to query AMD SEV(-ES) runtime attestation
evidence", January 2022), runs the firmware's ATTESTATION command for a guest handle and
returns the evidence. Its protocol (proto3, served over ttrpc)::

    service AEBService {
      rpc RetrieveAttestationEvidenceSize(RetrieveAttestationEvidenceSizeRequest)
          returns (RetrieveAttestationEvidenceSizeResponse);      // {guest_handle=1} -> {error_code=1, evidence_size=2}
      rpc RetrieveAttestationEvidence(RetrieveAttestationEvidenceRequest)
          returns (RetrieveAttestationEvidenceResponse);          // {guest_handle=1, evidence_size=2}
    }                                                             //   -> {error_code=1, evidence_size=2, evidence=3}

keybroker adds ``bytes mnonce = 3`` to the evidence request: the MNONCE the broker passes to
ATTESTATION, so that the report shows it is fresh (a broker that ignores the field, as proto3
allows, returns evidence the key server refuses as not fresh). The evidence is the broker's
packed record: the 208-byte ATTESTATION report, then the CEK, PEK and OCA certificates
(2,084 bytes each, AMD's SEV certificate format): the verifier parses it.

ttrpc (containerd's): each message is a 10-byte header (length u32, stream id u32, both
big-endian; type u8: 1 request, 2 response; flags u8) and a protobuf ``Request {service=1,
method=2, payload=3, timeout_nano=4}`` or ``Response {status=1 {code=1, message=2},
payload=2}``. Only the protobuf this needs is here: varints and length-delimited fields,
decoded strictly and within bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

SERVICE = "aeb.AEBService"
SIZE_METHOD = "RetrieveAttestationEvidenceSize"
EVIDENCE_METHOD = "RetrieveAttestationEvidence"
#: The port the broker listens on (vsock, host CID 2), as the proposal's client uses.
DEFAULT_PORT = 5577
HOST_CID = 2
HEADER_SIZE = 10
REQUEST, RESPONSE = 1, 2
#: The largest ttrpc message accepted (ttrpc allows 4 MiB; AEB evidence is 6,460 bytes).
MESSAGE_MAX = 128 * 1024
EVIDENCE_MAX = 64 * 1024
MNONCE_SIZE = 16
_U32_MAX = 2**32 - 1


def header(length: int, stream_id: int, kind: int) -> bytes:
    return length.to_bytes(4, "big") + stream_id.to_bytes(4, "big") + bytes([kind, 0])


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(length, stream id, type) of a ttrpc message header."""
    length, stream_id, kind = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big"), data[8]
    if length > MESSAGE_MAX:
        raise ProtocolError(f"AEB: a ttrpc message of {length} bytes (at most {MESSAGE_MAX})")
    return length, stream_id, kind


# -- protobuf, the subset the AEB messages use ---------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(data: bytes, what: str) -> dict[int, int | bytes]:
    """Field number -> value (the last one wins, as protobuf says); unknown wire types are errors."""
    out: dict[int, int | bytes] = {}
    at = 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            if at >= len(data) or shift > 63:
                raise ProtocolError(f"AEB: {what} has a truncated or overlong varint")
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if value >= 2**64:
                    raise ProtocolError(f"AEB: {what} has a varint beyond 64 bits")
                return value

    while at < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtocolError(f"AEB: {what} has a field numbered 0")
        if wire == 0:
            out[number] = varint()
        elif wire == 2:
            size = varint()
            if at + size > len(data):
                raise ProtocolError(f"AEB: {what} has a field running past its end")
            out[number] = bytes(data[at:at + size])
            at += size
        else:
            raise ProtocolError(f"AEB: {what} has field {number} of wire type {wire}, which its messages do not use")
    return out


def _int(fields: dict[int, int | bytes], number: int, what: str, maximum: int = _U32_MAX) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int) or value > maximum:
        raise ProtocolError(f"AEB: {what} field {number} is not an integer up to {maximum}")
    return value


def _bytes(fields: dict[int, int | bytes], number: int, what: str, maximum: int) -> bytes:
    value = fields.get(number, b"")
    if not isinstance(value, bytes) or len(value) > maximum:
        raise ProtocolError(f"AEB: {what} field {number} is not bytes of at most {maximum}")
    return value


# -- ttrpc envelopes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A ttrpc Request: which method, with which payload."""

    method: str
    payload: bytes
    timeout_nano: int = 0

    def encode(self) -> bytes:
        return (_field(1, SERVICE) + _field(2, self.method) + _field(3, self.payload)
                + (_field(4, self.timeout_nano) if self.timeout_nano else b""))

    @classmethod
    def decode(cls, data: bytes) -> Call:
        fields = _fields(data, "ttrpc request")
        service = _bytes(fields, 1, "ttrpc request", 256)
        method = _bytes(fields, 2, "ttrpc request", 256).decode("ascii", "replace")
        if service != SERVICE.encode():
            raise ProtocolError(f"AEB: no service {service[:64]!r} (this is {SERVICE})")
        return cls(method, _bytes(fields, 3, "ttrpc request", MESSAGE_MAX), _int(fields, 4, "ttrpc request", 2**63))


@dataclass(frozen=True)
class Reply:
    """A ttrpc Response: a status (0 is OK) and the method's payload."""

    code: int
    message: str
    payload: bytes

    def encode(self) -> bytes:
        status = (_field(1, self.code) if self.code else b"") + (_field(2, self.message) if self.message else b"")
        return (_field(1, status) if status else b"") + _field(2, self.payload)

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        fields = _fields(data, "ttrpc response")
        status = _fields(_bytes(fields, 1, "ttrpc response", 64 * 1024), "ttrpc status")
        message = _bytes(status, 2, "ttrpc status", 4096).decode("utf-8", "replace")
        return cls(_int(status, 1, "ttrpc status"), message, _bytes(fields, 2, "ttrpc response", MESSAGE_MAX))


# -- the AEB messages ------------------------------------------------------------------------

@dataclass(frozen=True)
class EvidenceRequest:
    """RetrieveAttestationEvidence(Size)Request: the guest handle, and for the evidence its size and MNONCE."""

    guest_handle: int
    evidence_size: int = 0
    mnonce: bytes = b""

    def encode(self) -> bytes:
        return (_field(1, self.guest_handle) + (_field(2, self.evidence_size) if self.evidence_size else b"")
                + (_field(3, self.mnonce) if self.mnonce else b""))

    @classmethod
    def decode(cls, data: bytes) -> EvidenceRequest:
        fields = _fields(data, "evidence request")
        mnonce = _bytes(fields, 3, "evidence request", MNONCE_SIZE)
        if mnonce and len(mnonce) != MNONCE_SIZE:
            raise ProtocolError(f"AEB: an MNONCE is {MNONCE_SIZE} bytes, not {len(mnonce)}")
        return cls(_int(fields, 1, "evidence request"), _int(fields, 2, "evidence request"), mnonce)


@dataclass(frozen=True)
class EvidenceResponse:
    """RetrieveAttestationEvidence(Size)Response: an error code (0: none), the size, the evidence."""

    error_code: int
    evidence_size: int
    evidence: bytes = b""

    def encode(self) -> bytes:
        return ((_field(1, self.error_code) if self.error_code else b"") + _field(2, self.evidence_size)
                + (_field(3, self.evidence) if self.evidence else b""))

    @classmethod
    def decode(cls, data: bytes) -> EvidenceResponse:
        fields = _fields(data, "evidence response")
        return cls(_int(fields, 1, "evidence response"), _int(fields, 2, "evidence response"),
                   _bytes(fields, 3, "evidence response", EVIDENCE_MAX))
