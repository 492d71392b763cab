"""Confidential Containers guests against keybroker's server: a client that behaves as
guest-components' kbs_protocol (tests/support/gc_client.py) with its SNP, TDX and CCA
attesters, over real HTTP to ``keybroker serve``, evidence from the configfs-tsm emulator."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from keybroker.wire import initdata
from support.gc_client import GuestComponents, InternalFailure, Refused
from support.kbs import audit_records
from support.policies import ANY_GUEST_DOCUMENT

SECRET = b"released to a confidential container"
PROVIDERS = {"snp": "sev_guest", "tdx": "tdx_guest", "cca": "arm_cca_guest"}
INIT_DATA = '''version = "0.1.0"
algorithm = "sha384"

[data]
"aa.toml" = """
[token_configs]
[token_configs.kbs]
url = "http://127.0.0.1"
"""
"policy.rego" = "package agent_policy\\ndefault AllowRequestsFailingPolicy := true\\n"
'''


@pytest.fixture
def serve(tsm_sim, kbs, tmp_path):
    """start(tee, init_data=None, policy=ANY_GUEST) -> (server, emulator root)."""
    def start(tee: str, *, launched_with: str | None = None, policy: dict = ANY_GUEST_DOCUMENT):
        init_file = None
        if launched_with is not None:
            init_file = tmp_path / "initdata.toml"
            init_file.write_text(launched_with)
        root = tsm_sim(PROVIDERS[tee], init_data=init_file)
        server = kbs(policy=policy)
        server.put("default/cc/secret", SECRET)
        return server, root
    return start


@pytest.mark.parametrize("tee", ["snp", "tdx", "cca"])
def test_a_guest_components_guest_obtains_the_resource(serve, tee):
    server, root = serve(tee)
    guest = GuestComponents(server.url, tee, root)
    assert guest.get_resource("default/cc/secret", query="version=1") == SECRET
    assert guest.challenges[-1]["extra-params"] == ""  # the envelope was not offered: nobody asked
    assert f"tee={tee} form=trustee result=verified" in server.log()


@pytest.mark.parametrize("tee", ["snp", "cca"])
def test_an_rsa_tee_key_gets_an_rsa_oaep_jwe(serve, tee):
    server, root = serve(tee)
    assert GuestComponents(server.url, tee, root, key_algorithm="RSA-OAEP-256").get_resource(
        "default/cc/secret") == SECRET


def test_device_evidence_is_bound_appraised_and_left_to_the_policy(serve):
    no_sample_devices = {"version": 1, "rules": [{"resources": ["*"], "require": {"allOf": [
        ANY_GUEST_DOCUMENT["rules"][0]["require"], {"claim": "device.sampledevice.sample", "exists": False}]}}]}
    server, root = serve("snp", policy=no_sample_devices)
    assert GuestComponents(server.url, "snp", root).get_resource("default/cc/secret") == SECRET
    with pytest.raises(Refused) as refused:
        GuestComponents(server.url, "snp", root, sample_device=True).get_resource("default/cc/secret")
    assert refused.value.where == "resource" and refused.value.type.endswith("PolicyDenied")
    assert "device.sampledevice.sample is present" in refused.value.detail


def test_device_evidence_with_the_policy_allowing_it(serve):
    server, root = serve("tdx")
    assert GuestComponents(server.url, "tdx", root, sample_device=True).get_resource("default/cc/secret") == SECRET


def test_device_evidence_bound_to_something_else_is_refused(serve):
    server, root = serve("snp")
    guest = GuestComponents(server.url, "snp", root, sample_device=True, device_binding=b"\x00" * 48)
    with pytest.raises(Refused) as refused:
        guest.get_resource("default/cc/secret")
    assert refused.value.where == "attest" and refused.value.type.endswith("AttestationDenied")
    assert "device evidence: sampledevice report_data is not SHA-384" in refused.value.detail
    # A genuine TEE, for this session, refused: on the record (a stranger's evidence is not).
    [record] = [r for r in audit_records(server.db) if r["event"] == "attest"]
    assert record["decision"] == "deny" and "device evidence" in record["reason"]


@pytest.mark.parametrize("tee, field", [("snp", "HOST_DATA"), ("tdx", "MRCONFIGID"),
                                        ("cca", "the realm personalization value")])
def test_init_data_bound_at_launch_is_checked_and_can_be_pinned(serve, tee, field):
    digest = initdata.parse(INIT_DATA).digest.hex()
    pinned = {"version": 1, "rules": [{"resources": ["*"], "require": {"allOf": [
        ANY_GUEST_DOCUMENT["rules"][0]["require"], {"claim": "init_data.digest", "equals": digest}]}}]}
    server, root = serve(tee, launched_with=INIT_DATA, policy=pinned)
    assert GuestComponents(server.url, tee, root, init_data=INIT_DATA).get_resource("default/cc/secret") == SECRET
    with pytest.raises(Refused) as refused:  # the same guest, not presenting its init-data: the pin fails
        GuestComponents(server.url, tee, root).get_resource("default/cc/secret")
    assert "claim init_data.digest is absent" in refused.value.detail
    other = INIT_DATA.replace("127.0.0.1", "192.0.2.1")  # init-data its host did not launch it with
    with pytest.raises(Refused) as refused:
        GuestComponents(server.url, tee, root, init_data=other).get_resource("default/cc/secret")
    assert refused.value.where == "attest" and refused.value.type.endswith("AttestationDenied")
    assert f"init_data: {field}" in refused.value.detail and "not the init-data digest" in refused.value.detail


def test_unbound_init_data_is_refused(serve):
    server, root = serve("snp")  # launched without init-data: HOST_DATA is the host's own value
    with pytest.raises(Refused) as refused:
        GuestComponents(server.url, "snp", root, init_data=INIT_DATA).get_resource("default/cc/secret")
    assert "init_data: HOST_DATA" in refused.value.detail


def _spent(url: str, root: Path, tee: str) -> GuestComponents:
    other = GuestComponents(url, tee, root)
    other.rcar_handshake()
    return other


@pytest.mark.parametrize("tee", ["snp", "tdx", "cca"])
def test_evidence_bound_to_another_nonce_is_refused(serve, tee):
    server, root = serve(tee)
    with pytest.raises(Refused) as refused:
        GuestComponents(server.url, tee, root).rcar_handshake(nonce_from=_spent(server.url, root, tee))
    assert refused.value.type.endswith("AttestationDenied")
    assert "nonce_binding" in refused.value.detail, refused.value.detail


MUTATIONS = {
    "snp": [("flipped signed byte", lambda e: e["attestation_report"]["measurement"].__setitem__(0, 0xFF ^ e[
        "attestation_report"]["measurement"][0]), "report_signature"),
            ("wrong JSON type", lambda e: e["attestation_report"].__setitem__("vmpl", "0"),
             "attestation_report.vmpl must be an integer"),
            ("wrong array length", lambda e: e["attestation_report"]["report_data"].append(0),
             "report_data must be an array of 64 bytes")],
    "tdx": [("flipped signed byte", lambda e: e.__setitem__("quote", _flip_b64(e["quote"], 200)), "quote_signature"),
            ("wrong JSON type", lambda e: e.__setitem__("quote", None), "quote must be standard base64")],
    "cca": [("flipped signed byte", lambda e: e["token"].__setitem__(-40, e["token"][-40] ^ 1), "signature"),
            ("wrong JSON type", lambda e: e.__setitem__("token", {"0": 1}), "token must be an array of bytes")],
}


def _flip_b64(text: str, at: int) -> str:
    import base64

    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("tee, name, mutate, reason", [(tee, *m) for tee, ms in MUTATIONS.items() for m in ms],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_mutated_evidence_is_refused_with_a_parseable_reason(serve, tee, name, mutate, reason):
    server, root = serve(tee)
    with pytest.raises(Refused) as refused:
        GuestComponents(server.url, tee, root, mutate=mutate).get_resource("default/cc/secret")
    assert refused.value.where == "attest" and refused.value.type == "urn:keybroker:error:AttestationDenied"
    assert reason in refused.value.detail, refused.value.detail


def test_an_unknown_tee_name_is_not_an_internal_error_and_says_why(serve):
    server, root = serve("snp")
    with pytest.raises(InternalFailure, match="tee 'az-snp-vtpm' is not supported"):
        GuestComponents(server.url, "az-snp-vtpm", root).rcar_handshake()


@contextmanager
def _prefix_stripping_proxy(upstream: str, prefix: str) -> Iterator[str]:
    """A reverse proxy that serves ``upstream`` under ``prefix`` (it strips it from each path)."""
    target = urlsplit(upstream)

    class Forward(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            assert self.path.startswith(prefix + "/"), self.path
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.request(self.command, self.path[len(prefix):], body=body or None,
                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "connection", "date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = _forward

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}{prefix}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


def test_a_guest_behind_a_path_prefix_keeps_its_session(serve):
    """The guest is given the server's URL with a path (a reverse proxy that strips it; keybroker's
    client takes such URLs too). Trustee's session cookie has no Path, so a cookie store scopes
    it to where /auth was called and sends it back to /attest; a Path=/kbs/v0 of the server's
    own would keep it from every request the guest makes."""
    server, root = serve("snp")
    with _prefix_stripping_proxy(server.url, "/keybroker") as url:
        assert GuestComponents(url, "snp", root).get_resource("default/cc/secret") == SECRET
