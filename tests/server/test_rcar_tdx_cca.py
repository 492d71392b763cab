"""TDX and CCA guests end to end: the configfs-tsm emulator's evidence, RCAR with the key server
(the same verifiers as ``keybroker verify``), the default release policy, a loopback PCCS."""

from __future__ import annotations

import pytest

from keybroker.errors import ServerError
from keybroker.guest.client import RcarClient
from keybroker.guest.tsm import ReportRequest, TsmClient
from support.pcs import PcsServer

SECRET = b"\x00released to a TD or a realm\xff"


def evidence_from(root):
    client = TsmClient(root)
    return lambda inblob: client.get_report(ReportRequest(inblob))


def denied(server, root, tee: str) -> ServerError:
    with pytest.raises(ServerError) as info:
        RcarClient(server.url, attempts=1).fetch("default/key/a", tee, evidence_from(root))
    return info.value


@pytest.mark.parametrize("provider, tee", [("tdx_guest", "tdx"), ("arm_cca_guest", "cca")])
def test_release_to_an_emulated_guest(tsm_sim, kbs, provider, tee):
    root = tsm_sim(provider)
    server = kbs()
    server.put("default/key/a", SECRET)
    released = RcarClient(server.url).fetch("default/key/a", tee, evidence_from(root))
    assert bytes(released.value) == SECRET


@pytest.mark.parametrize("provider, tee", [("tdx_guest", "tdx"), ("arm_cca_guest", "cca")])
def test_debug_guests_are_refused_by_the_default_policy(tsm_sim, kbs, provider, tee):
    root = tsm_sim(provider, "debug")
    server = kbs()
    server.put("default/key/a", SECRET)
    error = denied(server, root, tee)
    assert error.status == 401 and error.problem == "PolicyDenied" and "debug guest" in str(error)


@pytest.mark.parametrize("provider, tee, failed", [("tdx_guest", "tdx", "quote_signature"),
                                                    ("arm_cca_guest", "cca", "realm_signature")])
def test_bad_signatures_are_denied_with_the_failed_check(tsm_sim, kbs, provider, tee, failed):
    root = tsm_sim(provider, "corrupt-signature")
    server = kbs()
    server.put("default/key/a", SECRET)
    error = denied(server, root, tee)
    assert error.status == 401 and error.problem == "AttestationDenied" and failed in str(error)


@pytest.mark.parametrize("provider, tee, failed", [("tdx_guest", "tdx", "root_pinned"),
                                                    ("arm_cca_guest", "cca", "cpak_trusted")])
def test_simulated_roots_are_not_trusted_by_default(tsm_sim, kbs, provider, tee, failed):
    root = tsm_sim(provider)
    server = kbs(trust=False)
    server.put("default/key/a", SECRET)
    assert failed in str(denied(server, root, tee))


def test_tdx_tcb_status_from_a_pccs(tsm_sim, kbs, sim_state, tmp_path):
    root = tsm_sim("tdx_guest")  # creates the simulated platform and its collateral
    collateral = sim_state / "tdx" / "collateral"
    pck_ca = (sim_state / "tdx" / "pck-ca.pem").read_bytes()
    tcb_info = (collateral / "tcbinfo.json").read_bytes()
    fmspc = bytes.fromhex(tcb_info.split(b'"fmspc":"')[1][:12].decode())
    pccs = PcsServer(fmspc=fmspc, tcb_info=tcb_info, qe_identity=(collateral / "qe_identity.json").read_bytes(),
                     signing_chain=(collateral / "tcb_signing_chain.pem").read_bytes(),
                     pck_crl=(collateral / "pck_crl.der").read_bytes(), pck_crl_chain=pck_ca,
                     root_crl=(collateral / "root_crl.der").read_bytes())
    try:
        server = kbs("--pcs-url", pccs.url, "--cache-dir", str(tmp_path / "cache"))
        server.put("default/key/a", SECRET)
        for _ in range(2):
            released = RcarClient(server.url).fetch("default/key/a", "tdx", evidence_from(root))
            assert bytes(released.value) == SECRET
        assert len(pccs.requests) == 4  # fetched once, then from the server's cache
        assert (tmp_path / "cache" / "pcs" / f"{fmspc.hex()}-platform" / "tcbinfo.json").read_bytes() == tcb_info
    finally:
        pccs.close()


def test_tdx_tcb_status_from_an_offline_collateral_folder(tsm_sim, kbs, sim_state, tmp_path):
    root = tsm_sim("tdx_guest")
    policy = tmp_path / "policy.json"
    policy.write_text('{"version": 1, "rules": [{"resources": ["default/*"], "require": '
                      '{"claim": "tdx.tcb_status", "equals": "UpToDate"}}]}')
    without = kbs("--policy", str(policy))
    without.put("default/key/a", SECRET)
    error = denied(without, root, "tdx")
    assert error.problem == "PolicyDenied" and "claim tdx.tcb_status is absent" in str(error)
    server = kbs("--policy", str(policy), "--collateral", str(sim_state / "tdx" / "collateral"))
    server.put("default/key/a", SECRET)
    released = RcarClient(server.url).fetch("default/key/a", "tdx", evidence_from(root))
    assert bytes(released.value) == SECRET
