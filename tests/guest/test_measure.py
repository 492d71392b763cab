"""Runtime measurement on the emulated TD: keybroker measure, the runtime log, crash repair, the evidence log."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keybroker.errors import EventLogError, TsmError
from keybroker.guest import config, measure
from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.verifier.tdx.abi import parse_quote
from keybroker.verifier.tdx.eventlog import claims, replay
from keybroker.wire import eventlog as wire
from keybroker.wire.eventlog import RuntimeEvent, parse_event_log

NONCE = bytes(range(64))


def td(tsm_sim, tmp_path: Path) -> tuple[Path, config.MeasureConfig]:
    report_root = tsm_sim("tdx_guest")
    mount = report_root.parent.parent
    cfg = config.MeasureConfig(root=mount / "sys/class/misc/tdx_guest/measurements",
                               log=tmp_path / "run" / "runtime-eventlog",
                               ccel=mount / "sys/firmware/acpi/tables/data/CCEL",
                               ccel_table=mount / "sys/firmware/acpi/tables/CCEL")
    return report_root, cfg


def quote_with_log(report_root: Path, cfg: config.MeasureConfig) -> tuple[tuple[bytes, ...], bytes]:
    with measure.evidence_log(cfg) as read_log:
        quote = TsmClient(report_root).get_report(ReportRequest(NONCE)).outblob
        return parse_quote(quote).body.rtmrs, read_log()


def test_keybroker_measure_extends_and_the_next_quote_replays(tsm_sim, tmp_path):
    report_root, cfg = td(tsm_sim, tmp_path)
    toml = tmp_path / "client.toml"
    toml.write_text(f'[server]\nurl = "http://127.0.0.1:1"\n[measure]\nroot = "{cfg.root}"\nlog = "{cfg.log}"\n'
                    f'ccel = "{cfg.ccel}"\nccel_table = "{cfg.ccel_table}"\n')
    out = subprocess.run([sys.executable, "-m", "keybroker", "measure", "--config", str(toml), "--domain",
                          "example.org", "--operation", "image-pull", "--content", "registry/app@sha256:ab"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    event = RuntimeEvent("example.org", "image-pull", "registry/app@sha256:ab")
    rtmr3 = hashlib.sha384(bytes(48) + event.digest()).digest()
    assert out.stdout == f"RTMR3 {rtmr3.hex()}\n"
    assert cfg.log.read_bytes() == event.encode()
    assert oct(cfg.log.stat().st_mode & 0o777) == "0o600" and oct(cfg.log.parent.stat().st_mode & 0o777) == "0o700"
    rtmrs, log = quote_with_log(report_root, cfg)
    assert rtmrs[3] == rtmr3
    result = replay(parse_event_log(log))
    assert result.rtmrs == rtmrs
    assert claims(result)["tdx.runtime_events"] == [
        {"rtmr": 3, "domain": "example.org", "operation": "image-pull", "content": "registry/app@sha256:ab"}]


def test_root_s_commands_refuse_a_configuration_others_may_change(tmp_path):
    """keybroker measure, place-key, keyfile-server and askpass-agent run as root (units at boot, an operator)
    and loaded the client configuration unchecked: whoever could change it chose what root measures (and
    where it writes), or which keys it serves and places. They now hold it as the handler does."""
    toml = tmp_path / "client.toml"
    toml.write_text('[server]\nurl = "http://127.0.0.1:1"\n')
    toml.chmod(0o666)
    for command in (["measure", "--config", str(toml), "--domain", "example.org", "--operation", "x", "--content", "y"],
                    ["place-key", "--config", str(toml), "root"]):
        out = subprocess.run([sys.executable, "-m", "keybroker", *command], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and f"{toml} is writable by group or others (mode 0666)" in out.stderr, out.stderr


def test_several_events_replay_and_a_repeated_release_is_measured_once(tsm_sim, tmp_path):
    report_root, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("a.example", "one", "1"))
    measure.measure(cfg, RuntimeEvent("a.example", "two", "2"))
    released = measure.release_event("default/disk/root", "https://kbs.example")
    value = measure.measure(cfg, released, once=True)
    assert measure.measure(cfg, released, once=True) == value  # the log holds it already: no second extend
    measure.measure(cfg, RuntimeEvent("a.example", "two", "2"))  # without once: every time
    rtmrs, log = quote_with_log(report_root, cfg)
    result = replay(parse_event_log(log))
    assert result.rtmrs == rtmrs
    assert [(e["rtmr"], e["operation"]) for e in claims(result)["tdx.runtime_events"]] == [
        (3, "one"), (3, "two"), (3, "release"), (3, "two")]


def test_a_runtime_log_others_could_write_is_refused(tsm_sim, tmp_path):
    _, cfg = td(tsm_sim, tmp_path)
    cfg.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.log.write_bytes(b"")
    os.chmod(cfg.log, 0o666)
    with pytest.raises(TsmError, match="refusing the runtime log"):
        measure.measure(cfg, RuntimeEvent("a.example", "one", "1"))
    cfg.log.unlink()
    os.chmod(cfg.log.parent, 0o777)
    with pytest.raises(TsmError, match="writable by group or others"):
        measure.measure(cfg, RuntimeEvent("a.example", "one", "1"))


def test_a_crash_between_log_and_extend_is_repaired(tsm_sim, tmp_path):
    report_root, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("a.example", "kept", "1"))
    kept = cfg.log.read_bytes()
    with open(cfg.log, "ab") as log:  # appended and synced, then the power went: never extended
        log.write(RuntimeEvent("a.example", "lost", "2").encode())
    rtmrs, log = quote_with_log(report_root, cfg)
    assert cfg.log.read_bytes() == kept and replay(parse_event_log(log)).rtmrs == rtmrs
    with open(cfg.log, "ab") as log:  # torn in the middle of the append
        log.write(RuntimeEvent("a.example", "torn", "3").encode()[:70])
    measure.measure(cfg, RuntimeEvent("a.example", "after", "4"))
    rtmrs, log = quote_with_log(report_root, cfg)
    result = replay(parse_event_log(log))
    assert result.rtmrs == rtmrs
    assert [e["operation"] for e in claims(result)["tdx.runtime_events"]] == ["kept", "after"]


def test_a_failed_extend_leaves_no_record(tsm_sim, tmp_path):
    report_root, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("a.example", "kept", "1"))
    kept = cfg.log.read_bytes()
    broken = dataclasses.replace(cfg, root=tmp_path / "nowhere")
    with pytest.raises(TsmError, match=r"no tsm-mr register .*Linux 6\.16"):
        measure.measure(broken, RuntimeEvent("a.example", "lost", "2"))
    assert cfg.log.read_bytes()[:len(kept)] == kept
    rtmrs, log = quote_with_log(report_root, cfg)  # repaired before the quote, at the latest
    assert cfg.log.read_bytes() == kept and replay(parse_event_log(log)).rtmrs == rtmrs


def test_without_a_ccel_no_log_is_sent(tmp_path):
    cfg = config.MeasureConfig(root=tmp_path, log=tmp_path / "log", ccel=tmp_path / "no-ccel",
                               ccel_table=tmp_path / "no-table")
    with measure.evidence_log(cfg) as read_log:
        assert read_log() == b""


def test_measure_configuration(tmp_path):
    def parse(table: str) -> config.MeasureConfig:
        return config.parse(tmp_path / "c.toml", {"server": {"url": "https://kbs.example"}, "measure": eval(table)}
                            ).measure

    assert parse("{}") == config.MeasureConfig()
    assert parse("{'releases': True}").releases
    for bad, reason in [("{'rtmr': 2}", "unknown key 'measure.rtmr'"), ("{'log': 'relative'}", "absolute path"),
                        ("{'releases': 'yes'}", "releases")]:
        with pytest.raises(Exception, match=reason):
            parse(bad)


def test_the_release_event_names_resource_and_server_and_words_are_checked():
    assert measure.release_event("default/key/1", "https://kbs.example").text == \
        "keybroker release default/key/1 https://kbs.example"
    with pytest.raises(EventLogError, match="one word"):
        RuntimeEvent("two words", "op", "c")
    with pytest.raises(EventLogError, match="newline"):
        RuntimeEvent("a.example", "op", "two\nlines")


def test_keybroker_evidence_carries_the_log_and_keybroker_verify_replays_it(tsm_sim, sim_state, tmp_path):
    report_root, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("example.org", "config", '{"mode": "prod"}'))
    toml = tmp_path / "client.toml"
    toml.write_text(f'[server]\nurl = "http://127.0.0.1:1"\n[measure]\nroot = "{cfg.root}"\nlog = "{cfg.log}"\n'
                    f'ccel = "{cfg.ccel}"\nccel_table = "{cfg.ccel_table}"\n')

    def keybroker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "keybroker", *args], capture_output=True, text=True, timeout=60)

    out = keybroker("evidence", "--nonce", NONCE.hex(), "--tsm-root", str(report_root), "--config", str(toml))
    assert out.returncode == 0, out.stderr
    envelope = json.loads(out.stdout)
    assert envelope["version"] == 2 and "event_log" in envelope
    (tmp_path / "evidence.json").write_text(out.stdout)
    out = keybroker("verify", str(tmp_path / "evidence.json"), "--trust-roots", str(sim_state / "trust"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RTMR3    1 events" in out.stdout and out.stdout.count("matches the quote") == 4
    assert "tdx.runtime_events" in out.stdout and "example.org" in out.stdout
    bare = keybroker("evidence", "--nonce", NONCE.hex(), "--tsm-root", str(report_root), "--no-event-log")
    assert json.loads(bare.stdout)["version"] == 1


def test_a_stuck_holder_of_the_log_does_not_hold_a_request_past_its_deadline(tsm_sim, tmp_path):
    """Another process holds the runtime log's lock (a quote that never ends): a measurement and an
    evidence log wait for it until their deadline, then fail as a transient timeout."""
    _, cfg = td(tsm_sim, tmp_path)
    event = RuntimeEvent("example.org", "image-pull", "registry/app@sha256:ab")
    measure.measure(cfg, event)  # creates the log
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(cfg.log)!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for attempt in (lambda deadline: measure.measure(cfg, event, deadline=deadline),
                        lambda deadline: measure.evidence_log(cfg, deadline).__enter__()):
            start = time.monotonic()
            with pytest.raises(TsmError) as info:
                attempt(start + 0.5)
            assert info.value.errno == 110 and info.value.transient and "stayed locked" in str(info.value)
            assert 0.5 <= time.monotonic() - start < 3
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(cfg.log, os.O_RDWR)  # the holder's death released it
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_an_event_the_log_sent_with_evidence_could_not_hold_is_neither_logged_nor_extended(tsm_sim, tmp_path):
    """The CCEL log and the runtime log are sent joined, within the event log's size and event limits:
    an event past them is refused before the extend, which would leave every later attestation with
    a log that cannot be sent (EIO) until the next boot."""
    report_root, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("a.example", "first", "1"))  # creates the log
    ccel = len(wire.join_logs(cfg.ccel.read_bytes()))
    big = [RuntimeEvent("a.example", "config", f"{i:04d}" + "x" * (wire.RUNTIME_TEXT_MAX - 30)) for i in range(300)]
    fits = (wire.LOG_MAX - ccel - len(cfg.log.read_bytes())) // len(big[0].encode())
    register = os.open(measure.register_path(cfg), os.O_WRONLY)
    with open(cfg.log, "ab") as log:
        for event in big[:fits]:  # measured one by one, as measure() does (with fewer reads of the log)
            log.write(event.encode())
            log.flush()
            os.pwrite(register, event.digest(), 0)
    os.close(register)
    before, value = cfg.log.read_bytes(), measure._read_register(cfg)
    with pytest.raises(TsmError, match="could not be sent") as info:
        measure.measure(cfg, big[fits])
    assert info.value.errno == errno.EFBIG
    assert cfg.log.read_bytes() == before and measure._read_register(cfg) == value
    rtmrs, log = quote_with_log(report_root, cfg)  # still sendable, and it replays
    assert replay(parse_event_log(log)).rtmrs == rtmrs


def test_a_runtime_log_that_is_there_but_refused_fails_the_evidence_rather_than_leaving_its_events_out(
        tsm_sim, tmp_path):
    """Without the runtime log's events the log sent cannot replay RTMR3: the server would refuse the
    guest for a mismatch, and nobody would learn that the guest's own log was refused."""
    _, cfg = td(tsm_sim, tmp_path)
    measure.measure(cfg, RuntimeEvent("a.example", "one", "1"))
    os.chmod(cfg.log.parent, 0o770)
    with pytest.raises(TsmError, match="writable by group or others") as info, measure.evidence_log(cfg):
        pass
    assert info.value.errno == errno.EPERM
    nowhere = dataclasses.replace(cfg, log=Path("/proc/no-such-folder/runtime-eventlog"))
    with measure.evidence_log(nowhere) as read_log:  # no log could ever be kept there: nothing was measured
        assert parse_event_log(read_log()).events
