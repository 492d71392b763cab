"""The admin tokens a server accepts (--admin-token-file): one per line, each named by its own fingerprint."""

from __future__ import annotations

import hashlib

import pytest

from keybroker.errors import ConfigError
from keybroker.server.admin import AdminAuth
from support.servers import write_secret

OLD, NEW = "o" * 32, "n" * 64


def fingerprint(token: str) -> str:
    return f"token:{hashlib.sha256(token.encode()).hexdigest()[:12]}"


def test_every_token_of_the_file_is_accepted_and_named_by_its_own_fingerprint(tmp_path):
    """During a rotation both tokens work, and the audit log says which one made a change: a token
    taken for the file's first one would put a change on the other administrator's record."""
    auth = AdminAuth.load(write_secret(tmp_path / "admin-token", f"\n{OLD}\n  \n{NEW}  \n".encode()))
    assert auth is not None
    assert auth.actor(OLD) == fingerprint(OLD) and auth.actor(NEW) == fingerprint(NEW)
    for stranger in ("o" * 31, "o" * 33, NEW.upper(), "", hashlib.sha256(OLD.encode()).hexdigest()):
        assert auth.actor(stranger) is None


@pytest.mark.parametrize("content, line", [(b"short\n", 1), (f"{NEW}\n\nwith a space {NEW}\n".encode(), 3),
                                           (f"{NEW}\n{'x' * 513}\n".encode(), 2),
                                           (NEW.encode() + b"\n" + "\u00e9".encode() * 40 + b"\n", 2)])
def test_a_line_that_is_no_token_is_refused_by_its_number(tmp_path, content, line):
    with pytest.raises(ConfigError, match=f"line {line}: a token is 32 to 512 printable ASCII"):
        AdminAuth.load(write_secret(tmp_path / "admin-token", content))


def test_a_file_without_a_token_is_refused_not_an_admin_api_nobody_can_use(tmp_path):
    with pytest.raises(ConfigError, match="holds no token"):
        AdminAuth.load(write_secret(tmp_path / "admin-token", b"\n  \n"))
