"""Intel PCS / PCCS: TDX collateral for a platform (FMSPC), cached on disk.

Used only when no collateral folder is given. Intel's Provisioning Certification Service
(``https://api.trustedservices.intel.com``) and a local caching service (PCCS) share the
v4 paths; the issuer chains travel in HTTP headers (URL-encoded PEM):

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
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import EvidenceError
from .collateral import Collateral, load_crl, load_folder

if TYPE_CHECKING:
    from . import Context

TIMEOUT = 10.0
RESPONSE_MAX = 1024 * 1024
RETRY_AFTER_MAX = 5.0  # seconds: a verifier must not stall a key request for long


def fetch_collateral(context: "Context", fmspc: bytes, ca: str) -> Collateral:
    """The collateral for ``fmspc`` (PCK CRL of ``ca``), from the cache or the service."""
    assert context.pcs_url is not None and ca in ("platform", "processor")
    if context.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="keybroker-pcs-") as tmp:
            _fetch_into(context.pcs_url, fmspc, ca, Path(tmp))
            return load_folder(Path(tmp))
    folder = context.cache_dir / "pcs" / f"{fmspc.hex()}-{ca}"
    if folder.is_dir():
        cached = load_folder(folder)
        if all(when is not None and when > context.at for _, when in cached.next_updates()):
            return cached
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=_mkdirs(folder.parent)))
    try:
        _fetch_into(context.pcs_url, fmspc, ca, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_folder(folder)


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _fetch_into(base: str, fmspc: bytes, ca: str, folder: Path) -> None:
    base = base.rstrip("/")
    tcb, tcb_chain = _get(f"{base}/tdx/certification/v4/tcb?fmspc={fmspc.hex()}", "TCB-Info-Issuer-Chain")
    qe, qe_chain = _get(f"{base}/tdx/certification/v4/qe/identity", "SGX-Enclave-Identity-Issuer-Chain")
    crl, crl_chain = _get(f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", "SGX-PCK-CRL-Issuer-Chain")
    files = {"tcbinfo.json": tcb, "tcb_info_issuer_chain.pem": tcb_chain, "qe_identity.json": qe,
             "qe_identity_issuer_chain.pem": qe_chain, "pck_crl.der": _der_crl(crl),
             "pck_crl_issuer_chain.pem": crl_chain}
    root_crl = _get_optional(f"{base}/sgx/certification/v4/rootcacrl")
    if root_crl is not None:
        files["root_crl.der"] = _der_crl(root_crl)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _der_crl(data: bytes) -> bytes:
    return load_crl(data).public_bytes(Encoding.DER)


def _get(url: str, chain_header: str) -> tuple[bytes, bytes]:
    response, body = _request(url)
    if response.status_code != 200:
        raise EvidenceError(f"Intel PCS answered HTTP {response.status_code} for {url}")
    chain = response.headers.get(chain_header)
    if not chain:
        raise EvidenceError(f"Intel PCS answer for {url} lacks the {chain_header} header")
    return body, urllib.parse.unquote(chain).encode()


def _get_optional(url: str) -> bytes | None:
    response, body = _request(url)
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise EvidenceError(f"Intel PCS answered HTTP {response.status_code} for {url}")
    return body


def _request(url: str) -> tuple[requests.Response, bytes]:
    """GET with a size cap; one HTTP 429 is waited out (Retry-After, bounded)."""
    response, body = _get_once(url)
    if response.status_code == 429:
        retry = response.headers.get("Retry-After", "")
        time.sleep(min(float(retry), RETRY_AFTER_MAX) if retry.strip().isdigit() else 1.0)
        response, body = _get_once(url)
    return response, body


def _get_once(url: str) -> tuple[requests.Response, bytes]:
    try:
        response = requests.get(url, timeout=TIMEOUT, stream=True)
        body = response.raw.read(RESPONSE_MAX + 1, decode_content=True)
    except requests.RequestException as exc:
        raise EvidenceError(f"cannot fetch {url} from Intel PCS: {exc}") from None
    if len(body) > RESPONSE_MAX:
        raise EvidenceError(f"Intel PCS answer for {url} is larger than {RESPONSE_MAX} bytes")
    return response, body
