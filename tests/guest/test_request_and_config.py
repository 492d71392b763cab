"""Key descriptions, callout options, and the client configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keybroker.errors import ConfigError, DescriptionError
from keybroker.guest import config
from keybroker.guest.request import KeyRequest, parse_request
from keybroker.wire.resource import ResourcePath
from support.fifo import outcome_of_reading


def test_valid_requests():
    assert parse_request("user", "keybroker:default/disk/root", b"") == \
        KeyRequest("user", ResourcePath("default", "disk", "root"))
    request = parse_request("logon", "keybroker:r/t/tag-1.2_x", "privlevel=2")
    assert request.privlevel == 2 and request.description == "keybroker:r/t/tag-1.2_x"
    # Trustee's resource grammar: a segment may start with '-' or '_', and be long
    assert parse_request("user", "keybroker:-r/_t/" + "x" * 194, b"").resource.tag == "x" * 194  # 200 in all


@pytest.mark.parametrize("key_type, description, callout, message", [
    ("keyring", "keybroker:a/b/c", "", "key type 'keyring' is not served"),
    ("user", "other:a/b/c", "", "does not start with 'keybroker:'"),
    ("user", "keybroker:a/b", "", "must be <repo>/<type>/<tag>"),
    ("user", "keybroker:a/b/c/d", "", "must be <repo>/<type>/<tag>"),
    ("user", "keybroker:a/../c", "", "not starting with '.'"),
    ("user", "keybroker:a/.x/c", "", "not starting with '.'"),
    ("user", "keybroker:a/b c/d", "", "resource segment 'b c'"),
    ("user", "keybroker:a/b/" + "x" * 197, "", "longer than 200 characters"),
    ("user", "keybroker:a/b/c", "privlevel=4", "privlevel=4 must be 0, 1, 2 or 3"),
    ("user", "keybroker:a/b/c", "privlevel=1 privlevel=2", "given twice"),
    ("user", "keybroker:a/b/c", "vmpl=0", "unknown callout option 'vmpl'"),
    ("user", "keybroker:a/b/c", "privlevel", "is not name=value"),
    ("user", "keybroker:a/b/c", b"\xff", "not ASCII"),
    ("user", "keybroker:a/b/c", "a=b " * 100, "more than 256"),
])
def test_refused_requests(key_type, description, callout, message):
    with pytest.raises(DescriptionError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_request(key_type, description, callout)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(text)
    return path


def test_debug_refuses_a_callout_that_is_not_utf8_as_the_kernel_path_does(tmp_path, capsys):
    """argv holds the bytes undecoded (surrogateescape): the callout is the bytes the kernel would pass,
    refused as not ASCII (ENOKEY), not an internal error from encoding them back."""
    import os

    from keybroker.guest import handler

    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "http://127.0.0.1:9"\n')
    code = handler.run_debug("user", "keybroker:default/disk/root", os.fsdecode(b"privlevel=1\xff"), str(path))
    out = capsys.readouterr().out
    assert code == 1 and "errno=ENOKEY" in out and "callout is not ASCII" in out, out


def test_config_defaults_and_access(tmp_path):
    cfg = config.load(write(tmp_path, """
        [server]
        url = "https://kbs.example:8080/"
        ca = "/etc/keybroker/ca.pem"
        [[access]]
        resource = "default/*"
        uids = [1000]
        [[access]]
        resource = "shared/disk/*"
        gids = [100]
    """))
    assert cfg.server_url == "https://kbs.example:8080" and cfg.deadline == 30
    assert cfg.tsm_root == Path("/sys/kernel/config/tsm/report") and cfg.server_ca == Path("/etc/keybroker/ca.pem")
    assert cfg.may_obtain(0, frozenset({0}), "anything/at/all", "user")  # root
    assert cfg.may_obtain(1000, frozenset({1000}), "default/disk/root", "user")
    assert not cfg.may_obtain(1001, frozenset({1001}), "default/disk/root", "user")
    assert cfg.may_obtain(1001, frozenset({100}), "shared/disk/x", "user")
    # a rule's gids are granted to their members only: another group is not enough
    assert not cfg.may_obtain(1001, frozenset({1001, 101}), "shared/disk/x", "user")
    assert not cfg.may_obtain(1000, frozenset({1000}), "other/disk/root", "user")


def test_access_rules_can_restrict_the_key_type(tmp_path):
    cfg = config.load(write(tmp_path, """
        [server]
        url = "https://kbs.example"
        [[access]]
        resource = "secret/*"
        uids = [1000]
        key_types = ["logon"]
        [[access]]
        resource = "default/*"
        uids = [1000]
    """))
    assert cfg.may_obtain(1000, frozenset({1000}), "secret/disk/root", "logon")
    assert not cfg.may_obtain(1000, frozenset({1000}), "secret/disk/root", "user")  # not readable back
    assert cfg.may_obtain(1000, frozenset({1000}), "default/disk/root", "user")  # both by default
    for bad in ('key_types = []', 'key_types = ["trusted"]', 'key_types = "logon"'):
        path = tmp_path / "bad.toml"
        path.write_text(f'[server]\nurl = "https://x"\n[[access]]\nresource = "a/*"\nuids = [1]\n{bad}\n')
        with pytest.raises(ConfigError, match="key_types"):
            config.load(path)


def test_no_rules_means_root_only(tmp_path):
    cfg = config.load(write(tmp_path, '[server]\nurl = "http://127.0.0.1:8080"\n'))
    assert cfg.may_obtain(0, frozenset({0}), "default/disk/root", "user")
    assert not cfg.may_obtain(65534, frozenset({65534}), "default/disk/root", "user")


@pytest.mark.parametrize("text, message", [
    ("", "missing required key 'server'"),
    ("[server]\nurl = 'https://x'\nurll = 1\n", "unknown key 'server.urll'"),
    ("[server]\nurl = 'https://x'\n[handler]\ndeadline = 'soon'\n",
     "'handler.deadline' must be an integer or a number"),
    ("[server]\nurl = 'https://x'\n[handler]\ndeadline = 0\n", "between 2 and 600"),
    ("[server]\nurl = 'http://kbs.example'\n", "plain http only for a loopback"),
    ("[server]\nurl = 'ftp://x'\n", "must be an https:// URL"),
    ("[server]\nurl = 'https://kbs.example:99999'\n", "has no valid port: 'kbs.example:99999'"),
    ("[server]\nurl = 'https://kbs.example:http'\n", "has no valid port"),
    ("[server]\nurl = 'https://[::1'\n", "is not a URL: 'https://[::1'"),
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/*'\nuids = ['root']\n", "'access[0].uids' must be a list"),
    ("[server]\nurl = 'https://x'\n[[access]]\nuids = [0]\n", "missing required key 'access[0].resource'"),
    # ids the kernel cannot give a requester, and a pattern longer than any resource it could match
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/*'\nuids = [-1]\n", "'access[0].uids' must be a list"),
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/*'\ngids = [4294967296]\n",
     "'access[0].gids' must be a list of numeric ids"),
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/" + "*" * 199 + "'\nuids = [1]\n",
     "must be at most 200 characters"),
    # ? and [...] are fnmatch's wildcards too: a rule written with them granted what its text did not say.
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/disk/k?'\nuids = [1]\n",
     "'access[0].resource': resource pattern 'a/disk/k?' must be"),
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/[!b]*'\nuids = [1]\n", "(the only wildcard)"),
    ("[server]\nurl = 'https://x'\n[tsm]\nroot = true\n", "'tsm.root' must be a string, not a boolean"),
    ("[server\n", "not valid TOML"),
    ("[server]\nurl = 'https://x'\nca = 'ca.pem'\n", "'server.ca' must be an absolute path"),
    ("[server]\nurl = 'https://x'\n[tsm]\nroot = 'tsm'\n", "'tsm.root' must be an absolute path"),
    ("[server]\nurl = 'https://x'\n[tsm]\nservice_provider = 'tdx'\n", "must be \"svsm\""),
    ("[server]\nurl = 'https://x'\n[tsm]\nservice_guid = 'c476f1eb-0123-45a5-9641-b4e7dde5bfe3'\n",
     "needs 'tsm.service_provider'"),
    # Values tomllib or float() cannot take ended every command that loads the file in a traceback
    # (OverflowError, ValueError, RecursionError), and the handler's request in 'internal error'.
    ("[server]\nurl = 'https://x'\n[handler]\ndeadline = 0x" + "f" * 300 + "\n", "between 2 and 600"),
    ("[server]\nurl = 'https://x'\n[handler]\ndeadline = nan\n", "between 2 and 600"),
    ("[server]\nurl = 'https://x'\n[volumes.a]\nresource = 'a/b/c'\ndeadline = 0x" + "f" * 300 + "\n",
     "'volumes.a.deadline' must be between 1 and 3600"),
    ("[server]\nurl = 'https://x'\n[handler]\ndeadline = " + "9" * 5000 + "\n", "holds a value TOML cannot read"),
    ("[server]\nurl = 'https://x'\nx = " + "[" * 5000 + "]" * 5000 + "\n", "nests arrays or tables too deeply"),
    # A key type that is no string (an array, a table: unhashable) ended the load in a TypeError.
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/*'\nuids = [1]\nkey_types = [['logon']]\n",
     "'access[0].key_types' must list one or both of user, logon"),
    ("[server]\nurl = 'https://x'\n[[access]]\nresource = 'a/*'\nuids = [1]\nkey_types = [{}]\n",
     "'access[0].key_types' must list one or both of user, logon"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the client configuration .*absent\.toml: No such file"):
        config.load(tmp_path / "absent.toml")


def test_a_config_file_is_read_no_further_than_one_may_be():
    """It was read whole: install-handler --config /dev/zero (which loads it before any other check),
    place-key or keyfile-server with it grew until memory ran out."""
    with pytest.raises(ConfigError, match="the client configuration /dev/zero is larger than 1048576 bytes"):
        config.load("/dev/zero")


def test_a_fifo_named_as_configuration_is_not_waited_on(tmp_path):
    """open() of a FIFO nobody writes to waited for a writer for ever: a key request (until the
    handler's alarm), the agent or `keybroker serve --config FIFO` hung there. It now reads as an
    empty file, and a pipe that has a writer is still read."""
    from keybroker.server import config as server_config

    fifo = tmp_path / "client.toml"
    os.mkfifo(fifo, 0o600)

    refused = outcome_of_reading(config.load, fifo)
    assert isinstance(refused, ConfigError) and "missing required key 'server'" in str(refused)  # empty
    assert outcome_of_reading(lambda path: server_config.load(path, {}), fifo) is None  # empty: the defaults
    read, write = os.pipe()
    os.write(write, b'[server]\nurl = "http://127.0.0.1:1"\n')
    os.close(write)
    try:
        assert config.load(f"/proc/self/fd/{read}").server_url == "http://127.0.0.1:1"
    finally:
        os.close(read)


def test_a_sev_guest_names_its_evidence_broker_instead_of_configfs_tsm(tmp_path):
    cfg = config.load(write(tmp_path, '[server]\nurl = "http://127.0.0.1:1"\n[aeb]\nguest_handle = 3\n'))
    assert cfg.aeb is not None and cfg.aeb.address == "vsock:2:5577" and cfg.aeb.guest_handle == 3
    assert config.load(write(tmp_path, '[server]\nurl = "http://127.0.0.1:1"\n')).aeb is None
    for text, message in (('[aeb]\nguest_handle = 1\n[tsm]\nroot = "/x"\n', "two evidence sources"),
                          ("[aeb]\n", "missing required key 'aeb.guest_handle'"),
                          ('[aeb]\nguest_handle = 0\n', "guest handle 0"),
                          ('[aeb]\nguest_handle = 1\naddress = "tcp:1.2.3.4:5"\n', "vsock:CID:PORT or unix:/PATH"),
                          # int() refuses more than 4300 digits (ValueError): the load ended in a traceback
                          (f'[aeb]\nguest_handle = 1\naddress = "vsock:{"9" * 5000}:1"\n', "vsock:CID:PORT or unix"),
                          (f'[aeb]\nguest_handle = 1\naddress = "vsock:2:{"9" * 5000}"\n', "vsock:CID:PORT or unix"),
                          ('[aeb]\nguest_handle = 1\nport = 5\n', "unknown key 'aeb.port'")):
        with pytest.raises(ConfigError, match=message):
            config.load(write(tmp_path, f'[server]\nurl = "http://127.0.0.1:1"\n{text}'))


@pytest.mark.parametrize("text", ["a/b/" + "c" * 300, "a/b/" + "!" * 100, "a/b/c" + "!" * 300, "a/" + "!" * 300 + "/c"])
def test_a_refused_resource_is_quoted_no_longer_than_any_client_value(text):
    """docs/server.md: errors quote at most 64 characters of a value a client sent (80 were quoted)."""
    from keybroker.wire import QUOTE_MAX
    from keybroker.wire.resource import ResourcePath

    with pytest.raises(DescriptionError) as info:
        ResourcePath.parse(text)
    segment = max(text.split("/"), key=len)
    assert text[:QUOTE_MAX + 1] not in str(info.value) and segment[:QUOTE_MAX + 1] not in str(info.value)
