"""The documented table of what a requester sees on failure (docs/guest.md) is what the handler does."""

from __future__ import annotations

import errno as E
import re

from keybroker.errors import (
    AccessDenied,
    ConfigError,
    DescriptionError,
    ProtocolError,
    ReleaseRefused,
    ResourceMissing,
    ResourceUnfit,
    ServerError,
    ServerUnreachable,
    TsmError,
)
from keybroker.guest.client import ReleasedKey
from keybroker.guest.handler import Stopped, _outcome, classify
from keybroker.wire import rcar as p
from keybroker.wire.resource import VALUE_MAX
from support import REPO
from support.servers import raw_server

GUIDE = REPO / "docs" / "guest.md"

#: One or more failures of each kind the table names, by the row's first cell.
CASES = {
    "attestation or policy denied": [ReleaseRefused("denied", status=401, problem=p.ATTESTATION_DENIED),
                                     ReleaseRefused("denied", status=401, problem=p.POLICY_DENIED)],
    "unknown resource, description or callout outside the grammar": [
        ResourceMissing("absent", status=404, problem=p.RESOURCE_NOT_FOUND), DescriptionError("bad")],
    "resource larger than a key holds (32767 bytes), or empty": [ResourceUnfit("resource x is 40000 bytes")],
    "requester not allowed by `[[access]]`": [AccessDenied("no")],
    "server unreachable or hanging up (in the TLS handshake too), deadline passed": [
        ServerUnreachable("down", errno=code)
        for code in (E.ECONNREFUSED, E.ENETUNREACH, E.EHOSTUNREACH, E.ETIMEDOUT, E.ECONNRESET)],
    "server error (HTTP 5xx)": [ServerError("oops", status=code, problem=None) for code in (500, 502, 503)],
    "server limiting this address (HTTP 429)": [ServerError("slow down", status=429, problem=p.TOO_MANY_REQUESTS)],
    "protocol error (a malformed answer, another HTTP error, a failed TLS handshake)": [
        ProtocolError("garbled"), ServerError("bad", status=400, problem=p.BAD_REQUEST),
        ServerError("TLS with the server failed", status=0, problem=None),  # what the client raises for TLS
        ServerError("session", status=401, problem=p.UNKNOWN_SESSION)],
    "evidence unavailable, provider busy": [TsmError("busy", errno=E.EBUSY, transient=True),
                                            TsmError("slow", errno=E.ETIMEDOUT, transient=True),
                                            # configfs-tsm's ENOMEM; an evidence broker that hung up or
                                            # a guest out of descriptors (aeb): all transient
                                            TsmError("no memory", errno=E.ENOMEM, transient=True),
                                            TsmError("broker gone", errno=E.EPIPE, transient=True),
                                            TsmError("no fds", errno=E.EMFILE, transient=True)],
    "evidence unavailable, provider failed": [TsmError("gone", errno=E.ENXIO), TsmError("none", errno=E.ENODEV),
                                              TsmError("failed", errno=E.EIO)],
    "client configuration missing or invalid": [ConfigError("no file")],
    "handler stopped (SIGTERM, SIGHUP, SIGINT; its worker with it)": [Stopped("the handler was stopped by SIGTERM")],
}


def documented_table() -> dict[str, tuple[str, str]]:
    text = GUIDE.read_text()
    table = text[text.index("| cause | the requester sees | cached for |"):].split("\n\n")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {cause: (sees, cached) for cause, sees, cached in rows}


def test_every_row_of_the_documented_table_is_what_the_handler_does():
    table = documented_table()
    assert set(table) == set(CASES), "a row was added or renamed: give it failures in CASES"
    for cause, (sees, cached) in table.items():
        named = set(re.findall(r"\bE[A-Z]{2,}\b", sees))
        for failure in CASES[cause]:
            outcome = classify(failure)
            assert E.errorcode[outcome.errno] in named, (cause, failure, outcome)
            assert cached == f"{outcome.timeout} s", (cause, failure, outcome)


def test_a_released_resource_no_key_can_hold_is_refused_as_too_long_and_wiped():
    """A Trustee KBS may hold resources of any size; a user or logon key holds 1 to 32767 bytes."""
    for size in (0, VALUE_MAX + 1):
        released = ReleasedKey(bytearray(b"k" * size), None)
        header, value = _outcome(lambda released=released: released, "user", "default/big/one")
        assert (header["errno"], header["timeout"]) == (E.EMSGSIZE, 60), header
        assert f"resource default/big/one is {size} bytes" in str(header["reason"])
        assert not value and released.value == bytearray(size)
    header, value = _outcome(lambda: ReleasedKey(bytearray(b"k" * VALUE_MAX), 30), "logon", "default/big/one")
    assert header == {"size": VALUE_MAX, "lease": 30} and len(value) == VALUE_MAX


def test_what_the_handler_calls_transient_the_disk_unlock_waits_out():
    """A failure the handler caches for the transient time (the server away, a busy provider, a stopped
    handler) is one the unlock's retry loop retries, not a refusal that sends the volume to its prompt."""
    from keybroker.guest.handler import TRANSIENT
    from keybroker.guest.unlock.retry import TRANSIENT_ERRNOS

    for failure in (failure for failures in CASES.values() for failure in failures):
        outcome = classify(failure)
        if outcome.timeout == TRANSIENT:
            assert outcome.errno in TRANSIENT_ERRNOS, (failure, E.errorcode[outcome.errno])


def test_an_answer_that_is_not_http_is_a_protocol_error_and_a_cut_one_a_reset():
    """A key server (or what its URL names) that answers whole but not in HTTP/1.x is the table's "malformed
    answer" (EPROTO, not retried), not ECONNRESET "cannot reach" that the disk unlock waits out for good;
    an answer cut short before its status line ended is still the connection reset it is."""
    import contextlib
    import socket
    import time

    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.guest.client import RcarClient

    def answered(answer: bytes) -> tuple[BaseException, int]:
        accepted = []

        def serve(conn: socket.socket) -> None:
            accepted.append(conn)
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(answer)

        with raw_server(serve) as port:
            client = RcarClient(f"http://127.0.0.1:{port}", deadline=time.monotonic() + 10, attempts=3,
                                backoff=0.05)
            with pytest.raises((ProtocolError, ServerUnreachable)) as failed:
                client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
        return failed.value, len(accepted)

    for answer in (b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/2.0 200 OK\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
                   b"HTTP/1.1 200 OK\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n"):
        failure, connections = answered(answer)
        assert isinstance(failure, ProtocolError), (answer[:30], failure)
        assert classify(failure).errno == E.EPROTO and "not HTTP/1.x" in str(failure)
        assert connections == 1  # not retried
    for answer in (b"", b"HTTP/1.1 2", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"):  # the last: IncompleteRead
        failure, connections = answered(answer)
        assert isinstance(failure, ServerUnreachable) and failure.errno == E.ECONNRESET, (answer, failure)
        assert connections == 3


def test_a_status_past_599_is_a_protocol_error_not_a_server_error():
    """http.client reads any three digits as the status: 600 to 999 are no HTTP status, so not the table's
    "server error (HTTP 5xx)" (EIO, retried, transient) but a malformed answer."""
    import time

    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.guest.client import RcarClient
    from support.stub import QuietHandler, StubServer

    asked = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(999)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = StubServer(Handler)
    try:
        client = RcarClient(server.url, deadline=time.monotonic() + 10, attempts=3, backoff=0.05)
        with pytest.raises(ProtocolError) as failed:
            client.fetch_with_token("default/disk/root", "a.b.c", ec.generate_private_key(ec.SECP256R1()))
    finally:
        server.close()
    assert classify(failed.value).errno == E.EPROTO and "999" in str(failed.value)
    assert len(asked) == 1


def test_an_errno_the_kernel_would_misread_never_reaches_it():
    """EAGAIN reads as 'not found' and ERESTART* are invalid for keyctl_reject: from a provider, the
    keyring, or an answer (the agent's or the worker's), such an errno becomes EIO (EBUSY when transient);
    EINTR from a provider is a busy one."""
    import pytest

    from keybroker.errors import KeyringError
    from keybroker.guest.handler import Failed, _from_answer

    for code in (E.EAGAIN, 512, 513, 514, 516):
        assert classify(TsmError("odd", errno=code)).errno == E.EIO
        assert classify(TsmError("odd", errno=code, transient=True)).errno == E.EBUSY
        assert classify(KeyringError("keyctl_setperm", code)).errno == E.EIO
        value = bytearray(b"left")
        with pytest.raises(Failed) as failed:
            _from_answer({"errno": code, "timeout": 5, "reason": "r"}, value)
        assert failed.value.rejection.errno == E.EIO and value == bytearray(4)
    assert classify(TsmError("interrupted", errno=E.EINTR)).errno == E.EBUSY
    assert classify(KeyringError("keyctl_setperm", E.EDQUOT)).errno == E.EDQUOT


def test_an_answer_malformed_or_cut_short_is_refused_and_wiped():
    import pytest

    from keybroker.guest.handler import Failed, _from_answer

    for header, why in (({"errno": "EACCES", "timeout": 60, "reason": "r"}, "malformed"),
                        ({"errno": E.EACCES, "timeout": "60", "reason": "r"}, "malformed"),
                        ({"errno": E.EACCES, "timeout": 60, "reason": None}, "malformed"),
                        ({"size": 5, "lease": 30}, "cut short"), ({"lease": 30}, "cut short")):
        value = bytearray(b"four")
        with pytest.raises(Failed) as failed:
            _from_answer(header, value)
        assert (failed.value.rejection.errno, failed.value.rejection.timeout) == (E.EIO, 10), header
        assert why in failed.value.rejection.reason and value == bytearray(4), header
    assert _from_answer({"size": 4, "lease": 30}, bytearray(b"four")) == (bytearray(b"four"), 30)
    assert _from_answer({"size": 4, "lease": "30"}, bytearray(b"four")) == (bytearray(b"four"), None)
    with pytest.raises(Failed) as failed:
        _from_answer({"errno": E.EKEYREJECTED, "timeout": 60, "reason": "denied"}, bytearray())
    assert (failed.value.rejection.errno, failed.value.rejection.timeout) == (E.EKEYREJECTED, 60)


def test_authorise_decides_for_the_requester_s_ids_and_key_type(tmp_path, monkeypatch):
    """In process (the kernel tests run the installed handler): the key's uid, its gid and the user's
    groups, and the key type asked for, are what the [[access]] rules are held to."""
    import os
    import pwd

    import pytest

    from keybroker.guest import config, handler

    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "https://kbs.example"\n'
                    '[[access]]\nresource = "secret/*"\nuids = [1000]\nkey_types = ["logon"]\n'
                    '[[access]]\nresource = "team/*"\ngids = [300]\n')
    cfg = config.load(path)
    assert handler._authorise(cfg, "logon", "keybroker:secret/disk/k", b"", 1000, 1000).key_type == "logon"
    for key_type, description, uid, gid in (("user", "keybroker:secret/disk/k", 1000, 1000),
                                            ("logon", "keybroker:secret/disk/k", 1001, 1000),
                                            ("user", "keybroker:team/disk/k", 4000000, 4000000)):
        with pytest.raises(AccessDenied, match=f"requester uid {uid} gid {gid} may not obtain"):
            handler._authorise(cfg, key_type, description, b"", uid, gid)
    assert handler._authorise(cfg, "user", "keybroker:team/disk/k", b"", 4000000, 300)  # the key's gid
    with pytest.raises(DescriptionError):
        handler._authorise(cfg, "logon", "keybroker:secret/disk/k", b"privlevel=9", 0, 0)

    # a user's supplementary groups come from the group database; an unknown uid has the key's gid only
    assert handler._groups(4000000, 4000000) == frozenset({4000000})
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: type("pw", (), {"pw_name": "alice"})())
    monkeypatch.setattr(os, "getgrouplist", lambda name, gid: [gid, 300] if name == "alice" else [gid])
    assert handler._groups(1002, 1002) == frozenset({1002, 300})
    assert handler._authorise(cfg, "user", "keybroker:team/disk/k", b"", 1002, 1002)


def test_construction_keeps_the_key_to_its_possessors_leases_it_and_negative_caches_at_least_a_second(
        monkeypatch):
    """Permissions first (without SETATTR the requester cannot lift the lease), then the lease, then the
    key; a rejection whose timeout an agent gave as 0 or less still caches for a second."""
    import signal

    from keybroker.guest import keyring
    from keybroker.guest.handler import Construction, Rejection

    calls: list[tuple] = []
    for name in ("setperm", "set_timeout", "instantiate", "reject"):
        monkeypatch.setattr(keyring, name, lambda *args, name=name: calls.append((name, *args)))
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        Construction(11).instantiate(bytearray(b"k"), 300)
        Construction(12).instantiate(bytearray(b"k"), None)
        for timeout in (0, -5):
            Construction(13).reject(Rejection(E.EACCES, timeout, "no"))
        done = Construction(14)
        done.instantiate(bytearray(b"k"), None)
        done.reject(Rejection(E.EIO, 10, "after"))  # ended once: no reject after an instantiate
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
    assert calls == [("setperm", 11, keyring.POSSESSOR_ONLY), ("set_timeout", 11, 300),
                     ("instantiate", 11, bytearray(b"k"), 0),
                     ("setperm", 12, keyring.POSSESSOR_ONLY), ("instantiate", 12, bytearray(b"k"), 0),
                     ("reject", 13, 1, E.EACCES, 0), ("reject", 13, 1, E.EACCES, 0),
                     ("setperm", 14, keyring.POSSESSOR_ONLY), ("instantiate", 14, bytearray(b"k"), 0)]
    # possessors may view, read, search and link it; no SETATTR or WRITE, nothing for anyone else
    assert keyring.POSSESSOR_ONLY == 0x1b000000


def test_the_server_s_refusals_are_refusals_once_and_an_oversized_answer_a_protocol_error():
    """In process: a policy or attestation denial and a missing resource are the server's judgement
    (EKEYREJECTED, ENOKEY; asked once, not retried as a server error), a 503 is retried, and an answer
    over RESPONSE_MAX is refused however it is framed."""
    import json
    import time

    import pytest
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.guest.client import RESPONSE_MAX, RcarClient
    from support.stub import QuietHandler, StubServer

    asked = []
    answers = {"/deny": (401, p.problem(p.POLICY_DENIED, "no")), "/att": (401, p.problem(p.ATTESTATION_DENIED, "no")),
               "/gone": (404, p.problem(p.RESOURCE_NOT_FOUND, "no")), "/busy": (503, {"detail": "later"}),
               "/big": (200, {"pad": "x" * RESPONSE_MAX})}

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            name = "/" + self.path.split("/")[-1]
            asked.append(name)
            status, body = answers[name]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = StubServer(Handler)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        for tag, kind, errno in (("deny", ReleaseRefused, E.EKEYREJECTED), ("att", ReleaseRefused, E.EKEYREJECTED),
                                 ("gone", ResourceMissing, E.ENOKEY), ("big", ProtocolError, E.EPROTO),
                                 ("busy", ServerError, E.EIO)):
            asked.clear()
            client = RcarClient(server.url, deadline=time.monotonic() + 10, attempts=2, backoff=0.05)
            with pytest.raises(kind) as failed:
                client.fetch_with_token(f"default/disk/{tag}", "a.b.c", key)
            assert classify(failed.value).errno == errno, (tag, failed.value)
            assert asked == ["/" + tag] * (2 if tag == "busy" else 1), (tag, asked)
            if tag == "big":
                assert "larger than" in str(failed.value)
    finally:
        server.close()
