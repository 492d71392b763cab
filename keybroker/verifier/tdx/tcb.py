"""TDX TCB status from TCB info and QE identity, as Intel's QVL derives it (tdx.md section 5.2).

* Platform: walking ``tcbLevels`` in the order served (newest first), the SGX level is the
  first whose 16 SGX component SVNs and PCESVN are all covered by the PCK certificate's;
  the TDX level is the first such level whose TDX components are all covered by
  TEE_TCB_SVN (from index 2 when TEE_TCB_SVN[1], the module version, is non-zero: the
  module SVN is then judged by its own identity). No level: ``NotSupported``.
* TDX module: identity ``TDX_%02X`` of TEE_TCB_SVN[1] (``tdxModule`` for version 0); its
  MRSIGNER and masked attributes must match the quote; its level is the first with
  ``isvsvn <= TEE_TCB_SVN[0]``. An out-of-date or revoked module degrades the status.
* TDX 1.5: a TD that is out of date only because of the module it was launched on, while
  the module now running (TEE_TCB_SVN_2) is current, gets ``TDRelaunchAdvised[...]``.
* QE identity: the QE's level (first with ``isvsvn <= ISVSVN``) degrades the status too.

Advisory IDs are those of the selected platform, module and QE levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import EvidenceError
from .collateral import IsvLevel, ModuleIdentity, QeIdentity, TcbInfo, TcbLevel

if TYPE_CHECKING:
    from .abi import QeReport, TdReport
    from .pck import PckInfo

NOT_SUPPORTED = "NotSupported"
CONFIGURATION = {"ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded", "OutOfDateConfigurationNeeded",
                 "TDRelaunchAdvisedConfigurationNeeded"}
CURRENT = {"UpToDate", "SWHardeningNeeded"}


@dataclass(frozen=True)
class TcbResult:
    status: str
    advisory_ids: tuple[str, ...]
    date: str | None  # the platform TCB level's tcbDate
    explanation: str


def qe_level(identity: QeIdentity, report: QeReport) -> IsvLevel:
    """The QE's TCB level; ``NotSupported`` when its ISVSVN is below every level."""
    found = next((lv for lv in identity.levels if lv.isvsvn <= report.isvsvn), None)
    return found or IsvLevel(report.isvsvn, "", NOT_SUPPORTED, ())


def qe_identity_mismatch(identity: QeIdentity, report: QeReport) -> str | None:
    """Why the QE report is not the enclave the identity describes, or None."""
    if report.mrsigner != identity.mrsigner:
        return f"QE MRSIGNER {report.mrsigner.hex()} is not {identity.mrsigner.hex()}"
    if report.isvprodid != identity.isvprodid:
        return f"QE ISVPRODID {report.isvprodid} is not {identity.isvprodid}"
    if _masked(report.miscselect, identity.miscselect_mask) != identity.miscselect:
        return f"QE MISCSELECT {report.miscselect.hex()} does not match {identity.miscselect.hex()} under its mask"
    if _masked(report.attributes, identity.attributes_mask) != identity.attributes:
        return f"QE ATTRIBUTES {report.attributes.hex()} do not match {identity.attributes.hex()} under their mask"
    return None


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=True))


def _covers(have: tuple[int, ...] | bytes, need: tuple[int, ...], start: int = 0) -> bool:
    return all(have[i] >= need[i] for i in range(start, len(need)))


def _module_identity(info: TcbInfo, version: int) -> ModuleIdentity | None:
    name = f"TDX_{version:02X}"
    return next((m for m in info.module_identities if m.id.upper() == name), None)


def tdx_tcb_status(info: TcbInfo, pck: PckInfo, body: TdReport, qe: IsvLevel | None) -> TcbResult:
    """The TCB status of a TD; ``qe`` is the QE's level (None without a QE identity).

    Raises EvidenceError when the TDX module does not match the TCB info (Intel:
    TDX_MODULE_MISMATCH), which is a verification failure rather than a status.
    """
    tee = body.tee_tcb_svn
    start = 2 if tee[1] > 0 else 0
    sgx_level: TcbLevel | None = None
    tdx_level: TcbLevel | None = None
    for level in info.levels:
        if _covers(pck.tcb_components, level.sgx_components) and pck.pcesvn >= level.pcesvn:
            sgx_level = sgx_level or level
            if _covers(tee, level.tdx_components, start):
                tdx_level = level
                break
    if sgx_level is None or tdx_level is None:
        which = "the PCK certificate's SGX SVNs and PCESVN" if sgx_level is None else "TEE_TCB_SVN"
        return TcbResult(NOT_SUPPORTED, (), None, f"no TCB level covers {which}")

    module, module_level = _module(info, body)
    explanation = [f"platform level {tdx_level.date} ({tdx_level.status})"]
    if module_level is not None:
        explanation.append(f"TDX module {module.id} ISVSVN {tee[0]} ({module_level.status})")
    module_status = module_level.status if module_level else "UpToDate"
    advisories = list(tdx_level.advisory_ids) + list(module_level.advisory_ids if module_level else ())
    if module_status == NOT_SUPPORTED:
        return TcbResult(NOT_SUPPORTED, (), tdx_level.date, "; ".join(explanation))

    status = _degrade(tdx_level.status, module_status)
    if status != "Revoked":
        if body.tee_tcb_svn_2 is not None:
            status = _relaunch(info, body.tee_tcb_svn_2, sgx_level.status, status, module_status, qe)
        if qe is not None:
            explanation.append(f"QE level ISVSVN {qe.isvsvn} ({qe.status})")
            advisories += qe.advisory_ids
            status = NOT_SUPPORTED if qe.status == NOT_SUPPORTED else _degrade(status, qe.status)
    return TcbResult(status, tuple(dict.fromkeys(advisories)), tdx_level.date, "; ".join(explanation))


def _module(info: TcbInfo, body: TdReport) -> tuple[ModuleIdentity, IsvLevel | None]:
    """The TDX module identity (checked against the quote) and its level (None for version 0)."""
    version, isvsvn = body.tee_tcb_svn[1], body.tee_tcb_svn[0]
    identity = _module_identity(info, version) if version else info.tdx_module
    if identity is None:
        raise EvidenceError(f"TDX module mismatch: the TCB info has no identity "
                            f"{'TDX_%02X' % version if version else 'tdxModule'} for TEE_TCB_SVN[1] = {version}")
    if body.mrsignerseam != identity.mrsigner:
        raise EvidenceError(f"TDX module mismatch: MRSIGNERSEAM {body.mrsignerseam.hex()[:16]}... is not the "
                            f"TCB info's {identity.mrsigner.hex()[:16]}...")
    if _masked(body.seam_attributes, identity.attributes_mask) != identity.attributes:
        raise EvidenceError(f"TDX module mismatch: SEAMATTRIBUTES {body.seam_attributes.hex()} do not match "
                            f"{identity.attributes.hex()} under mask {identity.attributes_mask.hex()}")
    if not version:
        return identity, None
    level = next((lv for lv in identity.levels if isvsvn >= lv.isvsvn), None)
    return identity, level or IsvLevel(isvsvn, "", NOT_SUPPORTED, ())


def _degrade(status: str, component: str) -> str:
    """Fold a module or QE status ("UpToDate", "OutOfDate", "Revoked") into the TCB status."""
    if component == "Revoked":
        return "Revoked"
    if component == "OutOfDate":
        if status in CURRENT:
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def _relaunch(info: TcbInfo, svn2: bytes, sgx_status: str, status: str, module_status: str,
              qe: IsvLevel | None) -> str:
    """TDX 1.5: advise a relaunch when only the launch-time module is out of date."""
    if qe is not None and qe.status in ("OutOfDate", "Revoked", NOT_SUPPORTED):
        return status
    if sgx_status not in CURRENT | {"ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"}:
        return status
    if status not in ("OutOfDate", "OutOfDateConfigurationNeeded") or module_status != "OutOfDate":
        return status
    latest = info.levels[0].tdx_components
    if svn2[1] == 0:
        current = svn2[0] >= latest[0]
    else:
        identity = _module_identity(info, svn2[1])
        if identity is None:
            raise EvidenceError(f"TDX module mismatch: the TCB info has no identity TDX_{svn2[1]:02X} for "
                                "the running module (TEE_TCB_SVN_2)")
        if not identity.levels:
            return NOT_SUPPORTED
        current = svn2[0] >= identity.levels[0].isvsvn
    if not (current and svn2[2] >= latest[2]):
        return status
    configuration = sgx_status in CONFIGURATION or status in CONFIGURATION
    return "TDRelaunchAdvisedConfigurationNeeded" if configuration else "TDRelaunchAdvised"
