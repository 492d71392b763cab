"""``keybroker audit`` on a live log (a verify while the server appends is not a tamper alarm),
and on a database that is not there or not whole (reported, never created or mended)."""

from __future__ import annotations

import sqlite3
import time

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.server import audit, schema
from keybroker.server.audit import ADMIN, ALLOW, Event
from support.appender import appending
from support.kbs import keybroker


def fill(url: str, records: int) -> None:
    """A log of ``records`` records, so that reading it takes a while."""
    engine = schema.open_engine(url)
    with engine.begin() as db:
        seq, prev = audit.lock_head(db)
        audit.append(db, seq, prev, [Event(ADMIN, ALLOW, f"record {n}", "test") for n in range(records)])
    engine.dispose()


def test_verify_while_appends_go_on_reports_an_intact_log(tmp_path):
    url = f"sqlite:///{tmp_path}/kbs.db"
    fill(url, 3000)
    engine = schema.open_engine(url)
    with appending(url) as committed:
        while len(committed) < 3:
            time.sleep(0.01)
        verdicts = [audit.verify(engine) for _ in range(20)]
        cli = [keybroker("audit", "verify", "--db", url) for _ in range(3)]
        assert len(committed) > 20  # the appends went on meanwhile
    assert [v.problems for v in verdicts if not v.ok] == []
    assert all(v.records == v.head_seq >= 3000 for v in verdicts)
    assert [(out.returncode, out.stdout) for out in cli if out.returncode != 0] == []
    assert all(b"audit log intact" in out.stdout for out in cli)
    final = audit.verify(engine)
    assert final.ok and final.records > max(v.records for v in verdicts)


def test_audit_commands_do_not_create_a_database_they_are_given(tmp_path):
    """A mistyped --db is an error, not a new empty log reported intact."""
    url = f"sqlite:///{tmp_path}/typo/kbs.db"
    for action in ("verify", "list", "head"):
        out = keybroker("audit", action, "--db", url)
        assert out.returncode == 1 and b"intact" not in out.stdout, out.stdout
        assert f"there is no file {tmp_path}/typo/kbs.db".encode() in out.stderr, out.stderr
    assert not (tmp_path / "typo").exists()


def test_audit_commands_do_not_recreate_dropped_tables_or_head(tmp_path):
    """The audit tables dropped, or the head row deleted, is reported, and stays so."""
    url = f"sqlite:///{tmp_path}/kbs.db"
    fill(url, 3)
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        db.execute("DELETE FROM audit_head")
    verified = keybroker("audit", "verify", "--db", url)
    assert verified.returncode == 1 and b"BROKEN: the head row is missing" in verified.stdout, verified.stdout
    head = keybroker("audit", "head", "--db", url)
    assert head.returncode == 1 and b"the audit log has no head row" in head.stderr, head.stderr
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        assert db.execute("SELECT count(*) FROM audit_head").fetchone() == (0,)
        db.execute("DROP TABLE audit")
        db.execute("DROP TABLE audit_head")
    for action in ("verify", "list", "head"):
        out = keybroker("audit", action, "--db", url)
        assert out.returncode == 1 and b"intact" not in out.stdout, out.stdout
        assert b"has no table audit, audit_head: not a keybroker database, or its tables were dropped" in out.stderr
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "audit" not in tables and "audit_head" not in tables


def test_the_head_of_an_empty_log_is_a_known_head_that_holds(tmp_path):
    """`audit head` of a log without records (a server just installed) prints 0:GENESIS; kept and
    given back to `verify --known-head`, it was 'gone: the chain was cut or rewritten', on that same
    log and on every later one: a tamper alarm for an intact log."""
    url = f"sqlite:///{tmp_path}/kbs.db"
    schema.open_engine(url).dispose()
    head = keybroker("audit", "head", "--db", url)
    assert head.returncode == 0 and head.stdout.decode().strip() == f"0:{schema.GENESIS}"
    kept = head.stdout.decode().strip()
    assert keybroker("audit", "verify", "--db", url, "--known-head", kept).returncode == 0
    fill(url, 3)
    verified = keybroker("audit", "verify", "--db", url, "--known-head", kept)
    assert verified.returncode == 0 and b"audit log intact: 3 records" in verified.stdout, verified.stdout
    other = keybroker("audit", "verify", "--db", url, "--known-head", "0:" + "ab" * 32)
    assert other.returncode == 1 and b"BROKEN: the kept head 0:abababababababab... is not the empty log's" \
        in other.stdout, other.stdout


def test_verify_of_a_log_whose_every_record_was_edited_keeps_a_bounded_list_of_problems():
    """A problem per record was kept until the end (then all but 20 dropped): a log of millions of
    edited records filled the memory of `audit verify` before it could say BROKEN. The head's own
    problem, found last, is shown too."""
    import tracemalloc

    def edited(count: int):
        for seq in range(1, count + 1):
            yield audit.Record(seq, "2025-01-01T00:00:00.000000Z", Event(ADMIN, ALLOW, "x", "test"), "0" * 64,
                               "f" * 64)

    tracemalloc.start()
    try:
        verdict = audit._verify(edited(40000), (39999, "f" * 64), None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verdict.records == 40000 and len(verdict.problems) == 22
    assert verdict.problems[-2].startswith("the log ends at record 40000 but the head says 39999")
    assert verdict.problems[-1] == f"... and {1 + 2 * 39999 - 20} more problems"  # record 1 links to GENESIS
    assert peak < 1024 * 1024, peak


def test_verify_names_a_record_or_head_whose_column_was_given_another_type(tmp_path):
    """SQLite keeps a value of any type in any column once the triggers are dropped: a reason made a
    blob, a seq made text, or the head's seq made text ended `audit verify` in a traceback (and
    `audit head` and `audit list` too) instead of naming the edited record."""
    url = f"sqlite:///{tmp_path}/kbs.db"
    fill(url, 5)
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET reason = X'00' WHERE seq = 2")
        db.execute("UPDATE audit SET seq = 'x' WHERE seq = 4")
    out = keybroker("audit", "verify", "--db", url)
    assert out.returncode == 1 and b"Traceback" not in out.stderr, out.stderr
    assert b"record 2: a column holds a value of the wrong type (edited)" in out.stdout, out.stdout
    assert b"record 4 missing" in out.stdout and b"a record's seq is 'x', not a number (edited)" in out.stdout
    for listed in (keybroker("audit", "list", "--db", url), keybroker("audit", "list", "--json", "--db", url)):
        assert listed.returncode == 0 and listed.stdout.count(b"\n") == 5, listed.stderr
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        db.execute("UPDATE audit_head SET seq = 'x'")
    out = keybroker("audit", "verify", "--db", url)
    assert out.returncode == 1 and b"Traceback" not in out.stderr, out.stderr
    assert b"the head row holds a value of the wrong type (the head was edited)" in out.stdout, out.stdout
    head = keybroker("audit", "head", "--db", url)
    assert head.returncode == 1 and b"head row holds a value of the wrong type" in head.stderr, head.stderr


def test_verify_holds_a_whole_chain_to_its_head_and_to_a_kept_head():
    """A chain intact record by record is still broken when the head row's hash is not its last record's,
    or when the record whose hash was kept now has another: the last record rewritten with its head, or
    the whole chain rewritten, since."""
    chain, prev = [], schema.GENESIS
    for seq in (1, 2, 3):
        stamp, event = f"2025-01-01T00:00:0{seq}.000000Z", Event(ADMIN, ALLOW, f"record {seq}", "test")
        prev = audit.digest(seq, stamp, event, prev)
        chain.append(audit.Record(seq, stamp, event, chain[-1].hash if chain else schema.GENESIS, prev))
    last, second = chain[-1].hash, chain[1].hash
    assert audit._verify(iter(chain), (3, last), (2, second)).ok
    other = "e" * 64
    assert audit._verify(iter(chain), (3, other), None).problems == (
        "the head hash differs from record 3's hash (the last record or the head was edited)",)
    rewritten = audit._verify(iter(chain), (3, last), (2, other)).problems
    assert len(rewritten) == 1 and rewritten[0].startswith("record 2 is not the one whose hash was kept")


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.builds(Event, *(st.text() for _ in range(4)), **{name: st.text() for name in (
    "peer", "actor", "session", "provider", "measurement", "resource")},
    policy_version=st.none() | st.integers(0, 2**31 - 1)),
    st.integers(1, 2**53 - 1), st.text(), st.text())
def test_a_record_is_hashed_over_its_rfc_8785_form(event, seq, time, prev):
    """The hash is over RFC 8785's bytes, as rfc8785 writes them: logs written before the
    standard library's encoder took over verify, and others can recompute every hash."""
    content = {"seq": seq, "time": time, **event.as_dict(), "prev": prev}
    assert audit.canonical(content) == rfc8785.dumps(content)


def test_a_record_with_an_integer_beyond_i_json_hashes_to_no_record():
    """Only an edit puts such a number in a record; verify names the record rather than failing."""
    event = Event(ADMIN, ALLOW, "x", "test", policy_version=2**60)
    with pytest.raises(rfc8785.IntegerDomainError):
        rfc8785.dumps(event.as_dict())
    assert audit.canonical(event.as_dict()) == b'{"actor":"","decision":"allow","event":"admin","measurement":"",' \
        b'"peer":"","policy_version":1152921504606846976,"provider":"","reason":"x","resource":"","server":"test",' \
        b'"session":""}'
