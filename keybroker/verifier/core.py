"""What every verifier shares: the evidence it gets, how it records checks, the verdict, freshness.

A provider's verifier parses the vendor blob (its ``abi``), records named checks in a
:class:`Checks` (a failure stops verification: later checks depend on it), and appraises
the parsed record into flat claims for the release policy. :func:`keybroker.verifier.verify`
runs one and turns what it recorded into a :class:`Verdict`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..wire.envelope import TsmReport
from .fetch import Fetcher
from .trust import TrustStore

#: The configfs-tsm providers keybroker verifies (and the emulator emulates).
TSM_PROVIDERS = ("sev_guest", "tdx_guest", "arm_cca_guest")
#: Every provider keybroker verifies: the configfs-tsm ones and SEV/SEV-ES evidence from the
#: host's Attestation Evidence Broker (no guest-side report exists before SNP).
PROVIDERS = (*TSM_PROVIDERS, "sev_aeb")


@dataclass(frozen=True)
class Evidence:
    """What a verifier gets: the provider's blobs and, from an envelope, the inblob.

    The envelope's other attributes (generation, privlevel, the service_* options the guest
    wrote) are what the guest asked for, covered by no signature: no claim comes from them.
    ``event_log`` is a TDX guest's measurement log (the CCEL log with any runtime events after it,
    Trustee's ``cc_eventlog``): unsigned, it counts only as far as it replays to the quote's RTMRs.
    """

    provider: str
    outblob: bytes
    auxblob: bytes = b""
    manifestblob: bytes = b""
    inblob: bytes | None = None
    event_log: bytes = b""

    @classmethod
    def from_report(cls, report: TsmReport) -> Evidence:
        return cls(report.provider, report.outblob, report.auxblob, report.manifestblob, report.inblob,
                   report.event_log)


@dataclass(frozen=True)
class Check:
    """One named check: ``ok`` is True (passed), False (failed) or None (not evaluated)."""

    name: str
    ok: bool | None
    detail: str


@dataclass(frozen=True)
class Verdict:
    provider: str
    checks: tuple[Check, ...]
    claims: dict[str, Any]
    #: The evidence was shown to come from a trusted TEE for this verification: its signature,
    #: its chain to a pinned root and its binding to the nonce (when one was expected) all held. A failure after that is
    #: a genuine guest refused; one before it proves nothing about who sent the evidence.
    proven: bool = False

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks) and any(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.ok is False)

    def reason(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failures) or "all checks passed"


@dataclass(frozen=True)
class Context:
    """How to verify: trust anchors, the time, the expected binding, where to find certificates.

    ``nonce`` is the inblob the guest must have written (the provider derives REPORT_DATA
    from it); ``report_data`` is an exact REPORT_DATA to expect; ``init_data`` the digest of
    the init-data the guest presented, which its host must have bound at launch. ``certs`` are extra
    certificate folders and ``collateral`` a TDX collateral folder (operator collateral);
    with ``kds_url`` / ``pcs_url`` the SNP and TDX verifiers fetch what is missing through
    ``fetcher`` (share one per process: it remembers failures and bounds concurrency).
    """

    trust: TrustStore
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    nonce: bytes | None = None
    report_data: bytes | None = None
    init_data: bytes | None = None
    certs: tuple[Path, ...] = ()
    collateral: Path | None = None
    kds_url: str | None = None
    pcs_url: str | None = None
    fetcher: Fetcher = field(default_factory=Fetcher)


class Stop(Exception):
    """Raised by :class:`Checks` after a failed check: later checks depend on it."""


class Checks:
    """Records checks in order; a failure stops verification (fail closed)."""

    def __init__(self) -> None:
        self.items: list[Check] = []
        self.proven = False

    def genuine_and_bound(self) -> None:
        """Mark the point past which the evidence is proven (see :attr:`Verdict.proven`)."""
        self.proven = True

    def passed(self, name: str, detail: str = "") -> None:
        self.items.append(Check(name, True, detail))

    def failed(self, name: str, detail: str) -> NoReturn:
        self.items.append(Check(name, False, detail))
        raise Stop(name)

    def skipped(self, name: str, detail: str) -> None:
        self.items.append(Check(name, None, detail))

    def require(self, condition: bool, name: str, ok: str, fail: str) -> None:
        if condition:
            self.passed(name, ok)
        else:
            self.failed(name, fail)


def check_freshness(observed: bytes, evidence: Evidence, context: Context, checks: Checks, *, what: str,
                    derive: Callable[[bytes], bytes] = lambda nonce: nonce, rule: str = "the nonce (inblob)",
                    name: str = "nonce_binding", consequence: str = "") -> None:
    """The freshness binding every provider has: ``observed`` (REPORT_DATA, REPORTDATA, the realm
    challenge) equals an exact ``--report-data`` when one is given, else what the provider
    derives from the nonce: the key server's expected inblob, or the envelope's own.
    ``consequence`` ends the failure's detail: what a mismatch means for this provider."""
    if context.report_data is not None:
        checks.require(observed == context.report_data, "report_data", f"{what} equals the expected value",
                       f"{what} {observed.hex()[:32]}... differs from the expected {context.report_data.hex()[:32]}...")
        return
    nonce = context.nonce if context.nonce is not None else evidence.inblob
    if nonce is None:
        checks.skipped(name, f"no nonce or expected {what} given")
        return
    checks.require(observed == derive(nonce), name, f"{what} is {rule}",
                   f"{what} {observed.hex()[:32]}... is not {rule} (nonce {nonce.hex()[:32]}...)"
                   + (f": {consequence}" if consequence else ""))


def check_init_data(observed: bytes, context: Context, checks: Checks, *, what: str) -> None:
    """The init-data binding, when the guest presented init-data: the field its host set at launch
    (``observed``) holds the init-data digest, zero-padded or cut to the field's size as Trustee compares."""
    if context.init_data is None:
        return
    expected = context.init_data[:len(observed)].ljust(len(observed), b"\0")
    checks.require(observed == expected, "init_data", f"{what} is the init-data digest",
                   f"{what} {observed.hex()[:32]}... is not the init-data digest {context.init_data.hex()[:32]}...: "
                   "the guest was not launched with this init-data")


#: A provider's verifier fills ``claims`` as soon as the evidence is parsed, then records
#: its checks; a failed check raises :class:`Stop`.
Verifier = Callable[[Evidence, Context, Checks, dict[str, Any]], None]
