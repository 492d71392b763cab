"""Runtime measurement end to end: the emulated TD, its event log in the evidence, the key server's replay,
policies that require events, a tampered log, and measured key release.

The in-process tests run :func:`keybroker.guest.broker.obtain`, what the handler's worker and the agent run
for a key request; the last test goes through the kernel's upcall (/sbin/request-key), which runs the
installed handler: it is skipped while that installation's keybroker predates runtime measurement.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keybroker.errors import ReleaseRefused, TsmError
from keybroker.guest import broker, config, measure, tokens
from keybroker.guest.client import RcarClient
from keybroker.guest.request import parse_request
from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.wire.eventlog import RuntimeEvent
from support.child import in_child
from support.keyctl import keyctl_session

SECRETS = {f"default/key/{n}": f"secret {n}".encode() for n in range(1, 5)}
IMAGE = {"domain": "example.org", "operation": "image-pull", "content": "registry/app@sha256:ab"}


def put_policy(server, tmp_path: Path, rules: list[dict]) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"version": 1, "rules": rules}))
    subprocess.run([sys.executable, "-m", "keybroker", "policy", "put", str(path), "--db", server.db,
                    "--kek-file", str(server.secrets.kek)],
                   check=True, capture_output=True, timeout=60)


def release(server) -> dict:
    return {"domain": "keybroker", "operation": "release", "content": f"default/key/1 {server.url}"}


@pytest.fixture
def td(tsm_sim, kbs, tmp_path, system_lock):
    """An emulated TD with measured release on, a key server holding SECRETS under a policy that asks for
    events: key 1 for any TD, key 2 once key 1's release is measured, key 3 after an image pull, key 4
    never (an event nobody measures)."""
    report_root = tsm_sim("tdx_guest")
    mount = report_root.parent.parent
    server = kbs(policy=None)
    for path, value in SECRETS.items():
        server.put(path, value)
    tdx = {"claim": "tee", "equals": "tdx"}
    put_policy(server, tmp_path, [
        {"resources": ["default/key/1"], "require": tdx},
        {"resources": ["default/key/2"], "require": {"allOf": [
            tdx, {"claim": "tdx.runtime_events", "contains": release(server)}]}},
        {"resources": ["default/key/3"], "require": {"claim": "tdx.runtime_events", "contains": IMAGE}},
        {"resources": ["default/key/4"], "require": {"claim": "tdx.runtime_events",
                                                     "contains": {"domain": "example.org", "operation": "never"}}}])
    measured = config.MeasureConfig(root=mount / "sys/class/misc/tdx_guest/measurements",
                                    log=tmp_path / "run" / "runtime-eventlog",
                                    ccel=mount / "sys/firmware/acpi/tables/data/CCEL",
                                    ccel_table=mount / "sys/firmware/acpi/tables/CCEL", releases=True)
    cfg = config.ClientConfig(path=tmp_path / "client.toml", server_url=server.url, tsm_root=report_root,
                              measure=measured)
    tokens.forget_all()
    try:
        yield server, cfg
    finally:
        tokens.forget_all()


def obtain(cfg: config.ClientConfig, name: str) -> bytes:
    request = parse_request("user", f"keybroker:{name}", b"")
    import time

    return in_child(lambda: bytes(broker.obtain(cfg, request, deadline=time.monotonic() + 30).value))


def refused(cfg: config.ClientConfig, name: str) -> str:
    with pytest.raises(ReleaseRefused) as info:
        obtain(cfg, name)
    return str(info.value)


def test_a_policy_that_requires_a_measured_event_releases_and_one_that_requires_another_refuses(td):
    server, cfg = td
    reason = refused(cfg, "default/key/3")
    assert 'has no element with {"domain": "example.org", "operation": "image-pull", "content": ' \
           '"registry/app@sha256:ab"}' in reason
    measure.measure(cfg.measure, RuntimeEvent(**IMAGE))
    tokens.forget_all()  # the kept token holds the claims of the attestation before the event: attest anew
    assert obtain(cfg, "default/key/3") == SECRETS["default/key/3"]
    reason = refused(cfg, "default/key/4")
    assert 'has no element with {"domain": "example.org", "operation": "never"}' in reason
    assert "form=envelope result=verified" in server.log()


def test_measured_release_shows_in_the_next_attestation(td):
    server, cfg = td
    assert f'{json.dumps(release(server))}' in refused(cfg, "default/key/2")
    assert obtain(cfg, "default/key/1") == SECRETS["default/key/1"]
    assert cfg.measure.log.read_bytes().endswith(f"keybroker release default/key/1 {server.url}".encode())
    tokens.forget_all()
    assert obtain(cfg, "default/key/2") == SECRETS["default/key/2"]  # a new attestation, with the release
    assert SECRETS["default/key/1"] not in cfg.measure.log.read_bytes()


def test_a_measurement_that_fails_keeps_the_key_back(td):
    server, cfg = td
    broken = dataclasses.replace(cfg, measure=dataclasses.replace(cfg.measure, root=cfg.path.parent / "nowhere"))
    with pytest.raises(TsmError, match="released but not measured, so it is not instantiated"):
        obtain(broken, "default/key/1")
    assert "released" in server.log()  # the server did release it: only the guest keeps it back


def test_a_tampered_runtime_log_is_refused(td):
    _, cfg = td
    measure.measure(cfg.measure, RuntimeEvent(**IMAGE))
    log = cfg.measure.log.read_bytes()
    cfg.measure.log.write_bytes(log.replace(b"sha256:ab", b"sha256:cd"))  # the content, not its digest
    tokens.forget_all()
    with pytest.raises(ReleaseRefused, match=r"event_log: runtime event at offset .* its content was not measured"):
        obtain(cfg, "default/key/3")
    forged = RuntimeEvent("example.org", "image-pull", "registry/app@sha256:cd").encode()
    cfg.measure.log.write_bytes(forged)  # a well-formed event that is not the one extended
    with pytest.raises(ReleaseRefused, match=r"event_log: RTMR3: the log .* replays to .*the quote has"):
        obtain(cfg, "default/key/3")


def test_trustee_form_carries_the_log_as_cc_eventlog(td):
    """A Trustee-form guest (guest-components' cc_eventlog) gets the same replay and event claims."""
    server, cfg = td
    measure.measure(cfg.measure, RuntimeEvent(**IMAGE))
    client = TsmClient(cfg.tsm_root)

    def evidence(inblob: bytes):
        with measure.evidence_log(cfg.measure) as read_log:
            return dataclasses.replace(client.get_report(ReportRequest(inblob)), event_log=read_log())

    from keybroker.wire import rcar

    original = rcar.Challenge.from_json

    def trustee_challenge(obj):  # as a Trustee KBS answers: no offer of the envelope
        return dataclasses.replace(original(obj), envelope=False)

    rcar.Challenge.from_json = trustee_challenge  # type: ignore[method-assign]
    try:
        released = RcarClient(server.url).fetch("default/key/3", "tdx", evidence)
    finally:
        rcar.Challenge.from_json = original  # type: ignore[method-assign]
    assert bytes(released.value) == SECRETS["default/key/3"]
    assert "form=trustee result=verified" in server.log()


def _installed_handler_measures() -> bool:
    """Whether the installed handler (its keybroker, not this tree's) knows runtime measurement."""
    out = subprocess.run([sys.executable, "-c", "import keybroker.guest.measure"], cwd="/", capture_output=True)
    return out.returncode == 0


def test_measured_release_through_the_kernel(td, handler, tmp_path):
    if not _installed_handler_measures():
        pytest.skip("the installed request-key handler's keybroker predates runtime measurement (run after merge)")
    server, cfg = td
    m = cfg.measure
    handler(server.url, cfg.tsm_root, extra=f'[measure]\nreleases = true\nroot = "{m.root}"\nlog = "{m.log}"\n'
                                            f'ccel = "{m.ccel}"\nccel_table = "{m.ccel_table}"\n')
    out = keyctl_session('keyctl request2 user keybroker:default/key/1 "" @s')
    assert out.returncode == 0, out.stderr
    assert m.log.read_bytes().endswith(f"keybroker release default/key/1 {server.url}".encode())
    tokens.forget_all()  # the handler's kept token predates the release event
    out = keyctl_session('id=$(keyctl request2 user keybroker:default/key/2 "" @s) && keyctl pipe $id')
    assert out.returncode == 0 and out.stdout == SECRETS["default/key/2"].decode(), out.stderr


def test_an_agent_that_sees_another_runtime_log_leaves_the_request_to_the_handler(td, handler, syslog, tmp_path):
    """The agent's unit gives it a /tmp of its own and a read-only file system but /run/keybroker: a
    runtime log elsewhere is, in its view, another file (or none it may write). Measuring a release
    there would extend RTMR3 without the system's log (or fail the request): the handler does it."""
    import shutil

    from support.agent import running

    if not _installed_handler_measures():
        pytest.skip("the installed request-key handler's keybroker predates runtime measurement (run after merge)")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to give the agent a view of its own")
    server, cfg = td
    m = cfg.measure
    m.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handler(server.url, cfg.tsm_root, extra=f'[measure]\nreleases = true\nroot = "{m.root}"\nlog = "{m.log}"\n'
                                            f'ccel = "{m.ccel}"\nccel_table = "{m.ccel_table}"\n')
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
               'mount -t tmpfs none "$1"; exec "$2" -m keybroker agent', "sh", str(m.log.parent), sys.executable]
    with running(private):
        out = keyctl_session('keyctl request2 user keybroker:default/key/1 "" @s')
    assert out.returncode == 0, out.stderr
    assert m.log.read_bytes().endswith(f"keybroker release default/key/1 {server.url}".encode())
    lines = [line for line in syslog if "outcome=" in line]
    assert len(lines) == 1 and "via=worker" in lines[0], lines


@pytest.mark.parametrize("provider, tee", [("sev_guest", "snp"), ("arm_cca_guest", "cca"), ("sev_aeb", "sev")])
def test_an_event_log_beside_other_evidence_is_refused(provider, tee):
    """Only a TD's registers replay an event log: with other evidence its events would be claims nothing checked."""
    from keybroker.errors import EvidenceError
    from keybroker.server.kbs import _evidence
    from keybroker.wire import envelope

    report = envelope.TsmReport(provider=provider, generation=1, inblob=bytes(64), outblob=b"x", event_log=b"log")
    with pytest.raises(EvidenceError, match="only TDX evidence carries one"):
        _evidence(tee, envelope.to_json(report))
