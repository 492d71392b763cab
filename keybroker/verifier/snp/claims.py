"""AMD SEV-SNP, appraised: a parsed report (and SVSM manifest) as flat claims for the release policy."""

from __future__ import annotations

from typing import Any

from ...errors import EvidenceError
from .abi import GUID_SVSM_VTPM, Report, parse_services_manifest

POLICY_BITS = {"smt": 16, "migrate_ma": 18, "debug": 19, "single_socket": 20, "cxl_allow": 21,
               "mem_aes_256_xts": 22, "rapl_dis": 23, "ciphertext_hiding_dram": 24, "page_swap_disable": 25}
PLATFORM_BITS = {"smt_en": 0, "tsme_en": 1, "ecc_en": 2, "rapl_dis": 3, "ciphertext_hiding_dram_en": 4,
                 "alias_check_complete": 5, "iommu_write_safe": 6, "tio_en": 7}


def claims(report: Report, product: str | None) -> dict[str, Any]:
    """The report as flat claims for the release policy."""
    c: dict[str, Any] = {
        "tee": "snp", "provider": "sev_guest",
        "debug": bool(report.policy >> 19 & 1),
        "measurement": report.measurement.hex(),
        "snp.version": report.version,
        "snp.product": product,
        "snp.vmpl": report.vmpl,
        "snp.guest_svn": report.guest_svn,
        "snp.policy": report.policy,
        "snp.policy.abi_major": report.policy >> 8 & 0xFF,
        "snp.policy.abi_minor": report.policy & 0xFF,
        "snp.platform_info": report.platform_info,
        "snp.signing_key": {0: "vcek", 1: "vlek"}.get(report.signing_key, "none"),
        "snp.author_key_en": bool(report.signer_info & 1),
        "snp.mask_chip_key": bool(report.signer_info >> 1 & 1),
        "snp.measurement": report.measurement.hex(),
        "snp.host_data": report.host_data.hex(),
        "snp.id_key_digest": report.id_key_digest.hex(),
        "snp.author_key_digest": report.author_key_digest.hex(),
        "snp.family_id": report.family_id.hex(),
        "snp.image_id": report.image_id.hex(),
        "snp.report_id": report.report_id.hex(),
        "snp.report_id_ma": report.report_id_ma.hex(),
        "snp.chip_id": report.chip_id.hex(),
        "snp.report_data": report.report_data.hex(),
        "snp.firmware.current": "%d.%d.%d" % report.current_version,
        "snp.firmware.committed": "%d.%d.%d" % report.committed_version,
    }
    for name, bit in POLICY_BITS.items():
        c[f"snp.policy.{name}"] = bool(report.policy >> bit & 1)
    for name, bit in PLATFORM_BITS.items():
        c[f"snp.platform_info.{name}"] = bool(report.platform_info >> bit & 1)
    for which in ("reported_tcb", "current_tcb", "committed_tcb", "launch_tcb"):
        for part, value in getattr(report, which).as_dict().items():
            c[f"snp.{which}.{part}"] = value
    if report.cpuid:
        c["snp.cpuid"] = "%02x/%02x/%02x" % report.cpuid
    if report.launch_mit_vector is not None:
        c["snp.launch_mit_vector"] = report.launch_mit_vector
        c["snp.current_mit_vector"] = report.current_mit_vector
    return c


def manifest_claims(manifest: bytes) -> dict[str, Any]:
    """What the SVSM manifest bound into REPORT_DATA says: only signed bytes name a service.

    An "all services" manifest carries its own GUID table, and each service's part becomes a
    claim. A single service's manifest does not say whose it is (the envelope's
    service_guid is the guest's request, which no signature covers): it is a claim only as
    raw bytes, ``snp.svsm.manifest``.
    """
    c: dict[str, Any] = {"snp.svsm.manifest": manifest.hex()}
    try:
        services = parse_services_manifest(manifest)
    except EvidenceError:
        return c
    c["snp.svsm.services"] = sorted(str(g) for g in services)
    ek = services.get(GUID_SVSM_VTPM)
    if ek is not None:
        c["snp.svsm.vtpm.ek_public"] = ek.hex()  # TPMT_PUBLIC of the vTPM endorsement key
    return c
