"""Intel PCS / PCCS: TDX collateral for a platform (FMSPC), cached on disk.

Used only when no collateral folder is given, through the fetcher (``..fetch``). Intel's
Provisioning Certification Service (``https://api.trustedservices.intel.com``) and a local
caching service (PCCS) share the v4 paths; the issuer chains travel in HTTP headers
(URL-encoded PEM):

    {pcs}/tdx/certification/v4/tcb?fmspc=<hex>                TCB-Info-Issuer-Chain
    {pcs}/tdx/certification/v4/qe/identity                    SGX-Enclave-Identity-Issuer-Chain
    {pcs}/sgx/certification/v4/pckcrl?ca=<platform|processor>&encoding=der
                                                              SGX-PCK-CRL-Issuer-Chain
    {pcs}/sgx/certification/v4/rootcacrl                      (PCCS only; skipped when absent)

Answers are written as a collateral folder (``cache_dir/pcs/<fmspc>-<ca>/``) and read back
with ``collateral.load_folder``, so fetched and offline collateral take one path. A cached
folder is reused until one of its documents passes its ``nextUpdate``. Nothing fetched is
trusted for being fetched: the signature checks under the pinned root decide.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.parse
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from ...errors import EvidenceError
from ..core import Context
from ..fetch import Fetcher
from .collateral import Collateral, load_crl, load_folder

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
    if folder.is_dir():
        cached = load_folder(folder)
        if all(when is not None and when > context.at for _, when in cached.next_updates()):
            return cached
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=_mkdirs(folder.parent)))
    try:
        _fetch_into(fetcher, context.pcs_url, fmspc, ca, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_folder(folder)


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
    chain = answer.headers.get(chain_header)
    if not chain:
        raise EvidenceError(f"Intel PCS answer for {url} lacks the {chain_header} header")
    return answer.body, urllib.parse.unquote(chain).encode()
