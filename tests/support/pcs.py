"""A loopback stand-in for Intel's PCS / a PCCS: the v4 collateral paths, issuer chains in
headers (URL-encoded PEM; their names in lower case, as HTTP/2 sends them, when asked), a
request log. Never the internet."""

from __future__ import annotations

import urllib.parse

from support.stub import QuietHandler, StubServer


class PcsServer(StubServer):
    def __init__(self, *, fmspc: bytes, tcb_info: bytes, qe_identity: bytes, signing_chain: bytes, pck_crl: bytes,
                 pck_crl_chain: bytes, root_crl: bytes | None, lower_case_headers: bool = False) -> None:
        quote = urllib.parse.quote
        self.routes: dict[str, tuple[bytes, dict[str, str]]] = {
            f"/tdx/certification/v4/tcb?fmspc={fmspc.hex()}":
                (tcb_info, {"TCB-Info-Issuer-Chain": quote(signing_chain.decode())}),
            "/tdx/certification/v4/qe/identity":
                (qe_identity, {"SGX-Enclave-Identity-Issuer-Chain": quote(signing_chain.decode())}),
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der":
                (pck_crl, {"SGX-PCK-CRL-Issuer-Chain": quote(pck_crl_chain.decode())}),
        }
        if root_crl is not None:  # as a PCCS serves it: hex-encoded DER
            self.routes["/sgx/certification/v4/rootcacrl"] = (root_crl.hex().encode(), {})
        self.requests: list[str] = []
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body, headers = server.routes.get(self.path, (b"", {}))
                self.send_response(200 if self.path in server.routes else 404)
                for name, value in headers.items():
                    self.send_header(name.lower() if lower_case_headers else name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
