"""``keybroker audit`` on a live log: a verify while the server appends is not a tamper alarm."""

from __future__ import annotations

import time

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
