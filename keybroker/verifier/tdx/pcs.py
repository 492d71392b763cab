"""Intel PCS / PCCS: TDX collateral for a platform (FMSPC), cached on disk.

Used only when no collateral folder is given, through the fetcher (``..fetch``). Intel's
Provisioning Certification Service (``https://api.trustedservices.intel.com``) and a local
caching service (PCCS) share the v4 paths; the issuer chains travel in HTTP headers
(URL-encoded PEM; their names are matched in any case, as HTTP/2 sends them in lower case):

    {pcs}/tdx/certification/v4/tcb?fmspc=<hex>                TCB-Info-Issuer-Chain
    {pcs}/tdx/certification/v4/qe/identity                    SGX-Enclave-Identity-Issuer-Chain
    {pcs}/sgx/certification/v4/pckcrl?ca=<platform|processor>&encoding=der
                                                              SGX-PCK-CRL-Issuer-Chain
    {pcs}/sgx/certification/v4/rootcacrl                      (PCCS only; skipped when absent)

Answers are written as a collateral folder (``cache_dir/pcs/<fmspc>-<ca>/``) and read back
with ``collateral.load_folder``, so fetched and offline collateral take one path. A cached
folder is reused until one of its documents passes its ``nextUpdate``; one that the service
served already past it is reused for an hour (``fetch.kept_lately``; the verdict's ``tdx.collateral_expired``
says so), not fetched again for every attestation. Nothing fetched is trusted for being
fetched: the signature checks under the pinned root decide.

Concurrent attestations (threads, and forked server workers sharing the cache) refresh a
stale folder without tripping over one another: in a process one refresh per folder runs at
a time (the others wait, then read what it published); a refresh is fetched into a private
folder and loaded from there before it is published, with renames only (as the KDS cache
publishes its files); a cached folder that cannot be read, or was replaced while it was read
(by another process), or is damaged, is fetched again, and a cache that cannot be written is an
EvidenceError naming it, a verdict rather than a crash.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from ...errors import EvidenceError
from ..certs import load_crl
from ..core import Context
from ..fetch import Fetcher, WouldFetch, kept_lately, refresh_lock
from .collateral import Collateral, load_folder

RESPONSE_MAX = 1024 * 1024


def fetch_collateral(context: Context, fmspc: bytes, ca: str) -> Collateral:
    """The collateral for ``fmspc`` (PCK CRL of ``ca``), from the cache or the service."""
    assert context.pcs_url is not None and ca in ("platform", "processor")
    fetcher = context.fetcher
    if fetcher.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="keybroker-pcs-") as scratch:
            _fetch_into(fetcher, context.pcs_url, fmspc, ca, Path(scratch))
            return load_folder(Path(scratch))
    folder = fetcher.cache_dir / "pcs" / f"{fmspc.hex()}-{ca}"
    try:
        return _cached_or_refreshed(fetcher, context.pcs_url, fmspc, ca, folder, context.at)
    except OSError as exc:  # what escaped verify() would be a 500, not a verdict
        raise EvidenceError(f"cannot keep TDX collateral in {folder}: {exc.strerror or exc}") from None


def _cached_or_refreshed(fetcher: Fetcher, base: str, fmspc: bytes, ca: str, folder: Path,
                         at: dt.datetime) -> Collateral:
    cached = _cached(folder, at)
    if cached is not None:
        return cached
    lock = refresh_lock(str(folder))
    # The offline view runs on the key server's event loop: it must not wait for a refresh, and
    # it never publishes one (its first fetch raises WouldFetch or a remembered failure).
    if not lock.acquire(blocking=fetcher.online):
        raise WouldFetch(str(folder))
    try:
        cached = _cached(folder, at)  # another thread may have refreshed it while this one waited
        return cached if cached is not None else _refresh(fetcher, base, fmspc, ca, folder)
    finally:
        lock.release()


def _cached(folder: Path, at: dt.datetime) -> Collateral | None:
    """The cached collateral if every document in it is still current at ``at`` or it was fetched
    lately (``kept_lately``); None when it is missing, stale or cannot be read. Another
    process may be replacing the folder while it is read, and a damaged folder would otherwise
    fail every attestation until someone removes it: either way the collateral is fetched again,
    and its signatures decide as always."""
    if not folder.is_dir():
        return None
    try:
        before = os.stat(folder)
        cached = load_folder(folder)
        after = os.stat(folder)
    except (OSError, EvidenceError):
        return None
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        # Replaced while it was read: the listing may have come from the old folder while another
        # process deleted its files (set aside by _publish), and the files from the new one, so that
        # collateral with documents missing loaded without an error.
        return None
    if all(when is not None and when > at for _, when in cached.next_updates()):
        return cached
    return cached if kept_lately(after.st_mtime) else None  # served stale: asked again later


def _refresh(fetcher: Fetcher, base: str, fmspc: bytes, ca: str, folder: Path) -> Collateral:
    """Fetch into a private folder, load it, then publish it as ``folder``. What is returned was
    loaded before publishing, so it does not depend on a folder another process may replace."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=_mkdirs(folder.parent)))
    try:
        _fetch_into(fetcher, base, fmspc, ca, tmp)
        fetched = load_folder(tmp)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(fetched, source=str(folder))


def _publish(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``folder`` with renames, each atomic, so that
    ``folder`` never names a half-written or half-deleted folder. The old folder is first moved
    aside (a rename cannot replace a folder that has files; a reader in the middle of it may miss
    a file, and fetches again). When another process publishes its own in between, the rename
    fails with ENOTEMPTY or EEXIST: that folder, as fresh as this one, is kept."""
    aside = tmp.with_name(f"{tmp.name}.old")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _fetch_into(fetcher: Fetcher, base: str, fmspc: bytes, ca: str, folder: Path) -> None:
    base = base.rstrip("/")
    tcb, tcb_chain = _get(fetcher, f"{base}/tdx/certification/v4/tcb?fmspc={fmspc.hex()}", "TCB-Info-Issuer-Chain")
    qe, qe_chain = _get(fetcher, f"{base}/tdx/certification/v4/qe/identity", "SGX-Enclave-Identity-Issuer-Chain")
    crl, crl_chain = _get(fetcher, f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
                          "SGX-PCK-CRL-Issuer-Chain")
    files = {"tcbinfo.json": tcb, "tcb_info_issuer_chain.pem": tcb_chain, "qe_identity.json": qe,
             "qe_identity_issuer_chain.pem": qe_chain, "pck_crl.der": _der_crl(crl),
             "pck_crl_issuer_chain.pem": crl_chain}
    root_crl = fetcher.get(f"{base}/sgx/certification/v4/rootcacrl", service="Intel PCS", limit=RESPONSE_MAX,
                           missing_ok=True)
    if root_crl is not None:
        files["root_crl.der"] = _der_crl(root_crl.body)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _der_crl(data: bytes) -> bytes:
    return load_crl(data).public_bytes(Encoding.DER)


def _get(fetcher: Fetcher, url: str, chain_header: str) -> tuple[bytes, bytes]:
    answer = fetcher.get(url, service="Intel PCS", limit=RESPONSE_MAX)
    assert answer is not None
    chain = answer.header(chain_header)
    if not chain:
        raise EvidenceError(f"Intel PCS answer for {url} lacks the {chain_header} header")
    return answer.body, urllib.parse.unquote(chain).encode()
