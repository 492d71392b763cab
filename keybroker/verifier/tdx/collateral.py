"""Intel DCAP collateral: TDX TCB info, TD_QE identity, CRLs and their issuer chains.

Intel serves TCB info as ``{"tcbInfo": {...}, "signature": "<hex r||s>"}`` and the QE
identity as ``{"enclaveIdentity": {...}, "signature": ...}``; the signature (ECDSA P-256,
by "Intel SGX TCB Signing") covers the *exact bytes* of the member as served, so the
member is cut out of the text, never re-serialised. The PCK CRL is signed by the PCK
Platform/Processor CA, the Root CA CRL by the root.

A collateral folder holds any of: TCB info and QE identity JSON files (recognised by their
member, whatever their name), certificates (PEM/DER: the TCB signing chain), CRLs (DER or
PEM, or hex), or dcap-qvl's ``QuoteCollateralV3`` bundle JSON (``tcb_info``,
``qe_identity``, ``*_signature``, ``*_issuer_chain``, ``pck_crl``, ``root_ca_crl``). Other
files (a quote, metadata JSON, a public key kept alongside) are ignored; a file that is
not JSON, PEM or DER where its name says so is an error. Everything is hostile input: sizes, types and every field the
appraisal uses are checked here.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ...errors import EvidenceError
from ...wire import parse_json
from ..certs import CERT_FILE_MAX, load_certs, load_crl

FOLDER_FILES_MAX = 256
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")
ENCLAVE_STATUSES = ("UpToDate", "OutOfDate", "Revoked")
_WS = re.compile(r"[ \t\n\r]*")


# -- typed records ----------------------------------------------------------------------

@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]  # 16 SVNs
    pcesvn: int
    tdx_components: tuple[int, ...]  # 16 SVNs
    date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IsvLevel:
    """A TCB level of an enclave or TDX module identity: one ISVSVN."""

    isvsvn: int
    date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class ModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    fmspc: bytes
    pce_id: bytes
    evaluation_data_number: int
    tdx_module: ModuleIdentity | None
    module_identities: tuple[ModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    miscselect: bytes  # as MISCSELECT's bytes appear in the report
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True)
class Signed:
    """A signed collateral document: the exact signed bytes, the signature, the parsed content."""

    body: bytes
    signature: bytes
    content: Any  # TcbInfo or QeIdentity
    source: str


@dataclass(frozen=True)
class Collateral:
    source: str
    tcb_infos: tuple[Signed, ...]
    qe_identities: tuple[Signed, ...]
    certs: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]

    def tcb_info(self, fmspc: bytes) -> Signed | None:
        """The newest TDX TCB info for ``fmspc``."""
        found = [s for s in self.tcb_infos if s.content.fmspc == fmspc]
        return max(found, key=lambda s: s.content.evaluation_data_number, default=None)

    def qe_identity(self) -> Signed | None:
        found = [s for s in self.qe_identities if s.content.id == "TD_QE"]
        return max(found, key=lambda s: s.content.issue_date, default=None)

    def crl(self, issuer: x509.Name) -> x509.CertificateRevocationList | None:
        found = [c for c in self.crls if c.issuer == issuer]
        return max(found, key=lambda c: c.last_update_utc, default=None)

    def next_updates(self) -> list[tuple[str, dt.datetime | None]]:
        """(what, nextUpdate) of every document, for freshness checks."""
        out = [(f"TCB info {s.source}", s.content.next_update) for s in self.tcb_infos]
        out += [(f"QE identity {s.source}", s.content.next_update) for s in self.qe_identities]
        out += [(f"CRL of {c.issuer.rfc4514_string()}", c.next_update_utc) for c in self.crls]
        return out


# -- loading ----------------------------------------------------------------------------

def load_folder(folder: Path) -> Collateral:
    """Everything a collateral folder holds (see the module documentation)."""
    if not folder.is_dir():
        raise EvidenceError(f"collateral folder {folder} does not exist")
    try:
        return _load_folder(folder)
    except OSError as exc:  # a file gone since the folder was listed (the cache being replaced), say
        raise EvidenceError(f"collateral folder {folder}: {exc.strerror or exc}: {exc.filename}") from None


def _load_folder(folder: Path) -> Collateral:
    # Every file listed is read, or the load fails: a file that vanished is not skipped (a folder
    # replaced while it is read must not give collateral with documents missing).
    files = sorted(p for p in folder.iterdir() if stat.S_ISREG(p.stat().st_mode))
    if len(files) > FOLDER_FILES_MAX:
        raise EvidenceError(f"collateral folder {folder} has more than {FOLDER_FILES_MAX} files")
    tcb_infos: list[Signed] = []
    qe_identities: list[Signed] = []
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in (".json", ".pem", ".crt", ".cer", ".der", ".crl"):
            continue
        if path.stat().st_size > CERT_FILE_MAX:
            raise EvidenceError(f"collateral file {path} is larger than {CERT_FILE_MAX} bytes")
        data = path.read_bytes()
        try:
            if suffix == ".json":
                _load_json(data, path.name, tcb_infos, qe_identities, certs, crls)
            elif b"-----BEGIN X509 CRL-----" in data or suffix == ".crl":
                crls.append(load_crl(data))
            elif b"-----BEGIN CERTIFICATE-----" in data:
                certs.extend(load_certs(data))
            elif b"-----BEGIN " not in data:  # other PEM (a public key kept alongside) is not collateral
                _load_der(data, certs, crls)
        except EvidenceError as exc:
            raise EvidenceError(f"collateral file {path}: {exc}") from None
    return Collateral(str(folder), tuple(tcb_infos), tuple(qe_identities), tuple(certs), tuple(crls))


def _load_der(data: bytes, certs: list[x509.Certificate], crls: list[x509.CertificateRevocationList]) -> None:
    """A CRL (DER or hex) or a DER certificate; anything else is an error, never skipped: a
    damaged CRL must not quietly turn off the revocation check."""
    try:
        crls.append(load_crl(data))
    except EvidenceError:
        certs.extend(load_certs(data))


def _load_json(data: bytes, source: str, tcb_infos: list[Signed], qe_identities: list[Signed],
               certs: list[x509.Certificate], crls: list[x509.CertificateRevocationList]) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EvidenceError("not UTF-8 JSON") from None
    doc = _loads(text)
    if not isinstance(doc, dict):
        return
    if "tcbInfo" in doc:
        if isinstance(doc["tcbInfo"], dict) and doc["tcbInfo"].get("id") != "TDX":
            return  # an SGX TCB info is not TDX collateral
        tcb_infos.append(_signed(text, _members(text), doc, "tcbInfo", parse_tcb_info, source))
    elif "enclaveIdentity" in doc:
        qe_identities.append(_signed(text, _members(text), doc, "enclaveIdentity", parse_qe_identity, source))
    elif "tcb_info" in doc or "qe_identity" in doc:
        _load_bundle(doc, source, tcb_infos, qe_identities, certs, crls)
    # Any other JSON (metadata kept beside a quote) is not collateral.


def _load_bundle(doc: Any, source: str, tcb_infos: list[Signed], qe_identities: list[Signed],
                 certs: list[x509.Certificate], crls: list[x509.CertificateRevocationList]) -> None:
    """dcap-qvl's QuoteCollateralV3: signed members as strings, signatures and CRLs in hex."""
    def text(key: str) -> str:
        value = doc.get(key)
        if not isinstance(value, str):
            raise EvidenceError(f"collateral bundle member {key!r} must be a string")
        return value

    for member, parse, out in (("tcb_info", parse_tcb_info, tcb_infos),
                               ("qe_identity", parse_qe_identity, qe_identities)):
        if member in doc:
            body = text(member)
            out.append(Signed(body.encode(), _hex(text(f"{member}_signature"), 64, f"{member}_signature"),
                              parse(_loads(body)), f"{source}:{member}"))
            certs.extend(load_certs(text(f"{member}_issuer_chain").encode()))
    for member in ("pck_crl", "root_ca_crl"):
        if member in doc:
            crls.append(load_crl(text(member).encode()))
    if "pck_crl_issuer_chain" in doc:
        certs.extend(load_certs(text("pck_crl_issuer_chain").encode()))


def _signed(text: str, spans: dict[str, tuple[int, int]], doc: Any, member: str, parse: Any,
            source: str) -> Signed:
    if set(spans) != {member, "signature"}:
        raise EvidenceError(f"expected exactly the members {member!r} and 'signature', got {sorted(spans)}")
    start, end = spans[member]
    if not isinstance(doc["signature"], str):
        raise EvidenceError("'signature' must be a hex string")
    return Signed(text[start:end].encode("utf-8"), _hex(doc["signature"], 64, "signature"),
                  parse(doc[member]), source)


def _members(text: str) -> dict[str, tuple[int, int]]:
    """Character spans of the values of a JSON object's top-level members, as written."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "{":
        raise EvidenceError("collateral JSON is not an object")
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    spans: dict[str, tuple[int, int]] = {}
    try:
        while text[pos:pos + 1] != "}":
            if text[pos:pos + 1] != '"':
                raise ValueError(f"expected a member name at {pos}")
            key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            _, end = decoder.raw_decode(text, pos)
            if key in spans:
                raise ValueError(f"member {key!r} appears twice")
            spans[key] = (pos, end)
            pos = _WS.match(text, end).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] == ",":
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            elif text[pos:pos + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at {pos}")
    except ValueError as exc:
        raise EvidenceError(f"malformed collateral JSON: {exc}") from None
    if _WS.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        raise EvidenceError("collateral JSON has data after its object")
    return spans


def _loads(text: str) -> Any:
    try:
        return parse_json(text, unique=True)
    except ValueError as exc:
        raise EvidenceError(f"malformed collateral JSON: {exc}") from None


# -- parsing the documents ---------------------------------------------------------------

def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise EvidenceError(f"{where} must be an object")
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EvidenceError(f"{where}.{key} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _int(obj: Any, key: str, where: str, maximum: int = 0xFFFF) -> int:
    value = _field(obj, key, int, where)
    if not 0 <= value <= maximum:
        raise EvidenceError(f"{where}.{key} = {value} is out of range 0-{maximum}")
    return value


def _hex(text: str, size: int, where: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise EvidenceError(f"{where} is not hexadecimal") from None
    if len(raw) != size:
        raise EvidenceError(f"{where} is {len(raw)} bytes, expected {size}")
    return raw


def _hex_field(obj: Any, key: str, size: int, where: str) -> bytes:
    return _hex(_field(obj, key, str, where), size, f"{where}.{key}")


def _time(obj: Any, key: str, where: str) -> dt.datetime:
    text = _field(obj, key, str, where)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EvidenceError(f"{where}.{key} is not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise EvidenceError(f"{where}.{key} has no time zone")
    return when


def _advisories(level: dict[str, Any], where: str) -> tuple[str, ...]:
    ids = level.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EvidenceError(f"{where}.advisoryIDs must be a list of strings")
    return tuple(ids)


def _status(level: Any, allowed: tuple[str, ...], where: str) -> str:
    status = _field(level, "tcbStatus", str, where)
    if status not in allowed:
        raise EvidenceError(f"{where}.tcbStatus {status!r} is not one of {', '.join(allowed)}")
    return status


def _components(tcb: Any, key: str, where: str) -> tuple[int, ...]:
    items = _field(tcb, key, list, where)
    if len(items) != 16:
        raise EvidenceError(f"{where}.{key} has {len(items)} components, expected 16")
    return tuple(_int(item, "svn", f"{where}.{key}[{i}]", 255) for i, item in enumerate(items))


def _isv_levels(obj: Any, where: str) -> tuple[IsvLevel, ...]:
    levels = []
    for i, level in enumerate(_field(obj, "tcbLevels", list, where)):
        w = f"{where}.tcbLevels[{i}]"
        levels.append(IsvLevel(_int(_field(level, "tcb", dict, w), "isvsvn", f"{w}.tcb"),
                               _field(level, "tcbDate", str, w), _status(level, ENCLAVE_STATUSES, w),
                               _advisories(level, w)))
    return tuple(levels)


def _module(obj: Any, where: str, with_levels: bool) -> ModuleIdentity:
    return ModuleIdentity(id=_field(obj, "id", str, where) if with_levels else "",
                          mrsigner=_hex_field(obj, "mrsigner", 48, where),
                          attributes=_hex_field(obj, "attributes", 8, where),
                          attributes_mask=_hex_field(obj, "attributesMask", 8, where),
                          levels=_isv_levels(obj, where) if with_levels else ())


def parse_tcb_info(obj: Any) -> TcbInfo:
    w = "tcbInfo"
    if _field(obj, "id", str, w) != "TDX":
        raise EvidenceError(f"{w}.id is {obj['id']!r}, not 'TDX'")
    identities = obj.get("tdxModuleIdentities", [])
    if not isinstance(identities, list):
        raise EvidenceError(f"{w}.tdxModuleIdentities must be a list")
    levels = []
    for i, level in enumerate(_field(obj, "tcbLevels", list, w)):
        lw = f"{w}.tcbLevels[{i}]"
        tcb = _field(level, "tcb", dict, lw)
        levels.append(TcbLevel(_components(tcb, "sgxtcbcomponents", f"{lw}.tcb"), _int(tcb, "pcesvn", f"{lw}.tcb"),
                               _components(tcb, "tdxtcbcomponents", f"{lw}.tcb"), _field(level, "tcbDate", str, lw),
                               _status(level, TCB_STATUSES, lw),
                               _advisories(level, lw)))
    return TcbInfo(id=obj["id"], version=_int(obj, "version", w),
                   issue_date=_time(obj, "issueDate", w), next_update=_time(obj, "nextUpdate", w),
                   fmspc=_hex_field(obj, "fmspc", 6, w), pce_id=_hex_field(obj, "pceId", 2, w),
                   evaluation_data_number=_int(obj, "tcbEvaluationDataNumber", w, 2**31),
                   tdx_module=_module(obj["tdxModule"], f"{w}.tdxModule", False) if "tdxModule" in obj else None,
                   module_identities=tuple(_module(m, f"{w}.tdxModuleIdentities[{i}]", True)
                                           for i, m in enumerate(identities)),
                   levels=tuple(levels))


def parse_qe_identity(obj: Any) -> QeIdentity:
    w = "enclaveIdentity"
    return QeIdentity(id=_field(obj, "id", str, w), version=_int(obj, "version", w),
                      issue_date=_time(obj, "issueDate", w), next_update=_time(obj, "nextUpdate", w),
                      miscselect=_hex_field(obj, "miscselect", 4, w),
                      miscselect_mask=_hex_field(obj, "miscselectMask", 4, w),
                      attributes=_hex_field(obj, "attributes", 16, w),
                      attributes_mask=_hex_field(obj, "attributesMask", 16, w),
                      mrsigner=_hex_field(obj, "mrsigner", 32, w), isvprodid=_int(obj, "isvprodid", w),
                      levels=_isv_levels(obj, w))
