"""AMD Key Distribution Service: VCEKs and the ASK/ASVK + ARK chains, cached on disk.

Used only when neither the host's certificate table nor the operator's folders hold the
certificates. The KDS is rate-limited (HTTP 429): answers are cached under
``cache_dir/kds`` and a 429 is waited out (honouring Retry-After, within bounds).
Nothing fetched is trusted for being fetched: the chain checks and the pinned ARK decide.

    {kds}/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]
    {kds}/vcek/v1/{product}/cert_chain        ASK + ARK (PEM)
    {kds}/vlek/v1/{product}/cert_chain        ASVK + ARK (PEM)

A VLEK cannot be fetched by chip: it must come from the host or the operator.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from cryptography import x509

from ..errors import EvidenceError
from .certs import load_certs

if TYPE_CHECKING:
    from . import Context
    from .snp import Report

AMD_KDS = "https://kdsintf.amd.com"
ATTEMPTS = 3
RETRY_AFTER_MAX = 5.0  # seconds: a verifier must not stall a key request for long
TIMEOUT = 10.0
RESPONSE_MAX = 64 * 1024


def vcek_path(report: "Report", product: str) -> str:
    """The KDS path (and query) of the VCEK that signed ``report``."""
    tcb = report.reported_tcb
    query = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if tcb.fmc is not None:
        query += f"&fmcSPL={tcb.fmc}"
    return f"vcek/v1/{product}/{report.significant_chip_id.hex()}?{query}"


def fetch_chain(report: "Report", kind: str, context: "Context") -> list[x509.Certificate]:
    """Whatever the KDS has for this report: its VCEK (not for VLEKs) and the chain above it."""
    assert context.kds_url is not None
    # v2 reports carry no CPUID; they predate Turin, so the product is Milan or Genoa.
    products = [report.cpuid_product] if report.cpuid_product else ["Milan", "Genoa"]
    certs: list[x509.Certificate] = []
    for product in products:
        found = []
        if kind == "vcek" and any(report.chip_id):
            found += _get(context, vcek_path(report, product))
        if kind == "vcek" and not found:
            continue
        found += _get(context, f"{kind}/v1/{product}/cert_chain")
        certs += found
        if found:
            break
    return certs


def _get(context: "Context", path: str) -> list[x509.Certificate]:
    cache = _cache_file(context.cache_dir, path)
    if cache is not None and cache.is_file():
        return load_certs(cache.read_bytes())
    url = f"{context.kds_url.rstrip('/')}/{path}"  # type: ignore[union-attr]
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = requests.get(url, timeout=TIMEOUT, stream=True)
            body = response.raw.read(RESPONSE_MAX + 1, decode_content=True)
        except requests.RequestException as exc:
            raise EvidenceError(f"cannot fetch {url} from AMD KDS: {exc}") from None
        if response.status_code == 429 and attempt < ATTEMPTS:
            time.sleep(_retry_after(response.headers.get("Retry-After"), attempt))
            continue
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise EvidenceError(f"AMD KDS answered HTTP {response.status_code} for {url}")
        if len(body) > RESPONSE_MAX:
            raise EvidenceError(f"AMD KDS answer for {url} is larger than {RESPONSE_MAX} bytes")
        certs = load_certs(body)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_bytes(body)
            tmp.replace(cache)
        return certs
    raise EvidenceError(f"AMD KDS kept answering 429 (rate limited) for {url}")


def _retry_after(header: str | None, attempt: int) -> float:
    if header is not None and header.strip().isdigit():
        return min(float(header), RETRY_AFTER_MAX)
    return min(0.5 * 2 ** attempt, RETRY_AFTER_MAX)


def _cache_file(cache_dir: Path | None, path: str) -> Path | None:
    if cache_dir is None:
        return None
    # The path comes from the report's own fields (hex, integers) and fixed words only.
    name = path.replace("?", "_").replace("&", "_").replace("=", "-")
    return cache_dir / "kds" / name
