"""The admin API's client (``keybroker resource|policy … --server``): what it reads and what it is answered."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from keybroker import cli
from support.servers import write_secret


@pytest.mark.parametrize("token", ["\u20ac".encode() * 40, b"\xff" * 40, b"t" * 20 + b" " + b"t" * 20, b"t" * 20],
                         ids=["not-latin-1", "not-utf-8", "space", "short"])
def test_a_token_no_server_takes_is_refused_before_anything_is_sent(token, tmp_path, capsys):
    # A token no header can carry was a UnicodeEncodeError (or UnicodeDecodeError) traceback, one with a
    # space went out to be refused as a stranger's: each is named here, as the server names it.
    path = write_secret(tmp_path / "admin-token", b"\n" + token + b"\n")
    status = cli.main(["resource", "list", "--server", "http://127.0.0.1:1", "--admin-token-file", str(path)])
    err = capsys.readouterr().err
    assert status == 1 and f"admin token file {path}, line 2: a token is 32 to 512 printable ASCII" in err, err


@pytest.fixture
def stranger(tmp_path):
    """An HTTP server on loopback that answers every request with ``(status, body)`` as set; and a token file."""
    answer = {"status": 200, "body": b"<html>a login page</html>"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(answer["status"])
            self.send_header("Content-Length", str(len(answer["body"])))
            self.end_headers()
            self.wfile.write(answer["body"])

        do_GET = do_PUT = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    value = tmp_path / "value"
    value.write_bytes(b"v")
    policy = tmp_path / "policy.json"
    policy.write_text('{"version": 1, "rules": []}')
    remote = ["--server", f"http://127.0.0.1:{server.server_address[1]}",
              "--admin-token-file", str(write_secret(tmp_path / "admin-token", b"t" * 64))]
    yield answer, remote, {"value": value, "policy": policy}
    server.shutdown()
    server.server_close()
    thread.join()


COMMANDS = [["resource", "list"], ["resource", "put", "default/key/a", "--file", "{value}"],
            ["resource", "rm", "default/key/a"], ["policy", "list"], ["policy", "get"],
            ["policy", "get", "--version", "1"], ["policy", "put", "{policy}"], ["policy", "rm"]]
POLICY = {"version": 1, "digest": "ab" * 32, "created": 1.5, "actor": "token:x", "policy": {"version": 1, "rules": []}}
ODD = [b"<html>a login page</html>", b"null", b"[]", b'{"resources": {}, "policies": 1}',
       json.dumps({"resources": [{"path": 1, "size": "1", "lease": None, "kek": "k", "updated": 1}],
                   "policies": [POLICY | {"created": 1e300}], "version": "1", "changed": 1}).encode(),
       json.dumps(POLICY | {"version": True, "policy": {"rules": 1}, "changed": True}).encode(),
       b"[" * 100_000]  # nested past json's parser: RecursionError, not a ValueError


@pytest.mark.parametrize("body", ODD, ids=range(len(ODD)))
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) + str(len(c)) for c in COMMANDS])
def test_an_answer_that_is_not_the_admin_apis_is_named_not_a_traceback(stranger, command, body, capsys):
    # --server pointing at a proxy's login page, another service, or a path that is not the server's.
    answer, remote, files = stranger
    answer["body"] = body
    status = cli.main([arg.format(**files) for arg in command] + remote)
    err = capsys.readouterr().err
    if command[:2] in (["resource", "put"], ["resource", "rm"]) and body.startswith(b"{"):
        return  # the answer to these is not read, only its status: any object will do
    assert status == 1 and "HTTP 200, but the answer is not the admin API's: is http://127.0.0.1:" in err, err


@pytest.mark.parametrize("command", [["resource", "rm", "default/key/a"], ["policy", "get"]])
def test_a_404_that_is_not_the_servers_no_such_thing_is_not_taken_for_one(stranger, command, capsys):
    # A wrong --server path: 'no resource default/key/a' or 'there is no policy version None' sent the
    # operator looking for the wrong thing.
    answer, remote, _ = stranger
    answer["status"], answer["body"] = 404, b"<html>Not Found</html>"
    assert cli.main(command + remote) == 1
    assert "HTTP 404" in capsys.readouterr().err
