"""Intel TDX, appraised: a parsed quote and its PCK certificate as flat claims for the release policy."""

from __future__ import annotations

from typing import Any

from ..certs import subject_cn
from .abi import Quote
from .pck import PckChain, PckInfo

TD_ATTRIBUTE_BITS = {"debug": 0, "sept_ve_disable": 28, "migratable": 29, "pks": 30, "kl": 31, "perfmon": 63}
TUD_MASK = 0xFF  # bits 0-7, the "TD under debug" group


def claims(quote: Quote) -> dict[str, Any]:
    """The quote as flat claims for the release policy."""
    b = quote.body
    attributes = b.td_attributes_value
    c: dict[str, Any] = {
        "tee": "tdx", "provider": "tdx_guest",
        "debug": bool(attributes & TUD_MASK),
        "measurement": b.mrtd.hex(),
        "tdx.quote_version": quote.version,
        "tdx.body_type": quote.body_type,
        "tdx.mrtd": b.mrtd.hex(),
        "tdx.mrconfigid": b.mrconfigid.hex(),
        "tdx.mrowner": b.mrowner.hex(),
        "tdx.mrownerconfig": b.mrownerconfig.hex(),
        "tdx.tdattributes": b.td_attributes.hex(),
        "tdx.xfam": b.xfam.hex(),
        "tdx.tee_tcb_svn": b.tee_tcb_svn.hex(),
        "tdx.mrseam": b.mrseam.hex(),
        "tdx.mrsignerseam": b.mrsignerseam.hex(),
        "tdx.seamattributes": b.seam_attributes.hex(),
        "tdx.report_data": b.report_data.hex(),
        "tdx.qe.isvsvn": quote.qe_report.isvsvn,
    }
    for i, rtmr in enumerate(b.rtmrs):
        c[f"tdx.rtmr{i}"] = rtmr.hex()
    for name, bit in TD_ATTRIBUTE_BITS.items():
        c[f"tdx.tdattributes.{name}"] = bool(attributes >> bit & 1)
    if b.tee_tcb_svn_2 is not None:
        c["tdx.tee_tcb_svn_2"] = b.tee_tcb_svn_2.hex()
        c["tdx.mrservicetd"] = b.mrservicetd.hex()  # type: ignore[union-attr]
    return c


def pck_claims(info: PckInfo, chain: PckChain) -> dict[str, Any]:
    c: dict[str, Any] = {"tdx.fmspc": info.fmspc.hex(), "tdx.pce_id": info.pce_id.hex(), "tdx.pcesvn": info.pcesvn,
                         "tdx.pck_ca": chain.ca_kind or subject_cn(chain.ca)}
    if info.platform_instance_id is not None:
        c["tdx.platform_instance_id"] = info.platform_instance_id.hex()
    for name, on in (info.configuration or {}).items():
        c[f"tdx.platform.{name}"] = on
    return c
