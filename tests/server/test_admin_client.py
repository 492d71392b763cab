"""The admin API's client (``keybroker resource|policy … --server``): what it reads and what it is answered."""

from __future__ import annotations

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
