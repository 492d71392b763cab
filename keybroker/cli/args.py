"""Argument types and options that several commands share."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..verifier import Context, Evidence  # imported by the functions too: only commands that verify load it
    from ..wire.initdata import InitData

EVIDENCE_FILE_MAX = 16 * 1024 * 1024


def hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hexadecimal: {text!r}") from None


def rfc3339(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone (e.g. 2025-06-01T00:00:00Z)")
    return when


def listen(text: str) -> tuple[str, int]:
    from ..errors import KeybrokerError
    from ..server.config import parse_listen

    try:
        return parse_listen(text)
    except KeybrokerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def audit_head(text: str) -> tuple[int, str]:
    """SEQ:HASH, as ``keybroker audit head`` prints it."""
    import re

    match = re.fullmatch(r"([0-9]{1,18}):([0-9a-f]{64})", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected SEQ:HASH as 'keybroker audit head' prints it, got {text[:80]!r}")
    return int(match[1]), match[2]


def add_evidence_options(p: argparse.ArgumentParser) -> None:
    """Where a verifier finds trust anchors, certificates and collateral, and at which time."""
    p.add_argument("--trust-roots", type=Path, action="append", default=[], metavar="DIR",
                   help="extra trust anchors (root certificates, CCA platform keys, legacy SEV ARK/ASK .cert files)")
    p.add_argument("--trust-cpak", type=Path, metavar="FILE", help="a CCA platform key to trust (PEM or JWK)")
    p.add_argument("--certs", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of PEM/DER certificates to use (VCEK/VLEK, ASK/ASVK, ARK; PCK chains; "
                        "legacy SEV ask_ark .cert files) and AMD's CRLs (.crl)")
    p.add_argument("--collateral", type=Path, metavar="DIR",
                   help="TDX collateral folder: TCB info, QE identity, CRLs, TCB signing chain")
    p.add_argument("--at", type=rfc3339, metavar="RFC3339", help="check certificate validity at this time")
    p.add_argument("--kds-url", help="AMD KDS base URL to fetch missing VCEKs and chains and the ARKs' CRLs from "
                                     "(e.g. https://kdsintf.amd.com); default: no fetching")
    p.add_argument("--pcs-url", help="Intel PCS/PCCS base URL to fetch TDX collateral from; default: no fetching")
    p.add_argument("--cache-dir", type=Path, help="cache for fetched certificates and collateral")
    p.add_argument("--init-data", type=Path, metavar="FILE",
                   help="the guest's init-data (TOML): check that the host bound its digest at launch "
                        "(SEV-SNP HOST_DATA, TDX MRCONFIGID, CCA personalization value)")


def verification_context(args: argparse.Namespace, report_data: bytes | None = None) -> Context:
    """The verifier's context from the options of :func:`add_evidence_options`."""
    from ..verifier import Context, Fetcher, TrustStore

    trust = TrustStore.default().with_dirs(args.trust_roots)
    if args.trust_cpak:
        trust = trust.with_cpak_file(args.trust_cpak)
    init_data = read_init_data(args.init_data).digest if args.init_data else None
    return Context(trust=trust, at=args.at or dt.datetime.now(dt.UTC), report_data=report_data, init_data=init_data,
                   certs=tuple(args.certs), collateral=args.collateral, kds_url=args.kds_url, pcs_url=args.pcs_url,
                   fetcher=Fetcher(args.cache_dir))


def read_init_data(path: Path) -> InitData:
    """The init-data document in ``path``, hashed over its bytes as they are in the file: the host
    hashed those (a text read would turn CRLF line ends into LF, and the digest into another)."""
    from ..errors import EvidenceError
    from ..files import read_bounded
    from ..wire import initdata

    raw = read_bounded(path, initdata.BODY_MAX, "init-data", EvidenceError)
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceError(f"init-data {path} is not UTF-8 text (byte {exc.start}); TOML is") from None
    return initdata.parse(body)


def load_evidence(path: Path, provider: str | None = None) -> Evidence:
    """Evidence from a file: an envelope, Trustee's evidence form (JSON), or a raw report, quote or token."""
    from ..errors import EvidenceError
    from ..files import read_bounded
    from ..verifier import Evidence, guess_provider
    from ..wire import envelope, parse_json, trustee

    data = read_bounded(path, EVIDENCE_FILE_MAX, "evidence", EvidenceError)
    if data[:1] == b"{":
        try:
            obj = parse_json(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EvidenceError(f"{path} is not valid JSON: {exc}") from None
        tee = trustee.tee_of(obj)
        if tee is None:
            evidence = Evidence.from_report(envelope.from_json(obj))
        else:
            blobs = trustee.from_json(tee, obj)
            evidence = Evidence(blobs.provider, blobs.outblob, blobs.auxblob, event_log=blobs.event_log)
        if provider and provider != evidence.provider:
            raise EvidenceError(f"{path} is evidence from {evidence.provider}, not {provider}")
        return evidence
    guessed = provider or guess_provider(data)
    if guessed is None:
        raise EvidenceError(f"cannot tell the provider of the raw blob in {path}; give --provider")
    return Evidence(guessed, data)
