"""AMD Key Distribution Service: VCEKs and the ASK/ASVK + ARK chains, cached on disk.

Used only when neither the host's certificate table nor the operator's folders hold the
certificates, and only for a report whose binding already checked. Answers are cached
under ``cache_dir/kds``; the fetcher bounds, paces and remembers failures (``..fetch``).

    {kds}/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]
    {kds}/vcek/v1/{product}/cert_chain        ASK + ARK (PEM)
    {kds}/vlek/v1/{product}/cert_chain        ASVK + ARK (PEM)

A VLEK cannot be fetched by chip: it must come from the host or the operator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from cryptography import x509

from ..certs import load_certs
from ..core import Context
from .abi import Report

log = logging.getLogger("keybroker.verifier")

AMD_KDS = "https://kdsintf.amd.com"
RESPONSE_MAX = 64 * 1024


def vcek_path(report: Report, product: str) -> str:
    """The KDS path (and query) of the VCEK that signed ``report``."""
    tcb = report.reported_tcb
    query = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if tcb.fmc is not None:
        query += f"&fmcSPL={tcb.fmc}"
    return f"vcek/v1/{product}/{report.significant_chip_id.hex()}?{query}"


def fetch_chain(report: Report, kind: str, context: Context) -> list[x509.Certificate]:
    """Whatever the KDS has for this report: its VCEK (not for VLEKs) and the chain above it."""
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


def _get(context: Context, path: str) -> list[x509.Certificate]:
    cache = _cache_file(context.fetcher.cache_dir, path)
    if cache is not None and cache.is_file():
        return load_certs(cache.read_bytes())
    assert context.kds_url is not None
    answer = context.fetcher.get(f"{context.kds_url.rstrip('/')}/{path}", service="AMD KDS", limit=RESPONSE_MAX,
                                 missing_ok=True)
    if answer is None:
        return []
    certs = load_certs(answer.body)
    if cache is not None:
        _keep(cache, answer.body)
    return certs


def _keep(cache: Path, body: bytes) -> None:
    """Remember what KDS answered, whole or not at all (a file of its own, renamed into place: threads
    and workers fetch side by side). Best effort: a cache that cannot be written costs a fetch later."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("cannot keep %s in the cache: %s", cache.name, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _cache_file(cache_dir: Path | None, path: str) -> Path | None:
    if cache_dir is None:
        return None
    # The path comes from the report's own fields (hex, integers) and fixed words only.
    name = path.replace("?", "_").replace("&", "_").replace("=", "-")
    return cache_dir / "kds" / name
