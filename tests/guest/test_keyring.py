"""The libkeyutils binding, against the real kernel keyring, in a fresh session keyring."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from keybroker.errors import KeyringError
from keybroker.guest import keyring
from support.keyctl import proc_keys


@pytest.fixture(autouse=True)
def fresh_session():
    # Run each test's keyring work in its own anonymous session keyring; keys die with it.
    keyring.join_session_keyring(None)


def keyctl(*args: str) -> str:
    """keyctl(1) in this process's session keyring (the binding only has what keybroker uses)."""
    return subprocess.run(["keyctl", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def test_describe_read_and_request_without_callout():
    key = int(keyctl("add", "user", "keybroker-test:a;b", "payload", "@s"))
    info = keyring.describe(key)
    assert (info.type, info.uid, info.gid, info.description) == ("user", os.getuid(), os.getgid(),
                                                                  "keybroker-test:a;b")
    assert keyring.read(key) == b"payload"
    secret = keyring.read_secret(key)
    assert isinstance(secret, bytearray) and secret == b"payload"
    assert keyring.request_key("user", "keybroker-test:a;b", None) == key  # found: no upcall
    # A NULL callout only searches: no upcall, ENOKEY.
    with pytest.raises(KeyringError) as info:
        keyring.request_key("user", "keybroker-test:absent", None)
    assert info.value.errno == errno.ENOKEY


def test_unlink_setperm_timeout():
    ring = int(keyctl("newring", "keybroker-test-ring", "@s"))
    key = int(keyctl("add", "user", "keybroker-test:k", "secret", "@s"))
    keyctl("link", str(key), str(ring))
    assert [int(s) for s in keyctl("rlist", str(ring)).split()] == [key]
    keyring.unlink(key, ring)
    assert keyctl("rlist", str(ring)) == ""
    keyring.set_timeout(key, 100)
    assert proc_keys(key)[3] == "1m"
    keyring.setperm(key, keyring.POSSESSOR_ONLY)
    assert keyring.describe(key).perm == keyring.POSSESSOR_ONLY
    with pytest.raises(KeyringError) as info:  # possessor-only takes SETATTR away: the timeout stays
        keyring.set_timeout(key, 0)
    assert info.value.errno == errno.EACCES
    with pytest.raises(KeyringError) as info:
        keyring.unlink(key, ring)
    assert info.value.errno == errno.ENOENT


def test_authority_instantiate_and_reject_need_an_authorisation_key():
    key = int(keyctl("add", "user", "keybroker-test:x", "x", "@s"))
    for call in (lambda: keyring.instantiate(key, b"y"), lambda: keyring.reject(key, 5, errno.EKEYREJECTED)):
        with pytest.raises(KeyringError) as info:
            call()
        assert info.value.errno == errno.EPERM
    with pytest.raises(KeyringError) as info:
        keyring.assume_authority(key)  # not a key under construction for us
    assert info.value.errno in (errno.ENOKEY, errno.EPERM)


def test_instantiate_and_reject_from_a_real_upcall(tmp_path):
    """A throwaway request-key handler built on the binding instantiates or rejects."""
    handler = tmp_path / "handler.py"
    # A script with a shebang, as the real handler: request-key sets argv[0] to the program's
    # basename, which a bare interpreter cannot find its prefix from.
    handler.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import errno, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from keybroker.guest import keyring
        serial = int(sys.argv[1])
        info = keyring.describe(serial)
        callout = keyring.read(keyring.REQKEY_AUTH_KEY)
        if callout == b"reject":
            keyring.reject(serial, 5, errno.EKEYREJECTED)
        else:
            keyring.instantiate(serial, b"made:" + info.description.encode() + b":" + callout)
        """))
    handler.chmod(0o755)
    conf = "/etc/request-key.d/keybroker-bindingtest.conf"
    with open(conf, "w") as f:
        f.write(f"create user kbtest:* * {handler} %k\n")
    try:
        out = subprocess.run(["keyctl", "session", "-", "sh", "-c",
                              "id=$(keyctl request2 user kbtest:one hello @s) && keyctl print $id; "
                              "keyctl request2 user kbtest:two reject @s"],
                             capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(conf)
    assert "made:kbtest:one:hello" in out.stdout
    assert "Key was rejected by service" in out.stderr
