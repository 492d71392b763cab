"""The production key server on SQLite: policy denials that say why, the hash-chained audit
log, the authenticated admin API, resources sealed at rest and KEK rotation, metrics,
readiness, the configuration file, and systemd's readiness notification."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from keybroker.errors import ConfigError
from support import REPO
from support.kbs import attest, attestation, audit_records, challenge, keybroker
from support.servers import free_port, write_secret

SECRET = b"\x01disk key bytes\xfe"


def measurement_policy(tmp_path: Path, measurement: str) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"version": 1, "rules": [
        {"resources": ["default/disk/*"], "require": {"claim": "measurement", "in": [measurement]}},
        {"resources": ["default/key/*"]}]}))
    return path


def test_denial_names_its_reason_in_the_response_and_the_audit_log(tsm_sim, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    server = kbs("--policy", str(measurement_policy(tmp_path, "ab" * 48)))
    server.put("default/disk/root", SECRET)
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)

    denied = guest.fetch(server.url, "default/disk/root")
    assert denied.status_code == 401 and denied.json()["type"] == "urn:keybroker:error:PolicyDenied"
    detail = denied.json()["detail"]
    assert "policy version 1" in detail and "rule 0 (default/disk/*): claim measurement is" in detail
    assert f'not one of ["{"ab" * 48}"]' in detail
    allowed = guest.fetch(server.url, "default/key/a")
    assert allowed.status_code == 200 and guest.decrypt(allowed) == SECRET

    records = audit_records(server.db)
    admin, puts, attested, refused, released = records[0], records[1:3], records[3], records[4], records[5]
    assert admin["event"] == "admin" and admin["actor"].startswith("config:") and admin["policy_version"] == 1
    assert [r["reason"] for r in puts] == [f"put resource ({len(SECRET)} bytes)"] * 2
    assert all(r["actor"] == "local:root" for r in puts)
    assert attested["event"] == "attest" and attested["decision"] == "allow"
    assert attested["provider"] == "snp" and len(attested["measurement"]) == 96
    assert attested["peer"] == "127.0.0.1" and attested["session"] == guest.session_ref
    assert refused["event"] == "release" and refused["decision"] == "deny"
    assert refused["reason"] == detail and refused["resource"] == "default/disk/root"
    assert refused["policy_version"] == 1 and refused["measurement"] == attested["measurement"]
    assert released["decision"] == "allow" and released["resource"] == "default/key/a"
    assert released["hash"] == allowed.headers["Keybroker-Audit"]
    assert SECRET.hex() not in json.dumps(records) and guest.token not in json.dumps(records)
    assert keybroker("audit", "verify", "--db", server.db).returncode == 0


def test_refusals_of_sessions_are_audited_and_of_strangers_counted(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs(trust=False)  # the simulated ARK is not pinned: evidence proves nothing
    server.put("default/key/a", SECRET)
    http, nonce = challenge(server.url)
    _, body = attestation(root, nonce)
    for _ in range(3):  # a stranger's evidence writes nothing: the nonce is not spent, nothing audited
        refused = http.post(f"{server.url}/kbs/v0/attest", json=body)
        assert refused.status_code == 401 and "ark_pinned" in refused.json()["detail"]
    anonymous = requests.get(f"{server.url}/kbs/v0/resource/default/key/a")
    assert anonymous.status_code == 401
    assert [r for r in audit_records(server.db) if r["event"] != "admin"] == []  # past the policy and the put
    assert server.denials("evidence_ark_pinned") == 3 and server.denials("not_attested") == 1

    trusting = kbs(policy={"version": 1, "rules": [{"resources": ["other/*"]}]})
    trusting.put("default/key/a", SECRET)
    guest = attest(root, trusting.url)
    assert guest.fetch(trusting.url, "default/key/a").status_code == 401  # an attested session, refused
    release = [r for r in audit_records(trusting.db) if r["event"] == "release"]
    assert [(r["decision"], r["resource"], r["session"]) for r in release] == [
        ("deny", "default/key/a", guest.session_ref)] and "no policy rule covers" in release[0]["reason"]


def test_an_attested_session_is_refused_on_the_record_a_bounded_number_of_times(tsm_sim, kbs):
    """A genuine guest asking again and again for what it may not have costs the audit log at
    most REFUSALS_MAX records per attestation; its answers, its address's rate limit and what
    it may have are as before."""
    from keybroker.server.kbs import REFUSALS_MAX

    root = tsm_sim("sev_guest")
    server = kbs("--workers", "1", "--rate-burst", "10")  # one worker: one count; a small bucket to empty
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)
    answers = [guest.fetch(server.url, "default/key/missing", bearer=n % 2 == 0).status_code  # cookie and token:
               for n in range(REFUSALS_MAX + 3)]                                                 # one budget
    assert answers == [404] * (REFUSALS_MAX + 3)
    assert guest.decrypt(guest.fetch(server.url, "default/key/a")) == SECRET
    denied = [r for r in audit_records(server.db) if r["event"] == "release" and r["decision"] == "deny"]
    assert len(denied) == REFUSALS_MAX and {r["session"] for r in denied} == {guest.session_ref}
    assert server.denials("refusal_unrecorded") == 3 and server.denials("rate_limited") == 0
    again = attest(root, server.url)  # a new attestation from the same address: its refusals are recorded
    assert again.fetch(server.url, "default/key/missing").status_code == 404
    assert len([r for r in audit_records(server.db) if r["decision"] == "deny"]) == REFUSALS_MAX + 1


def test_audit_verify_detects_edited_and_removed_records(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    for _ in range(2):
        guest = attest(root, server.url)
        assert guest.fetch(server.url, "default/key/a").status_code == 200
    server.stop()
    good = keybroker("audit", "verify", "--db", server.db)
    assert good.returncode == 0 and "audit log intact: 6 records" in good.stdout.decode()
    listing = keybroker("audit", "list", "--db", server.db).stdout.decode().splitlines()  # 1: the policy
    assert len(listing) == 6 and re.match(r"4 \S+Z \S+:\d+ release allow peer=127.0.0.1 session=\w{16} "
                                          r"provider=snp measurement=\w{16} resource=default/key/a policy=1 "
                                          r'reason="rule 0 \(\*\): all conditions hold"', listing[3]), listing[3]

    path = server.db.removeprefix("sqlite:///")
    pristine = sqlite3.connect(":memory:")
    with sqlite3.connect(path) as db:
        db.backup(pristine)
    with sqlite3.connect(path) as db:  # the log refuses changes through the application's schema
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 3")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit WHERE seq = 3")

    def tamper(*statements: str) -> str:
        with sqlite3.connect(path) as db:
            pristine.backup(db)
            db.execute("DROP TRIGGER audit_no_update")
            db.execute("DROP TRIGGER audit_no_delete")
            for statement in statements:
                db.execute(statement)
        out = keybroker("audit", "verify", "--db", server.db)
        assert out.returncode == 1
        return out.stdout.decode()

    assert "record 4: its content does not match its hash (edited)" in \
        tamper("UPDATE audit SET decision = 'deny' WHERE seq = 4")
    assert "record 2 missing (removed from the log)" in tamper("DELETE FROM audit WHERE seq = 2")
    assert "the log ends at record 5 but the head says 6" in tamper("DELETE FROM audit WHERE seq = 6")
    rehashed = tamper("UPDATE audit SET reason = 'x', hash = '" + "0" * 64 + "' WHERE seq = 4")
    assert "record 4: its content" in rehashed and "record 5: its prev link" in rehashed


def test_admin_api_remote_commands_and_refusals(tsm_sim, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    server = kbs()
    token = str(server.secrets.admin_token_file)
    remote = ("--server", server.url, "--admin-token-file", token)
    value = tmp_path / "value"
    value.write_bytes(SECRET)
    assert keybroker("resource", "put", "default/key/r", "--file", str(value), "--lease", "90", *remote).returncode == 0
    assert keybroker("resource", "list", *remote).stdout == b"default/key/r\t16 bytes\tlease 90 s\n"
    guest = attest(root, server.url)
    released = guest.fetch(server.url, "default/key/r")
    assert guest.decrypt(released) == SECRET and released.headers["Keybroker-Lease"] == "90"
    refused = keybroker("resource", "get", "default/key/r", *remote)
    assert refused.returncode != 0 and b"the admin API never returns them" in refused.stderr

    policy = measurement_policy(tmp_path, "cd" * 48)
    assert keybroker("policy", "put", str(policy), *remote).stdout == b"policy version 2 is active\n"
    assert keybroker("policy", "put", str(policy), *remote).stdout == b"policy version 2 is active (unchanged)\n"
    assert json.loads(keybroker("policy", "get", *remote).stdout) == json.loads(policy.read_text())
    assert guest.fetch(server.url, "default/disk/x").json()["type"].endswith("PolicyDenied")
    assert keybroker("policy", "rm", *remote).returncode == 0
    versions = keybroker("policy", "list", *remote).stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in versions] == ["0", "1", "2", "3"]  # 1: the server's --policy
    assert versions[0].endswith("\tnone") and versions[2].split("\t")[3].startswith("token:")
    assert json.loads(keybroker("policy", "get", "--version", "0", *remote).stdout)["rules"] == []
    assert keybroker("resource", "rm", "default/key/r", *remote).returncode == 0
    assert keybroker("resource", "rm", "default/key/r", *remote).returncode != 0
    # A name that is not a resource's is refused before it is sent: 'x/../../policy' would reach /policy.
    for command in (("put", "x/../../policy", "--file", str(value)), ("rm", "x/../../policy"),
                    ("put", "default/../r", "--file", str(value))):
        bad = keybroker("resource", *command, *remote)
        assert bad.returncode != 0 and b"keybroker resource: resource " in bad.stderr, bad.stderr
    zero = keybroker("resource", "put", "default/key/z", "--file", str(value), "--lease", "0", *remote)
    assert zero.returncode != 0 and b"HTTP 400" in zero.stderr  # as --db refuses it; not 'no lease'
    assert [line.split("\t")[0] for line in keybroker("policy", "list", *remote).stdout.decode().splitlines()] \
        == ["0", "1", "2", "3"]

    wrong = write_secret(tmp_path / "wrong-token", b"w" * 64)
    for headers in ({}, {"Authorization": "Bearer " + "w" * 64}, {"Authorization": f"Basic {'x' * 40}"}):
        response = requests.put(f"{server.url}/admin/v1/resources/default/key/evil", data=b"x", headers=headers)
        assert response.status_code == 401 and response.json()["type"].endswith("Unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    out = keybroker("resource", "list", "--server", server.url, "--admin-token-file", str(wrong))
    assert out.returncode != 0 and b"HTTP 401 Unauthorized" in out.stderr
    # Callers without a valid admin token are refused, counted and logged, not audited: the audit
    # log is for changes, and a stranger must not be able to grow it.
    assert [r for r in audit_records(server.db) if r["event"] == "admin" and r["decision"] == "deny"] == []
    assert server.denials("admin_unauthorized") == 4
    assert "admin peer=127.0.0.1 status=401 problem=Unauthorized detail=no Bearer admin token" in server.log()
    changes = [r for r in audit_records(server.db) if r["event"] == "admin" and r["decision"] == "allow"]
    changes = changes[1:]  # the first: the policy the server started with
    fingerprint = changes[0]["actor"]
    assert re.fullmatch(r"token:[0-9a-f]{12}", fingerprint) and server.secrets.admin_token not in server.log()
    assert [r["reason"].split(" (")[0] for r in changes] == [
        "put resource", "set release policy", "removed the release policy: nothing is released",
        "deleted resource"]
    assert keybroker("resource", "list", "--db", server.db).stdout == b""


def test_admin_api_is_off_without_a_token_file(tmp_path):
    port = free_port()
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    db = f"sqlite:///{tmp_path}/kbs.db"
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "serve", "--listen", f"127.0.0.1:{port}",
                             "--db", db, "--kek-file", str(kek)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        response = requests.get(f"http://127.0.0.1:{port}/admin/v1/resources",
                                headers={"Authorization": "Bearer " + "t" * 64})
        assert response.status_code == 401 and "admin API is disabled" in response.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert audit_records(db) == []  # a refusal of an unauthenticated caller is counted, not audited


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the key server did not become ready"
        time.sleep(0.05)


def test_resources_are_sealed_at_rest_and_kek_rotation_keeps_serving(tsm_sim, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    server = kbs()
    old = str(server.secrets.kek)
    server.put("default/key/a", SECRET)
    server.put("default/key/b", SECRET * 2)
    path = Path(server.db.removeprefix("sqlite:///"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    server.stop()
    assert SECRET not in path.read_bytes() + Path(f"{path}-wal").read_bytes()
    new = str(write_secret(tmp_path / "new-kek", os.urandom(32).hex().encode() + b"\n"))
    wrong = keybroker("resource", "get", "default/key/a", "--db", server.db, "--kek-file", new)
    assert wrong.returncode == 1 and b"which this server does not have" in wrong.stderr

    # Rolling rotation: servers learn the new KEK (the old one still readable), then re-wrap.
    during = kbs("--kek-file", new, "--old-kek-file", old, db=server.db, secrets=server.secrets)
    guest = attest(root, during.url)
    assert guest.decrypt(guest.fetch(during.url, "default/key/a")) == SECRET
    rotated = keybroker("rotate-kek", "--db", server.db, "--kek-file", new, "--old-kek-file", old)
    assert rotated.returncode == 0 and rotated.stdout.startswith(b"re-wrapped 2 resources under KEK")
    assert guest.decrypt(guest.fetch(during.url, "default/key/b")) == SECRET * 2
    during.stop()
    after = kbs("--kek-file", new, db=server.db, secrets=server.secrets)
    guest = attest(root, after.url)
    assert guest.decrypt(guest.fetch(after.url, "default/key/a")) == SECRET
    assert keybroker("resource", "get", "default/key/b", "--db", server.db, "--kek-file", new).stdout == SECRET * 2
    stale = keybroker("resource", "get", "default/key/a", "--db", server.db, "--kek-file", old)
    assert stale.returncode == 1 and b"sealed under KEK" in stale.stderr
    with sqlite3.connect(path) as db:  # a sealed value moved to another path does not open
        db.execute("UPDATE resources SET sealed = (SELECT sealed FROM resources WHERE path = 'default/key/b') "
                   "WHERE path = 'default/key/a'")
    moved = guest.fetch(after.url, "default/key/a")
    assert moved.status_code == 500 and "cannot be unsealed" in moved.json()["detail"]
    assert "was altered" in after.log()
    assert audit_records(server.db)[-1]["reason"].startswith("resource default/key/a cannot be unsealed")


def test_a_lease_changed_in_the_database_does_not_release_and_rotation_binds_older_values(tsm_sim, kbs):
    """The lease is sealed with the value: someone who can write the database but has no KEK cannot
    lengthen or remove it. A value sealed before (with its path alone) still opens, and rotate-kek
    seals it again with its lease, under the same KEK too."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keybroker.server.sealing import NONCE_SIZE, Kek, _aad_unbound

    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET, "--lease", "60")
    path = Path(server.db.removeprefix("sqlite:///"))
    guest = attest(root, server.url)
    released = guest.fetch(server.url, "default/key/a")
    assert guest.decrypt(released) == SECRET and released.headers["Keybroker-Lease"] == "60"
    for lease in ("NULL", "86400"):
        with sqlite3.connect(path) as db:
            db.execute(f"UPDATE resources SET lease = {lease} WHERE path = 'default/key/a'")
        changed = guest.fetch(server.url, "default/key/a")
        assert changed.status_code == 500 and "cannot be unsealed" in changed.json()["detail"]
    assert "(its value or lease) was altered" in server.log()

    kek = Kek.load(server.secrets.kek)  # a row as a keybroker that bound only the path sealed it
    nonce = os.urandom(NONCE_SIZE)
    older = nonce + AESGCM(kek.key).encrypt(nonce, SECRET, _aad_unbound("default/key/a"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE resources SET sealed = ?, kek_id = ?, lease = 60 WHERE path = 'default/key/a'",
                   (older, kek.id))
    assert guest.decrypt(guest.fetch(server.url, "default/key/a")) == SECRET
    rotated = keybroker("rotate-kek", "--db", server.db, "--kek-file", str(server.secrets.kek))
    assert rotated.returncode == 0 and rotated.stdout.startswith(b"re-wrapped 1 resources"), rotated
    with sqlite3.connect(path) as db:
        db.execute("UPDATE resources SET lease = NULL WHERE path = 'default/key/a'")
    assert guest.fetch(server.url, "default/key/a").status_code == 500


@pytest.mark.parametrize("lease", ["60.5", "9e999", "'x'"])
def test_a_lease_that_is_no_integer_in_the_database_is_an_altered_row(tsm_sim, kbs, lease):
    """SQLite keeps what is written in an INTEGER column: a lease of 60.5 was put in the associated
    data as 60 (the value opened and was released with a lease the guest refuses), and infinity or
    text ended the release in a traceback (no audit record of the refusal) rather than naming the row."""
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET, "--lease", "60")
    path = Path(server.db.removeprefix("sqlite:///"))
    guest = attest(root, server.url)
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE resources SET lease = {lease} WHERE path = 'default/key/a'")
    changed = guest.fetch(server.url, "default/key/a")
    assert changed.status_code == 500 and "cannot be unsealed" in changed.json()["detail"], changed.text
    assert "(its value or lease) was altered" in server.log() and "Traceback" not in server.log()
    assert audit_records(server.db)[-1]["reason"].startswith("resource default/key/a cannot be unsealed")
    rotated = keybroker("rotate-kek", "--db", server.db, "--kek-file", str(server.secrets.kek))
    assert rotated.returncode != 0 and b"was altered" in rotated.stderr and b"Traceback" not in rotated.stderr
    # Listed as altered, by the admin API (the float or text made it a 500) and locally.
    remote = ("--server", server.url, "--admin-token-file", str(server.secrets.admin_token_file))
    for where in (remote, ("--db", server.db)):
        listed = keybroker("resource", "list", *where)
        assert listed.returncode == 0 and listed.stdout.startswith(b"default/key/a\tALTERED"), listed


@pytest.mark.parametrize("content, message", [
    (b"short", "must be 32 bytes or 64 hex digits, not 5 bytes"),
    (os.urandom(32), "accessible to group or others"),
], ids=["short", "loose"])  # ids, not the random bytes: pytest-xdist's workers collect alike
def test_bad_kek_files_are_refused(tmp_path, content, message):
    kek = write_secret(tmp_path / "kek", content)
    if message.startswith("accessible"):
        kek.chmod(0o644)
    out = keybroker("resource", "put", "a/b/c", "--db", f"sqlite:///{tmp_path}/x.db", "--kek-file", str(kek),
                    data=b"v")
    assert out.returncode == 1 and message in out.stderr.decode()
    missing = keybroker("resource", "put", "a/b/c", "--db", f"sqlite:///{tmp_path}/x.db", data=b"v",
                        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"})
    assert missing.returncode == 1 and "no key-encryption key" in missing.stderr.decode()


def test_kek_from_a_systemd_credential(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_secret(credentials / "kek", os.urandom(32))
    env = os.environ | {"CREDENTIALS_DIRECTORY": str(credentials)}
    db = f"sqlite:///{tmp_path}/x.db"
    assert keybroker("resource", "put", "a/b/c", "--db", db, data=b"value", env=env).returncode == 0
    assert keybroker("resource", "get", "a/b/c", "--db", db, env=env).stdout == b"value"


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


STRANGER = 65534  # nobody


def unhold(path: Path, change: str) -> None:
    """Give ``path`` to STRANGER (``change`` "owner") or the mode ``change`` (octal)."""
    if change == "owner":
        os.chown(path, STRANGER, -1)
    else:
        path.chmod(int(change, 8))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")


@needs_root
def test_secret_files_owned_by_another_user_are_refused(tmp_path):
    """A 0600 secret owned by someone else is theirs to rewrite (a KEK, an admin token of theirs): refused."""
    me, owner, stranger = user_name(0), user_name(STRANGER), STRANGER
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    os.chown(kek, stranger, -1)
    out = keybroker("resource", "put", "a/b/c", "--db", f"sqlite:///{tmp_path}/x.db", "--kek-file", str(kek),
                    data=b"v")
    assert out.returncode == 1 and "Traceback" not in out.stderr.decode()
    assert f"key-encryption key {kek} is owned by {owner}, who can rewrite it; a secret must be owned by root " \
           f"or {me}, the user this runs as: chown {me} {kek}" in out.stderr.decode(), out.stderr
    tokens = write_secret(tmp_path / "admin-token", b"x" * 64 + b"\n")
    os.chown(tokens, stranger, -1)
    out = keybroker("serve", "--listen", f"127.0.0.1:{free_port()}", "--db", f"sqlite:///{tmp_path}/x.db",
                    "--kek-file", str(write_secret(tmp_path / "kek2", os.urandom(32))),
                    "--admin-token-file", str(tokens))
    assert out.returncode == 1 and f"admin token file {tokens} is owned by {owner}" in out.stderr.decode()


@needs_root
def test_the_tls_key_is_held_to_the_rules_of_secrets(tmp_path):
    from support.pki import authority, server_files

    ca_key, ca_cert = authority(tmp_path, "ca")
    cert, key = server_files(tmp_path, ca_key, ca_cert)
    kek = write_secret(tmp_path / "kek", os.urandom(32))

    def serve() -> subprocess.CompletedProcess:
        return keybroker("serve", "--listen", f"127.0.0.1:{free_port()}", "--db", f"sqlite:///{tmp_path}/x.db",
                         "--kek-file", str(kek), "--tls-cert", cert, "--tls-key", key)
    os.chmod(key, 0o644)
    out = serve()
    assert out.returncode == 1 and f"TLS private key {key} is accessible to group or others (mode 0644): " \
        f"chmod 600 {key}" in out.stderr.decode(), out.stderr
    os.chmod(key, 0o600)
    os.chown(key, STRANGER, -1)
    out = serve()
    assert out.returncode == 1 and f"TLS private key {key} is owned by {user_name(STRANGER)}" in out.stderr.decode()
    # Debian keeps TLS keys 0640 in group ssl-cert, for the services that serve TLS: the group may read
    # one (what serve checks), never write it.
    from keybroker.server import secretfile

    os.chown(key, 0, -1)
    os.chmod(key, 0o640)
    secretfile.check(Path(key), "TLS private key", group_may_read=True)
    os.chmod(key, 0o660)
    with pytest.raises(ConfigError, match="accessible to group or others"):
        secretfile.check(Path(key), "TLS private key", group_may_read=True)


def test_a_systemd_credential_readable_through_its_acl_is_accepted(tmp_path):
    """systemd writes a credential 0400, owned by root, and lets the service's user read it with an
    ACL, whose mask stat shows as mode 0440: accepted there, and only there."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    kek = write_secret(credentials / "kek", os.urandom(32))
    kek.chmod(0o440)
    env = os.environ | {"CREDENTIALS_DIRECTORY": str(credentials)}
    db = f"sqlite:///{tmp_path}/x.db"
    assert keybroker("resource", "put", "a/b/c", "--db", db, data=b"value", env=env).returncode == 0
    assert keybroker("resource", "get", "a/b/c", "--db", db, env=env).stdout == b"value"
    elsewhere = keybroker("resource", "get", "a/b/c", "--db", db, "--kek-file", str(kek),
                          env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"})
    assert elsewhere.returncode == 1 and "accessible to group or others (mode 0440)" in elsewhere.stderr.decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in the metrics")


def test_metrics_health_and_readiness(tsm_sim, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    server = kbs("--policy", str(measurement_policy(tmp_path, "ab" * 48)))
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)
    assert guest.fetch(server.url, "default/key/a").status_code == 200
    assert guest.fetch(server.url, "default/key/a", bearer=True).status_code == 200
    assert guest.fetch(server.url, "default/disk/root").status_code == 401
    assert requests.get(f"{server.url}/kbs/v0/resource/default/key/a").status_code == 401
    http, nonce = challenge(server.url)
    _, body = attestation(root, "c29tZSBvdGhlciBub25jZQ==")
    body["runtime-data"]["nonce"] = nonce
    assert http.post(f"{server.url}/kbs/v0/attest", json=body).status_code == 401

    assert requests.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{server.url}/readyz").json() == {"status": "ready"}
    response = requests.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "keybroker_releases_total", provider="snp") == 2
    assert metric(text, "keybroker_attestations_total", provider="snp", result="verified") == 1
    assert metric(text, "keybroker_attestations_total", provider="snp", result="denied") == 1
    assert metric(text, "keybroker_denials_total", reason="policy_condition") == 1
    assert metric(text, "keybroker_denials_total", reason="not_attested") == 1
    assert metric(text, "keybroker_denials_total", reason="binding") == 1
    assert metric(text, "keybroker_http_requests_total", route="resource", status="200") == 2
    assert metric(text, "keybroker_http_requests_total", route="attest", status="401") == 1
    assert metric(text, "keybroker_http_request_duration_seconds_count", route="resource") == 4
    assert metric(text, "keybroker_http_request_duration_seconds_bucket", le="+Inf", route="auth") == 2


def test_config_file_is_equivalent_to_the_flags(tsm_sim, sim_state, tmp_path):
    from support.servers import ServerSecrets

    root = tsm_sim("sev_guest")
    secrets = ServerSecrets(tmp_path / "secrets")
    port = free_port()
    config = tmp_path / "server.toml"
    policy = measurement_policy(tmp_path, "ab" * 48)
    config.write_text(f'listen = "127.0.0.1:{port}"\ndb = "sqlite:///{tmp_path}/kbs.db"\nname = "replica-a"\n'
                      f'trust-roots = ["{sim_state}/trust"]\nkek-file = "secrets/kek"\n'
                      f'admin-token-file = "secrets/admin-token"\ntoken-key-file = "secrets/token-key.pem"\n'
                      f'policy = "{policy.name}"\nkds-url = ""\n')
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        value = tmp_path / "value"
        value.write_bytes(SECRET)
        assert keybroker("resource", "put", "default/key/a", "--file", str(value), "--server", url,
                         "--admin-token-file", str(secrets.admin_token_file)).returncode == 0
        guest = attest(root, url)
        assert guest.decrypt(guest.fetch(url, "default/key/a", bearer=True)) == SECRET
        assert guest.fetch(url, "default/disk/x").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    records = audit_records(f"sqlite:///{tmp_path}/kbs.db")
    assert {r["server"] for r in records if r["event"] != "admin" or r["actor"].startswith("token:")} == {"replica-a"}
    assert "token key shared" in (tmp_path / "server.log").read_text()
    config.write_text(config.read_text() + "colour = \"blue\"\n")
    out = keybroker("serve", "--config", str(config))
    assert out.returncode == 1 and "unknown key 'colour'" in out.stderr.decode()


def test_readiness_notification_after_the_socket_listens(tmp_path):
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    notify_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(30)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "serve", "--listen", f"127.0.0.1:{port}",
                             "--db", f"sqlite:///{tmp_path}/kbs.db", "--kek-file", str(kek)],
                            env=os.environ | {"NOTIFY_SOCKET": notify_path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\n") and f"STATUS=serving on 127.0.0.1:{port}" in ready
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # already listening
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal; systemd calls it clean
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_policy_check_explains_offline(tsm_sim, sim_state, tmp_path):
    root = tsm_sim("sev_guest")
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(keybroker("evidence", "--tsm-root", str(root), "--nonce", "00" * 64).stdout)
    trust = ("--trust-roots", str(sim_state / "trust"))
    policy = measurement_policy(tmp_path, "ab" * 48)
    denied = keybroker("policy", "check", str(policy), str(evidence), "--resource", "default/disk/root", *trust)
    text = denied.stdout.decode()
    assert denied.returncode == 1, denied.stderr
    assert "PASS  report_signature" in text and "rule 0 (default/disk/*): matches default/disk/root" in text
    assert re.search(r'  FAIL claim measurement is "[0-9a-f]{96}", not one of \["(ab){48}"\]', text)
    assert text.splitlines()[-1].startswith("=> DENY: rule 0 (default/disk/*): claim measurement is")
    allowed = keybroker("policy", "check", str(policy), str(evidence), "--resource", "default/key/x", *trust)
    assert allowed.returncode == 0 and allowed.stdout.decode().splitlines()[-1] == \
        "=> ALLOW: rule 1 (default/key/*): all conditions hold"
    untrusted = keybroker("policy", "check", str(policy), str(evidence), "--resource", "default/key/x")
    assert untrusted.returncode == 1 and "=> DENY: the evidence does not verify" in untrusted.stdout.decode()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "keybroker-server.service").read_text()
    for setting in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=keybroker",
                    "LoadCredential=kek:", "DynamicUser=yes", "CapabilityBoundingSet=\n"):
        assert setting in unit
    # Verify a copy whose ExecStart names this checkout's keybroker (the unit names /usr/local/bin).
    copy = tmp_path / "keybroker-server.service"
    copy.write_text(unit.replace("/usr/local/bin/keybroker", str(Path(sys.executable).parent / "keybroker")))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if str(copy) in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


# -- clients that hang up ---------------------------------------------------------------------

def hang_up(port: int, data: bytes, *, reset: bool) -> None:
    """Connect, send ``data`` and go away without reading the answer (with a RST when ``reset``)."""
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if data:
            sock.sendall(data)


def test_server_survives_clients_that_hang_up(tsm_sim, kbs):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    auth = json.dumps({"version": "0.4.0", "tee": "snp", "extra-params": {}}).encode()
    full = [b"garbage\r\n\r\n",
            b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(auth), auth),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /admin/v1/resources HTTP/1.1\r\nHost: x\r\n\r\n"]
    partial = [b"", b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{\"ver",
               b"GET /kbs/v0/resource/default/key/a HTTP/1.1\r\nHo"]
    for i in range(300):
        hang_up(server.port, partial[i % len(partial)], reset=i % 2 == 0)  # before a full request
        hang_up(server.port, full[i % len(full)], reset=i % 2 == 1)  # after one, before the answer
    time.sleep(0.5)
    assert server.proc.poll() is None, f"the server died ({server.proc.returncode}): {server.log()[-2000:]}"
    guest = attest(root, server.url)  # and it still releases
    released = guest.fetch(server.url, "default/key/a")
    assert released.status_code == 200 and guest.decrypt(released) == SECRET


def test_quiet_when_the_reader_of_standard_output_goes_away(tmp_path):
    db = f"sqlite:///{tmp_path / 'db'}"
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "policy", "get", "--db", db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes: its output meets a closed pipe
    status = proc.wait(30)
    assert status == 1 and proc.stderr.read() == b""


@pytest.mark.parametrize("name, content", [
    ("values.json", b'{"measurement": "ab", "chip_id": "cd"}'),  # the emulator's, not an anchor
    ("rsa.json", b'{"kty": "RSA", "n": "AQAB", "e": "AQAB"}'),
    ("list.json", b'[1, 2]'),
    ("garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"),
    ("empty.der", b""),
    # a public key of an algorithm the X.509 library does not know (UnsupportedAlgorithm, no ValueError)
    ("unknown.pem", b"-----BEGIN PUBLIC KEY-----\nMBYwCQYHKgMEBQYHCgMJAAECAwQFBgcI\n-----END PUBLIC KEY-----\n"),
])
def test_a_file_in_trust_roots_that_is_no_anchor_is_one_clear_line(tmp_path, name, content):
    folder = tmp_path / "trust"
    folder.mkdir()
    (folder / name).write_bytes(content)
    (folder / "notes.txt").write_text("other suffixes are not read")
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    out = keybroker("serve", "--listen", f"127.0.0.1:{free_port()}", "--db", f"sqlite:///{tmp_path / 'db'}",
                    "--kek-file", str(kek), "--trust-roots", str(folder))
    errors = [line for line in out.stderr.decode().splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert out.returncode == 1 and len(errors) == 1 and "Traceback" not in out.stderr.decode(), out.stderr
    assert errors[0].startswith(f"keybroker serve: trust anchor {folder / name} is not a root certificate")


def test_a_head_kept_outside_the_database_detects_a_rewritten_chain(tsm_sim, kbs, tmp_path):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/key/a", SECRET)
    guest = attest(root, server.url)
    assert guest.fetch(server.url, "default/key/a").status_code == 200
    server.stop()
    kept = keybroker("audit", "head", "--db", server.db).stdout.decode().strip()
    assert re.fullmatch(r"4:[0-9a-f]{64}", kept)  # policy, resource, attest, release
    assert keybroker("audit", "verify", "--db", server.db, "--known-head", kept).returncode == 0

    # Someone with the database's owner rights rewrites the whole chain consistently from record 2 on.
    from keybroker.server import audit
    from keybroker.server.store import Store

    path = server.db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("UPDATE audit SET reason = 'nothing to see' WHERE seq = 3")
    store = Store(server.db)
    with store.engine.begin() as db:  # recompute every hash and the head, as a careful forger would
        prev = "0" * 64
        for record in list(audit.records(store.engine)):
            digest = audit.digest(record.seq, record.time, record.event, prev)
            db.exec_driver_sql("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, record.seq))
            prev = digest
        db.exec_driver_sql("UPDATE audit_head SET hash = ?", (prev,))
    plain = keybroker("audit", "verify", "--db", server.db)
    assert plain.returncode == 0  # the chain alone cannot tell
    caught = keybroker("audit", "verify", "--db", server.db, "--known-head", kept)
    assert caught.returncode == 1 and b"record 4 is not the one whose hash was kept" in caught.stdout


def test_tokens_expire_with_their_session(tsm_sim, kbs):
    import base64

    root = tsm_sim("sev_guest")
    server = kbs()
    http, nonce = challenge(server.url)
    session_ends = next(c for c in http.cookies if c.name == "kbs-session-id").expires
    time.sleep(1.5)  # the token is issued later than the session began
    _, body = attestation(root, nonce)
    token = http.post(f"{server.url}/kbs/v0/attest", json=body).json()["token"]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["exp"] <= session_ends


def test_numbers_in_queries_are_ascii_decimal(tsm_sim, kbs):
    tsm_sim("sev_guest")
    server = kbs()
    auth = {"Authorization": f"Bearer {server.secrets.admin_token}"}
    for query in ("lease=²", "lease=١٢", "lease=-1", "lease=1e3"):
        answer = requests.put(f"{server.url}/admin/v1/resources/default/key/x?{query}", data=b"v", headers=auth)
        assert answer.status_code == 400 and "lease must be a number" in answer.json()["detail"], answer.text
    answer = requests.get(f"{server.url}/admin/v1/policy?version=²", headers=auth)
    assert answer.status_code == 400 and "version must be a number" in answer.json()["detail"]


@pytest.mark.parametrize("damage", ["cert", "key", "pair", "passphrase"])
def test_a_tls_certificate_and_key_that_make_no_server_are_refused_at_start(tmp_path, damage):
    """serve checked the TLS key's mode and owner only: a certificate or key that is not PEM, a key that is
    not the certificate's, or one under a passphrase passed, the supervisor said READY=1, and each worker
    failed in uvicorn's load_cert_chain (a traceback) and was started again, every second, for ever."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from support.pki import authority, server_files

    ca_key, ca_cert = authority(tmp_path, "ca")
    cert, key = server_files(tmp_path, ca_key, ca_cert)
    if damage == "cert":
        Path(cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    elif damage == "key":
        Path(key).write_bytes(b"not a key\n")
    else:
        other = ec.generate_private_key(ec.SECP256R1())
        encryption = (serialization.BestAvailableEncryption(b"secret") if damage == "passphrase"
                      else serialization.NoEncryption())
        if damage == "passphrase":
            other = serialization.load_pem_private_key(Path(key).read_bytes(), None)
        Path(key).write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  encryption))
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    try:
        out = subprocess.run([sys.executable, "-m", "keybroker", "serve", "--listen", f"127.0.0.1:{free_port()}",
                              "--db", f"sqlite:///{tmp_path}/x.db", "--kek-file", str(kek), "--tls-cert", cert,
                              "--tls-key", key, "--workers", "1"], capture_output=True, stdin=subprocess.DEVNULL,
                             timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with a TLS certificate and key that make no server")
    assert out.returncode == 1 and "Traceback" not in out.stderr.decode(), out.stderr
    assert f"the TLS certificate {cert} and private key {key} do not make a TLS server" in out.stderr.decode()


@needs_root
@pytest.mark.parametrize("loosen", ["folder 0777", "anchor 0666", "anchor owner", "folder owner", "parent 0777"])
def test_trust_roots_someone_else_may_change_are_refused(tmp_path, loosen):
    """--trust-roots was read whoever could write it: a folder (or a folder above it) others may write, or
    an anchor file of another user's, let them add the root that vouches for their own 'TEE' and have
    every key released to it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.verifier import TrustStore

    parent = tmp_path / "etc"
    folder = parent / "trust"
    folder.mkdir(parents=True)
    anchor = folder / "cpak.pem"
    anchor.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert len(TrustStore.default().with_dirs([folder]).cpaks) == 1
    what, change = loosen.split(" ")
    changed = {"folder": folder, "anchor": anchor, "parent": parent}[what]
    unhold(changed, change)
    with pytest.raises(ConfigError, match=rf"refusing trust[- ].* {changed} (belongs to uid|is writable by group)"):
        TrustStore.default().with_dirs([folder])


@needs_root
@pytest.mark.parametrize("loosen", ["policy 0666", "config owner", "certs 0777", "crl 0664", "collateral owner"])
def test_what_decides_a_release_someone_else_may_change_stops_the_server(tmp_path, loosen):
    """The server's configuration file, its --policy and the --certs and --collateral folders (and their
    files) were read whoever could write them: another user could allow every guest, or put an older
    CRL (one before a revocation) or older collateral where the verifier reads it."""
    from support.policies import ANY_GUEST

    certs, collateral = tmp_path / "certs", tmp_path / "collateral"
    for folder in (certs, collateral):
        folder.mkdir()
    (certs / "ark.crl").write_bytes(b"a CRL")
    policy = tmp_path / "policy.json"
    policy.write_text(ANY_GUEST.dumps())
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    config = tmp_path / "server.toml"
    config.write_text(f'db = "sqlite:///{tmp_path}/x.db"\nkek-file = "{kek}"\npolicy = "{policy}"\n'
                      f'certs = ["{certs}"]\ncollateral = "{collateral}"\n')
    what, change = loosen.split(" ")
    changed = {"policy": policy, "config": config, "certs": certs, "crl": certs / "ark.crl",
               "collateral": collateral}[what]
    unhold(changed, change)
    out = subprocess.run([sys.executable, "-m", "keybroker", "serve", "--config", str(config), "--listen",
                          f"127.0.0.1:{free_port()}", "--workers", "1"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=20)  # started: the test fails (TimeoutExpired)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(rf"refusing .* {re.escape(str(changed))} (belongs to uid {STRANGER}|is writable by group or "
                     "others)", out.stderr), out.stderr


@needs_root
@pytest.mark.parametrize("loosen", ["cache 0777", "cache owner", "above 1777", "above owner"])
def test_a_cache_folder_someone_else_may_change_stops_the_server(tmp_path, loosen):
    """The KDS and PCS answers kept in --cache-dir are used again while current (a CRL until its next
    update): another user who could write there put an older CRL (one before a revocation) or older
    collateral where the verifier reads it, and could make the folder first where it did not exist yet."""
    from keybroker.server.app import _check_held_inputs
    from keybroker.server.config import ServerConfig

    above = tmp_path / "above"
    cache = above / "cache"
    cache.mkdir(parents=True, mode=0o700)
    what, change = loosen.split(" ")
    changed = {"cache": cache, "above": above}[what]
    if what == "above":
        cache.rmdir()  # none yet: the server makes it where others may have made it first
    _check_held_inputs(ServerConfig(cache_dir=cache))  # held: accepted
    unhold(changed, change)
    with pytest.raises(ConfigError, match=rf"refusing cache folder {cache}.*: {changed} (belongs to uid {STRANGER}|"
                                          "is writable by group or others)"):
        _check_held_inputs(ServerConfig(cache_dir=cache))


@needs_root
@pytest.mark.parametrize("loosen", ["db 0666", "db owner", "folder 0777", "above 0777"])
def test_a_sqlite_database_someone_else_may_change_stops_the_server(tmp_path, loosen):
    """The SQLite file holds the policy, the sealed resources and the audit log: another user who could
    write it, or the folder it is in (or is yet to be made in), could put back a copy from before a
    resource was rotated or the policy tightened, or swap in an empty log. Its rows are sealed under the
    KEK, so such a copy is one the server wrote itself, and it was believed."""
    from keybroker.server.app import _check_held_inputs
    from keybroker.server.config import ServerConfig

    above = tmp_path / "above"
    folder = above / "kbs"
    folder.mkdir(parents=True, mode=0o700)
    db = folder / "kbs.db"
    db.touch(mode=0o600)
    config = ServerConfig(db=f"sqlite:///{db}", cache_dir=tmp_path)
    what, change = loosen.split(" ")
    changed = {"db": db, "folder": folder, "above": above}[what]
    if what == "above":
        db.unlink()
        folder.rmdir()  # none yet: the server makes it where others may have made it first
    _check_held_inputs(config)  # held: accepted
    unhold(changed, change)
    with pytest.raises(ConfigError, match=rf"refusing database {db}.*: {changed} (belongs to uid {STRANGER}|"
                                          "is writable by group or others)"):
        _check_held_inputs(config)


@needs_root
@pytest.mark.parametrize("option", ["certs", "collateral"])
def test_a_certificate_folder_not_made_yet_where_others_may_make_it_stops_the_server(tmp_path, option):
    """A --certs or --collateral folder that does not exist yet was accepted wherever it was to be: another
    user who could write the folder above made it later, with an older CRL or collateral in it."""
    from keybroker.server.app import _check_held_inputs
    from keybroker.server.config import ServerConfig

    above = tmp_path / "shared"
    above.mkdir()
    folder = above / option
    settings = {"certs": {"certs": (folder,)}, "collateral": {"collateral": folder}}[option]
    _check_held_inputs(ServerConfig(cache_dir=tmp_path, **settings))  # held: accepted
    above.chmod(0o1777)
    with pytest.raises(ConfigError, match=rf"refusing certificate or collateral folder {folder}.*: {above} is "
                                          "writable by group or others"):
        _check_held_inputs(ServerConfig(cache_dir=tmp_path, **settings))
