"""What every verifier shares: the verdict's rule, the init-data binding's cut or pad, the exact report data."""

from __future__ import annotations

import hashlib

import pytest

from keybroker.verifier import Context, Evidence, TrustStore
from keybroker.verifier.core import Check, Checks, Stop, Verdict, check_freshness, check_init_data

PASSED, SKIPPED, FAILED = Check("a", True, ""), Check("b", None, ""), Check("c", False, "no")


def test_a_verdict_is_ok_only_with_a_check_passed_and_none_failed():
    """No checks, or only skipped ones, prove nothing: such a verdict is no pass."""
    assert Verdict("sev_guest", (PASSED, SKIPPED), {}).ok
    for checks in ((), (SKIPPED,), (SKIPPED, SKIPPED), (PASSED, FAILED), (FAILED, SKIPPED)):
        assert not Verdict("sev_guest", checks, {}).ok, checks


def _init_data(observed: bytes, digest: bytes) -> list[Check]:
    checks = Checks()
    try:
        check_init_data(observed, Context(TrustStore({}), init_data=digest), checks, what="field")
    except Stop:
        pass
    return checks.items


@pytest.mark.parametrize("field_size, digest_size", [(32, 48), (32, 64), (48, 64), (48, 32), (64, 48), (48, 48)])
def test_the_init_data_digest_is_cut_or_zero_padded_to_the_field(field_size, digest_size):
    """As Trustee compares: a SHA-384 digest against SNP's 32-byte HOST_DATA is cut, a SHA-256 one
    against TDX's 48-byte MRCONFIGID zero-padded; any other byte, or padding not zero, is refused."""
    digest = hashlib.sha512(b"init-data").digest()[:digest_size]
    field = digest[:field_size].ljust(field_size, b"\0")
    assert [c.ok for c in _init_data(field, digest)] == [True]
    changed = bytearray(field)
    changed[min(field_size, digest_size) - 1] ^= 1
    assert [c.ok for c in _init_data(bytes(changed), digest)] == [False]
    if field_size > digest_size:  # the padding is zeros, nothing else
        assert [c.ok for c in _init_data(field[:-1] + b"\1", digest)] == [False]
    assert _init_data(field, None) == []  # no init-data presented: nothing to bind


def test_an_exact_report_data_is_compared_whatever_the_nonce():
    """With --report-data, the observed value must be that value: the nonce and inblob play no part."""
    expected = bytes(range(64))
    evidence = Evidence("sev_guest", b"r", inblob=bytes(64))
    for observed, ok in ((expected, True), (expected[:-1] + b"\0", False), (bytes(64), False)):
        checks = Checks()
        try:
            check_freshness(observed, evidence, Context(TrustStore({}), report_data=expected, nonce=bytes(64)),
                            checks, what="REPORT_DATA")
        except Stop:
            pass
        assert [(c.name, c.ok) for c in checks.items] == [("report_data", ok)]
