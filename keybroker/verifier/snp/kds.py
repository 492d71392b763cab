"""AMD Key Distribution Service: VCEKs, the ASK/ASVK + ARK chains and the ARKs' CRLs, cached on disk.

Used only when neither the host's certificate table nor the operator's folders hold what is
needed, and only for a report whose binding already checked. Answers are cached under
``cache_dir/kds``; the fetcher bounds, paces and remembers failures (``..fetch``).

    {kds}/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]
    {kds}/vcek/v1/{product}/cert_chain        ASK + ARK (PEM)
    {kds}/vlek/v1/{product}/cert_chain        ASVK + ARK (PEM)
    {kds}/vcek/v1/{product}/crl               the ARK's CRL of ASKs (DER); vlek/...: of ASVKs

A VLEK cannot be fetched by chip: it must come from the host or the operator. Certificates
are kept for good (they are the same bytes for their lifetime); a CRL is asked for again
once its next update is due, and a CRL that KDS serves past its next update is kept for an
hour (``fetch.kept_lately``) before KDS is asked again; one older than the cached CRL (by its
last update) does not replace it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509

from ...errors import EvidenceError
from ..certs import crl_signed_by_rsa_pss_sha384, load_certs, load_crl
from ..core import Context
from ..fetch import WouldFetch, kept_lately, refresh_lock
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
    # v2 reports carry no CPUID; they predate Turin, so the product is Milan or Genoa. A VCEK found
    # under a product names it; a VLEK, which KDS does not serve, does not: both chains then.
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
        if found and kind == "vcek":
            break
    return certs


def _get(context: Context, path: str) -> list[x509.Certificate]:
    cache = _cache_file(context.fetcher.cache_dir, path)
    kept = _read_cache(cache)
    if kept is not None:
        with contextlib.suppress(EvidenceError):  # damaged (left empty by a crash, say): fetched again
            return load_certs(kept)
    assert context.kds_url is not None
    answer = context.fetcher.get(f"{context.kds_url.rstrip('/')}/{path}", service="AMD KDS", limit=RESPONSE_MAX,
                                 missing_ok=True)
    if answer is None:
        return []
    certs = load_certs(answer.body)
    if cache is not None:
        _keep(cache, answer.body)
    return certs


def fetch_crl(kind: str, product: str, ark: x509.Certificate,
              context: Context) -> x509.CertificateRevocationList | None:
    """The CRL ``ark`` signs for ``product``'s ``kind`` intermediates: the cached one while its next
    update is ahead, else KDS's (None when KDS has none). What is not signed by ``ark`` is neither
    used nor kept. When KDS cannot be asked, a cached CRL past its next update is still used (the
    check says how old it is); without one, the EvidenceError says why."""
    path = f"{kind}/v1/{product}/crl"
    cache = _cache_file(context.fetcher.cache_dir, path)
    kept, current = _kept_crl(cache, ark)
    if current:
        return kept
    assert context.kds_url is not None
    url = f"{context.kds_url.rstrip('/')}/{path}"
    lock = refresh_lock(url)
    # The offline view runs on the key server's event loop: it does not wait for another refresh;
    # online, a wait is as long as a fetch may be (a queue of fetches that cannot be kept, each
    # as long, must not hold every attestation behind it).
    online = context.fetcher.online
    if not (lock.acquire(timeout=context.fetcher.budget) if online else lock.acquire(blocking=False)):
        if not online:
            raise WouldFetch(url)
        if kept is not None:
            return kept
        raise EvidenceError(f"AMD KDS: another fetch of {url} did not end within {context.fetcher.budget:g} s")
    try:
        kept, current = _kept_crl(cache, ark)  # another thread may have refreshed it while this one waited
        if current:
            return kept
        return _ask_crl(url, cache, kept, product, ark, context)
    finally:
        lock.release()


def _ask_crl(url: str, cache: Path | None, kept: x509.CertificateRevocationList | None, product: str,
             ark: x509.Certificate, context: Context) -> x509.CertificateRevocationList | None:
    try:
        answer = context.fetcher.get(url, service="AMD KDS", limit=RESPONSE_MAX, missing_ok=True)
        if answer is None:
            return kept
        try:
            crl = load_crl(answer.body)
        except EvidenceError as exc:
            raise context.fetcher.refuse(url, f"AMD KDS: {url}: {exc}") from None
        if not crl_signed_by_rsa_pss_sha384(crl, ark):
            raise context.fetcher.refuse(url, f"AMD KDS: the CRL at {url} is not signed by the ARK of {product}")
    except EvidenceError:
        if kept is not None:
            return kept
        raise
    if kept is not None and cache is not None and crl.last_update_utc < kept.last_update_utc:
        # Older than what KDS served before: a replay (a MITM, a lagging mirror) of a CRL from
        # before a revocation. The newer one stays, rechecked an hour later as if KDS had
        # served it again.
        with contextlib.suppress(OSError):
            os.utime(cache)
        return kept
    if cache is not None:
        _keep(cache, answer.body)
    return crl


def _kept_crl(cache: Path | None, ark: x509.Certificate) -> tuple[x509.CertificateRevocationList | None, bool]:
    """The cached CRL of ``ark`` (None: none, or none it signed), and whether it serves without asking KDS."""
    data = _read_cache(cache)
    if cache is None or data is None:
        return None, False
    try:
        crl = load_crl(data)
    except EvidenceError:
        return None, False
    if not crl_signed_by_rsa_pss_sha384(crl, ark):
        return None, False
    return crl, _current(crl, cache)


def _read_cache(cache: Path | None) -> bytes | None:
    """The bytes of the cached answer ``cache``; None when there is none that KDS could have given: a
    missing file, or what is no regular file or is larger than an answer (the key server reads the
    cache on its event loop: a FIFO must not block it, nor a link to a device fill its memory)."""
    if cache is None:
        return None
    try:
        fd = os.open(cache, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > RESPONSE_MAX:
            return None
        data = b""
        while chunk := os.read(fd, RESPONSE_MAX + 1 - len(data)):
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= RESPONSE_MAX else None


def _current(crl: x509.CertificateRevocationList, cache: Path) -> bool:
    """Whether the cached ``crl`` serves without asking KDS: its next update is ahead, or KDS
    itself served it past that lately."""
    due = crl.next_update_utc
    if due is not None and due > dt.datetime.now(dt.UTC):
        return True
    with contextlib.suppress(OSError):
        return kept_lately(cache.stat().st_mtime)
    return False


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
