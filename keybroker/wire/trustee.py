"""Trustee's evidence formats: what guest-components' attesters send and Trustee's verifiers read.

keybroker's own client and server exchange the Linux evidence envelope. A Trustee KBS
instead expects, in ``tee-evidence.primary_evidence``, one JSON form per TEE:

* ``snp``: ``{"attestation_report": <the sev crate's AttestationReport, serde JSON>,
  "cert_chain": null | [{"cert_type": "VCEK", "data": [DER bytes]}, ...]}``;
* ``tdx``: ``{"cc_eventlog": null | base64, "quote": base64}``;
* ``cca``: ``{"token": [token bytes]}``.

These are read as serde reads them: unknown members are ignored, a missing member, a wrong
JSON type, an integer out of its type's range or an array of the wrong length is refused.
The SEV-SNP report is turned back into its 1184 bytes field by field as the sev crate
encodes it (reserved ranges zero, the TCB layout by processor generation), so that the
signature verifies over what the JSON says, and the other way for a client that sends it.
``cert_chain`` and the GHCB certificate table in ``auxblob`` are two spellings of one list.
"""

from __future__ import annotations

import base64
import binascii
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import EvidenceError
from . import ghcb, parse_json, shown

REPORT_SIZE = 0x4A0
#: Trustee's names of TEEs and devices (kbs-types' ``Tee``), as a device-evidence map's keys.
TEE_NAMES = frozenset({"az-snp-vtpm", "az-tdx-vtpm", "nvidia", "sgx", "snp", "tdx", "cca", "csv", "se",
                       "hygondcu", "nvidia-dpu", "tpm", "sample", "sampledevice"})
_TEE_ALIASES = {"nvidiadpu": "nvidia-dpu"}
_PROVIDERS = {"snp": "sev_guest", "tdx": "tdx_guest", "cca": "arm_cca_guest"}


@dataclass(frozen=True)
class Blobs:
    """A provider's evidence as configfs-tsm would have returned it."""

    provider: str
    outblob: bytes
    auxblob: bytes = b""
    event_log: bytes = b""  # TDX: cc_eventlog, the CCEL log and runtime events


def from_json(tee: str, obj: Any) -> Blobs:
    """The blobs of Trustee's evidence form for ``tee`` (snp, tdx or cca); EvidenceError if malformed."""
    if tee == "snp":
        fields = _Fields(obj, "SNP evidence")
        chain = fields.get("cert_chain")
        return Blobs("sev_guest", snp_report_from_json(fields.get("attestation_report", required=True)),
                     ghcb.build(_cert_chain(chain)) if chain is not None else b"")
    if tee == "tdx":
        fields = _Fields(obj, "TDX evidence")
        eventlog = fields.get("cc_eventlog")
        log = b"" if eventlog is None else _b64decode(eventlog, "TDX evidence cc_eventlog")
        return Blobs("tdx_guest", _b64decode(fields.get("quote", required=True), "TDX evidence quote"), b"", log)
    if tee == "cca":
        return Blobs("arm_cca_guest", _byte_list(_Fields(obj, "CCA evidence").get("token", required=True),
                                                 "CCA evidence token"))
    raise EvidenceError(f"Trustee's evidence form for tee {shown(tee)} is not one keybroker reads")


def to_json(provider: str, outblob: bytes, auxblob: bytes = b"", event_log: bytes = b"") -> dict[str, Any]:
    """Trustee's evidence form of configfs-tsm blobs (what guest-components' attester would send);
    a TD's ``event_log`` goes as ``cc_eventlog``."""
    if provider == "sev_guest":
        chain = [{"cert_type": ghcb.KINDS.get(guid, {"OTHER": str(guid)}), "data": list(der)}
                 for guid, der in ghcb.parse(auxblob)]
        return {"attestation_report": snp_report_to_json(outblob), "cert_chain": chain or None}
    if provider == "tdx_guest":
        log = base64.b64encode(event_log).decode("ascii") if event_log else None
        return {"cc_eventlog": log, "quote": base64.b64encode(outblob).decode("ascii")}
    if provider == "arm_cca_guest":
        return {"token": list(outblob)}
    raise EvidenceError(f"provider {provider} has no Trustee evidence form")


def tee_of(obj: Any) -> str | None:
    """The TEE whose Trustee form ``obj`` has, by its members; None when it has none of them."""
    if isinstance(obj, dict):
        for member, tee in (("attestation_report", "snp"), ("quote", "tdx"), ("token", "cca")):
            if member in obj:
                return tee
    return None


def device_evidence(text: str) -> dict[str, Any]:
    """``additional_evidence``: "" or a JSON object from TEE (device) name to its evidence."""
    if text == "":
        return {}
    try:
        devices = parse_json(text)
    except ValueError:
        raise EvidenceError("additional_evidence is neither \"\" nor JSON") from None
    if not isinstance(devices, dict):
        raise EvidenceError("additional_evidence must be a JSON object from TEE name to evidence")
    out = {}
    for name, evidence in devices.items():
        name = _TEE_ALIASES.get(name, name)
        if name not in TEE_NAMES:
            raise EvidenceError(f"additional_evidence names unknown TEE {shown(name)}")
        out[name] = evidence
    return out


# -- the SEV-SNP report, as the sev crate (de)serializes and encodes it ----------------------

_UINT = {"u8": 0xFF, "u32": 0xFFFF_FFFF, "u64": 0xFFFF_FFFF_FFFF_FFFF}
_PACK = {"u8": "<B", "u32": "<I", "u64": "<Q"}
#: (member, offset, kind): kind is an integer type, a byte-array length, or tcb/version/signature.
_REPORT: tuple[tuple[str, int, str | int], ...] = (
    ("version", 0x000, "u32"), ("guest_svn", 0x004, "u32"), ("policy", 0x008, "u64"),
    ("family_id", 0x010, 16), ("image_id", 0x020, 16), ("vmpl", 0x030, "u32"), ("sig_algo", 0x034, "u32"),
    ("current_tcb", 0x038, "tcb"), ("plat_info", 0x040, "u64"), ("key_info", 0x048, "u32"),
    ("report_data", 0x050, 64), ("measurement", 0x090, 48), ("host_data", 0x0C0, 32),
    ("id_key_digest", 0x0E0, 48), ("author_key_digest", 0x110, 48), ("report_id", 0x140, 32),
    ("report_id_ma", 0x160, 32), ("reported_tcb", 0x180, "tcb"),
    ("cpuid_fam_id", 0x188, "u8?"), ("cpuid_mod_id", 0x189, "u8?"), ("cpuid_step", 0x18A, "u8?"),
    ("chip_id", 0x1A0, 64), ("committed_tcb", 0x1E0, "tcb"), ("current", 0x1E8, "version"),
    ("committed", 0x1EC, "version"), ("launch_tcb", 0x1F0, "tcb"),
    ("launch_mit_vector", 0x1F8, "u64?"), ("current_mit_vector", 0x200, "u64?"), ("signature", 0x2A0, "signature"),
)
_TCB = ("fmc", "bootloader", "tee", "snp", "microcode")
#: Where each TCB part sits in the 8 bytes: Milan and Genoa, then Turin (and Venice).
_TCB_LEGACY = {"bootloader": 0, "tee": 1, "snp": 6, "microcode": 7}
_TCB_TURIN = {"fmc": 0, "bootloader": 1, "tee": 2, "snp": 3, "microcode": 7}


def snp_report_from_json(obj: Any) -> bytes:
    """The 1184-byte ATTESTATION_REPORT that the sev crate's serde JSON ``obj`` describes."""
    fields = _Fields(obj, "attestation_report")
    values = {name: fields.value(name, kind) for name, _, kind in _REPORT}
    version = values["version"]
    if version not in (2, 3, 4, 5):
        raise EvidenceError(f"attestation_report version {version} is not one keybroker reads (2-5)")
    layout = _tcb_layout(version, values["chip_id"], values["cpuid_fam_id"] or 0, values["cpuid_mod_id"] or 0)
    raw = bytearray(REPORT_SIZE)
    for name, offset, kind in _REPORT:
        value = values[name]
        if kind == "tcb":
            for part, at in layout.items():
                raw[offset + at] = value[part] or 0
        elif kind == "version":
            raw[offset:offset + 3] = bytes((value["build"], value["minor"], value["major"]))
        elif kind == "signature":
            raw[offset:offset + 144] = value["r"] + value["s"]
        elif isinstance(kind, int):
            raw[offset:offset + kind] = value
        elif (kind == "u8?" and version < 3) or (kind == "u64?" and version < 5):
            continue  # not in this version's layout
        else:
            struct.pack_into(_PACK[kind.rstrip("?")], raw, offset, value or 0)
    return bytes(raw)


def snp_report_to_json(raw: bytes) -> dict[str, Any]:
    """The sev crate's serde JSON of a report; EvidenceError when that form cannot carry it exactly."""
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"SEV-SNP report is {len(raw)} bytes, expected {REPORT_SIZE}")
    version = struct.unpack_from("<I", raw)[0]
    if version not in (2, 3, 4, 5):
        raise EvidenceError(f"SEV-SNP report version {version} is not one keybroker reads (2-5)")
    layout = _tcb_layout(version, raw[0x1A0:0x1E0], raw[0x188], raw[0x189])
    out: dict[str, Any] = {}
    for name, offset, kind in _REPORT:
        if kind == "tcb":
            out[name] = {part: raw[offset + layout[part]] if part in layout else None for part in _TCB}
        elif kind == "version":
            out[name] = {"major": raw[offset + 2], "minor": raw[offset + 1], "build": raw[offset]}
        elif kind == "signature":
            out[name] = {"r": list(raw[offset:offset + 72]), "s": list(raw[offset + 72:offset + 144])}
        elif isinstance(kind, int):
            out[name] = list(raw[offset:offset + kind])
        elif (kind == "u8?" and version < 3) or (kind == "u64?" and version < 5):
            out[name] = None
        else:
            out[name] = struct.unpack_from(_PACK[kind.rstrip("?")], raw, offset)[0]
    if snp_report_from_json(out) != raw:
        raise EvidenceError("the SEV-SNP report has non-zero bytes the sev crate's JSON form does not carry "
                            "(reserved ranges): Trustee would verify other bytes than were signed")
    return out


def _tcb_layout(version: int, chip_id: bytes, family: int, model: int) -> dict[str, int]:
    """The TCB_VERSION layout as the sev crate chooses it: by CPUID (v3+) or by CHIP_ID's shape (v2)."""
    if version == 2:
        if not any(chip_id):
            raise EvidenceError("a version 2 report with a masked CHIP_ID does not say its processor "
                                "generation: the sev crate cannot encode it")
        return _TCB_TURIN if not any(chip_id[8:]) else _TCB_LEGACY
    if family == 0x19 and (model <= 0x0F or 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return _TCB_LEGACY  # Milan, Genoa
    if family == 0x1A and (model <= 0x11 or 0x50 <= model <= 0x57 or 0x90 <= model <= 0xAF
                           or 0xC0 <= model <= 0xC7):
        return _TCB_TURIN  # Turin, Venice
    raise EvidenceError(f"CPUID family 0x{family:02x} model 0x{model:02x} is not a known SEV-SNP processor")


def _cert_chain(chain: Any) -> list[tuple[uuid.UUID, bytes]]:
    """``cert_chain`` entries as certificate-table entries (``Empty`` ones carry nothing and are left out)."""
    if not isinstance(chain, list):
        raise EvidenceError("SNP evidence cert_chain must be null or a list")
    entries = []
    for i, item in enumerate(chain):
        fields = _Fields(item, f"cert_chain[{i}]")
        kind, data = fields.get("cert_type", required=True), fields.get("data", required=True)
        der = _byte_list(data, f"cert_chain[{i}].data")
        if kind == "Empty":
            continue
        if isinstance(kind, str) and kind in ghcb.GUIDS:
            entries.append((ghcb.GUIDS[kind], der))
        elif isinstance(kind, dict) and set(kind) == {"OTHER"} and isinstance(kind["OTHER"], str):
            try:
                entries.append((uuid.UUID(kind["OTHER"][:64]), der))
            except ValueError:
                raise EvidenceError(f"cert_chain[{i}].cert_type OTHER is not a UUID") from None
        else:
            raise EvidenceError(f"cert_chain[{i}].cert_type {shown(kind)} is not ARK, ASK, VCEK, VLEK, CRL, "
                                "Empty or {\"OTHER\": uuid}")
    return entries


# -- serde's reading of JSON ----------------------------------------------------------------

class _Fields:
    """A JSON object read as serde derives read a struct: members by name, extras ignored."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise EvidenceError(f"{where} must be a JSON object")
        self.obj, self.where = obj, where

    def get(self, name: str, *, required: bool = False) -> Any:
        if required and name not in self.obj:
            raise EvidenceError(f"{self.where} is missing {name!r}")
        return self.obj.get(name)

    def value(self, name: str, kind: str | int) -> Any:
        """A member of the report's ``kind`` (an absent or null ``Option`` is None)."""
        where = f"{self.where}.{name}"
        if isinstance(kind, int):
            return _byte_array(self.get(name, required=True), kind, where)
        if kind.endswith("?"):
            value = self.obj.get(name)
            return None if value is None else _uint(value, kind[:-1], where)
        if kind in _UINT:
            return _uint(self.get(name, required=True), kind, where)
        sub = _Fields(self.get(name, required=True), where)
        if kind == "tcb":
            return {part: sub.value(part, "u8?" if part == "fmc" else "u8") for part in _TCB}
        if kind == "version":
            return {part: sub.value(part, "u8") for part in ("major", "minor", "build")}
        return {part: sub.value(part, 72) for part in ("r", "s")}  # signature


def _uint(value: Any, kind: str, where: str) -> int:
    if type(value) is not int or not 0 <= value <= _UINT[kind]:
        raise EvidenceError(f"{where} must be an integer 0-{_UINT[kind]} ({kind}), not {shown(value)}")
    return value


def _byte_array(value: Any, size: int, where: str) -> bytes:
    if not isinstance(value, list) or len(value) != size:
        raise EvidenceError(f"{where} must be an array of {size} bytes")
    return _byte_list(value, where)


def _byte_list(value: Any, where: str) -> bytes:
    if not isinstance(value, list):
        raise EvidenceError(f"{where} must be an array of bytes (integers 0-255)")
    try:
        if all(type(b) is int for b in value):
            return bytes(value)
    except ValueError:
        pass
    raise EvidenceError(f"{where} must be an array of bytes (integers 0-255)")


def _b64decode(value: Any, where: str) -> bytes:
    """Standard base64 with padding, canonical, as the base64 crate's STANDARD engine reads it."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            data = None
        if data is not None and base64.b64encode(data).decode("ascii") == value:
            return data
    raise EvidenceError(f"{where} must be standard base64 (with padding)")
