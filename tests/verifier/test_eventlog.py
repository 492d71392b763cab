"""TDX event logs replayed: the published vectors to their RTMRs, guest-components' runtime events,
claims only from what the digests cover, and verify() with quotes whose RTMRs match the log or not."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization

from keybroker.errors import EventLogError
from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.verifier.certs import fingerprint
from keybroker.verifier.tdx import eventlog as ve
from keybroker.wire import eventlog as el
from support import eventlog as eb
from support import tdx as tb

VECTORS = eb.CCEL_VECTORS


def expected() -> list[dict]:
    if not (VECTORS / "expected.json").exists():
        pytest.skip(f"no event log vectors in {VECTORS}")
    return json.loads((VECTORS / "expected.json").read_text())["vectors"]


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.exists():
        pytest.skip(f"no vector {path}")
    return path.read_bytes()


def replayed(raw: bytes) -> ve.Replay:
    return ve.replay(el.parse_event_log(raw))


# -- the published vectors --------------------------------------------------------------------

def test_every_vector_replays_to_its_rtmrs_and_negatives_do_not():
    for case in expected():
        result = replayed(vector(case["log"]))
        if "table" in case:
            table = el.parse_ccel_table(vector(case["table"]))
            assert table.cc_name == "TDX"
            table.check_area(vector(case["log"]))
        rtmrs = {int(n): bytes.fromhex(h) for n, h in case.get("rtmrs", {}).items()}
        matches = all(result.rtmrs[n] == value for n, value in rtmrs.items())
        assert matches is case.get("expect_match", True), case["name"]
        assert json.dumps(ve.claims(result))  # the claims of any real log are JSON


def test_padding_does_not_change_the_replay():
    padded = replayed(vector("go-eventlog/cos-113-intel-tdx-dupe-separator.bin"))
    unpadded = replayed(vector("go-eventlog/cos-113-intel-tdx-dupe-separator-unpadded.bin"))
    assert padded == unpadded and padded.rtmrs[3] == bytes(48)


def test_no_action_events_are_not_extended():
    log = el.parse_event_log(vector("trustee/CCEL_data_grub_gke"))
    no_action = {e.offset for e in log.events if e.event_type == el.EV_NO_ACTION}
    assert no_action and not no_action & {e.offset for e in ve.replay(log).extended}


def test_systemd_stub_section_names_are_utf16_text():
    """systemd-stub measures each PE section's UTF-16 name (the text) and then its content under it (a label)."""
    events = ve.claims(replayed(vector("trustee/CCEL_data_grub_gke")))["tdx.events"]
    sections = [{k: v for k, v in e.items() if k in ("label", "text")} for e in events if e["type"] == "EV_IPL"]
    assert sections[:4] == [{"text": ".linux"}, {"label": ".linux"}, {"text": ".osrel"}, {"label": ".osrel"}]
    assert events[0]["label"] == "TdxTable" and events[1]["label"].startswith("Fv(48DB5E17")


def test_alibaba_log_matches_upstreams_parse():
    raw = vector("trustee/CCEL_AAEL_alibabacloud")
    reference = json.loads(vector("trustee/CCEL_AAEL_alibabacloud_out.json"))["uefi_event_logs"]
    log = el.parse_event_log(raw)
    assert [(e.mr_index, e.type_name, e.digests[el.ALG_SHA384].hex()) for e in log.events] == [
        (r["index"], r["type_name"], r["digests"][0]["digest"]) for r in reference]
    claims = ve.claims(ve.replay(log))
    runtime = [r["details"]["data"] for r in reference if r["details"].get("unicode_name") == "AAEL"]
    assert len(runtime) == 2 == len(claims["tdx.runtime_events"])
    for ours, theirs in zip(claims["tdx.runtime_events"], runtime, strict=True):
        assert (ours["domain"], ours["operation"]) == (theirs["domain"], theirs["operation"])
        # upstream shows content that is JSON as JSON; keybroker keeps the measured text
        content = theirs["content"]
        assert ours["content"] == content or json.loads(ours["content"]) == content
    events = claims["tdx.events"]
    assert events[-1]["rtmr"] == 3 and events[-1]["type"] == "EV_EVENT_TAG" and events[-1]["domain"] == "coco.com"
    assert any(e.get("label") == "grub_kernel_cmdline"
               and e["text"].startswith("(hd0,gpt3)/boot/vmlinuz-5.10.134-19.1.al8.x86_64 root=UUID=") for e in events)
    assert "tdx.kernel_cmdline" not in claims  # which measured string is the command line is not measured
    assert {"rtmr": 2, "type": "EV_IPL", "label": "grub_cmd", "text": "set timeout=1"} in [
        {k: v for k, v in e.items() if k != "digest"} for e in events]
    assert any(e.get("label") == "grub_linuxefi Kernel" and "text" not in e for e in events)  # not measured


def test_cos_kernel_cmdline_and_image_paths():
    claims = ve.claims(replayed(vector("go-eventlog/cos-113-intel-tdx-dupe-separator-unpadded.bin")))
    assert any(e.get("text", "").startswith("/syslinux/vmlinuz.A init=/usr/lib/systemd/systemd rootwait")
               for e in claims["tdx.events"])
    paths = [e["label"] for e in claims["tdx.events"] if e["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    assert paths == ["\\EFI\\BOOT\\BOOTX64.EFI", "\\EFI\\BOOT\\grub-lakitu.efi"]
    assert "tdx.runtime_events" not in claims


# -- claims only from what digests cover ------------------------------------------------------

def test_text_is_claimed_only_when_the_digest_covers_it():
    measured = eb.record(2, el.EV_IPL, b"grub_cmd: set x=1\0", {eb.SHA384: hashlib.sha384(b"set x=1").digest()})
    relabelled = eb.record(3, el.EV_IPL, b"grub_kernel_cmdline console=ttyS0\0",
                           {eb.SHA384: hashlib.sha384(b"something else").digest()})
    whole = eb.record(2, 0x80000007, b"Exit Boot Services Invocation")
    events = ve.claims(replayed(eb.header() + measured + relabelled + whole))
    assert [{k: v for k, v in e.items() if k in ("label", "text")} for e in events["tdx.events"]] == [
        {"label": "grub_cmd:", "text": "set x=1"}, {"label": "grub_kernel_cmdline console=ttyS0"},
        {"text": "Exit Boot Services Invocation"}]
    assert "tdx.kernel_cmdline" not in events  # no claim says which measured string is the command line


def test_text_is_not_claimed_for_data_the_digest_covers_past_its_first_nul():
    """The text of an event is read up to its first NUL: when the digest covers more than that text and
    its padding, the claim named only the text, and two events measuring different data claimed the same."""
    for encoding in ("utf-8", "utf-16-le"):
        data, pad = "console=ttyS0\0 init=/bin/sh".encode(encoding), "console=ttyS0\0\0".encode(encoding)
        hidden = eb.record(2, el.EV_IPL, data, {eb.SHA384: hashlib.sha384(data).digest()})
        padded = eb.record(2, el.EV_IPL, pad, {eb.SHA384: hashlib.sha384(pad).digest()})
        events = ve.claims(replayed(eb.header() + hidden + padded))["tdx.events"]
        assert [{k: v for k, v in e.items() if k in ("label", "text")} for e in events] == [
            {"label": "console=ttyS0"}, {"text": "console=ttyS0"}], encoding


@pytest.mark.parametrize("disguise", ["type", "tag"])
def test_rtmr3_holds_runtime_events_only(disguise):
    """A runtime event whose type or tag was changed (neither is measured) still replays: it must not
    drop out of tdx.runtime_events, where a policy's "not contains" would miss it: the log is refused."""
    hidden = el.RuntimeEvent("d", "ssh", "login")
    data = hidden.tagged() if disguise == "type" else b"XXXX" + hidden.tagged()[4:]
    kind = el.EV_IPL if disguise == "type" else el.EV_EVENT_TAG
    event = eb.record(4, kind, data, {eb.SHA384: hidden.digest()})
    with pytest.raises(EventLogError, match="RTMR3 holds only those"):
        ve.claims(replayed(eb.header() + event))


def test_a_runtime_event_whose_digest_is_not_of_its_data_is_refused():
    forged = eb.record(4, el.EV_EVENT_TAG, el.RuntimeEvent("d", "o", "what the policy wants").tagged(),
                       {eb.SHA384: el.RuntimeEvent("d", "o", "what happened").digest()})
    with pytest.raises(EventLogError, match="its content was not measured"):
        ve.claims(replayed(eb.header() + forged))


@pytest.mark.parametrize("raw, text", [
    (eb.header() + eb.record(5, 4, b""), "MR index 5"),
    (eb.header({el.ALG_SHA256: 32}) + eb.record(1, 4, b"", {el.ALG_SHA256: bytes(32)}), "no SHA-384 digest"),
])
def test_events_a_td_cannot_have(raw, text):
    with pytest.raises(EventLogError, match=text):
        replayed(raw)


# -- verify(): the log against a quote's RTMRs --------------------------------------------------

def boot_log(*runtime: el.RuntimeEvent) -> bytes:
    """A small firmware log (RTMR0-2) with runtime events after it, as guest-components sends it."""
    ccel = (eb.header() + eb.record(1, 0x8000000B, b"\x09TdxTable" + bytes(16)) + eb.record(1, 4, bytes(4))
            + eb.record(2, 0x80000007, b"Calling EFI Application from Boot Option")
            + eb.record(0, el.EV_NO_ACTION, b"StartupLocality\0\x00", {})
            + eb.record(3, el.EV_IPL, b"grub_kernel_cmdline /vmlinuz root=/dev/vda1 ro\0",
                        {eb.SHA384: hashlib.sha384(b"/vmlinuz root=/dev/vda1 ro").digest()}))
    return el.join_logs(ccel + b"\xff" * 512, b"".join(e.encode() for e in runtime) + el.END_FLAG)


RUNTIME = (el.RuntimeEvent("example.org", "image-pull", "registry/app@sha256:ab"),
           el.RuntimeEvent("example.org", "config", '{"mode": "prod"}'))


def quote_for(log: bytes, p: tb.Platform) -> bytes:
    return tb.quote(p, tb.Td(rtmrs=replayed(log).rtmrs))


def run(quote: bytes, log: bytes, p: tb.Platform):
    evidence = Evidence("tdx_guest", quote, event_log=log)
    return verify(evidence, Context(TrustStore({fingerprint(p.root): p.root})))


def event_log_check(verdict):
    return next(c for c in verdict.checks if c.name == "event_log")


def test_a_log_that_replays_gives_claims():
    p = tb.platform()
    log = boot_log(*RUNTIME)
    verdict = run(quote_for(log, p), log, p)
    assert verdict.ok, verdict.reason()
    assert event_log_check(verdict).detail == "6 events replay to RTMR0-3 (RTMR0 2, RTMR1 1, RTMR2 1, RTMR3 2)"
    c = verdict.claims
    assert any(e.get("text") == "/vmlinuz root=/dev/vda1 ro" for e in c["tdx.events"])
    assert c["tdx.runtime_events"] == [
        {"rtmr": 3, "domain": "example.org", "operation": "image-pull", "content": "registry/app@sha256:ab"},
        {"rtmr": 3, "domain": "example.org", "operation": "config", "content": '{"mode": "prod"}'}]
    assert [e["rtmr"] for e in c["tdx.events"]] == [0, 0, 1, 2, 3, 3]
    assert c["tdx.events"][0] == {"rtmr": 0, "type": "EV_EFI_HANDOFF_TABLES2", "label": "TdxTable",
                                  "digest": c["tdx.events"][0]["digest"]}
    json.dumps(c)
    without = verify(Evidence("tdx_guest", quote_for(log, p)), Context(TrustStore({fingerprint(p.root): p.root})))
    assert without.ok and "event_log" not in [x.name for x in without.checks] and "tdx.events" not in without.claims


def test_a_tampered_log_fails_naming_the_rtmr_and_both_values():
    p = tb.platform()
    log = boot_log(*RUNTIME)
    quote = quote_for(log, p)
    tampered = boot_log(RUNTIME[0], replace(RUNTIME[1], content='{"mode": "debug"}'))
    verdict = run(quote, tampered, p)
    assert not verdict.ok and verdict.failures[0].name == "event_log"
    detail = verdict.failures[0].detail
    assert detail.startswith("RTMR3: the log (2 events) replays to ") and "RTMR0" not in detail
    assert replayed(tampered).rtmrs[3].hex() in detail and replayed(log).rtmrs[3].hex() in detail
    assert "tdx.events" not in verdict.claims and "tdx.runtime_events" not in verdict.claims


def test_extends_the_log_does_not_show_fail():
    """A runtime event left out of the log (RTMR3 extended, the log silent) fails: the log is not the
    whole story, and a policy would judge the events it shows."""
    p = tb.platform()
    quote = quote_for(boot_log(*RUNTIME), p)
    verdict = run(quote, boot_log(RUNTIME[0]), p)
    assert verdict.failures[0].name == "event_log" and "RTMR3: the log (1 events)" in verdict.failures[0].detail
    untouched = run(quote, boot_log(), p)  # no runtime events at all: RTMR3 replays to zero, the quote's is not
    assert f"replays to {bytes(48).hex()}" in untouched.failures[0].detail


def test_a_malformed_log_fails_the_event_log_check():
    p = tb.platform()
    log = boot_log(*RUNTIME)
    verdict = run(quote_for(log, p), log[:-20], p)
    assert [c.name for c in verdict.failures] == ["event_log"] and "truncated" in verdict.reason()
    assert next(c for c in verdict.checks if c.name == "quote_signature").ok


def test_the_alibaba_log_against_a_quote_with_its_rtmrs():
    raw = vector("trustee/CCEL_AAEL_alibabacloud")
    p = tb.platform()
    verdict = run(quote_for(raw, p), raw, p)
    assert verdict.ok and len(verdict.claims["tdx.events"]) == 87 and len(verdict.claims["tdx.runtime_events"]) == 2


def test_other_providers_do_not_read_an_event_log():
    verdict = verify(Evidence("sev_guest", bytes(0x4A0), event_log=b"log"), Context(TrustStore.default()))
    assert next(c for c in verdict.checks if c.name == "event_log").ok is None


# -- the command line ---------------------------------------------------------------------------

def keybroker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keybroker", "verify", *args], capture_output=True, text=True,
                          timeout=60)


def test_verify_command_with_event_logs(tmp_path):
    p = tb.platform()
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "root.pem").write_bytes(p.root.public_bytes(serialization.Encoding.PEM))
    log = boot_log(*RUNTIME)
    ccel, runtime = log.split(RUNTIME[0].encode())[0], b"".join(e.encode() for e in RUNTIME)
    (tmp_path / "ccel").write_bytes(ccel + b"\xff" * 1000)
    (tmp_path / "aael").write_bytes(runtime)
    (tmp_path / "table").write_bytes(eb.ccel_table(len(ccel) + 1000))
    (tmp_path / "quote").write_bytes(quote_for(log, p))
    args = [str(tmp_path / "quote"), "--provider", "tdx_guest", "--trust-roots", str(tmp_path / "trust"),
            "--event-log", str(tmp_path / "ccel"), "--event-log", str(tmp_path / "aael")]
    good = keybroker(*args, "--ccel-table", str(tmp_path / "table"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("matches the quote") == 4 and "PASS  event_log" in good.stdout
    assert "CCEL table: TDX" in good.stdout and "tdx.events = \"<6 events" in good.stdout

    (tmp_path / "aael").write_bytes(runtime[:len(RUNTIME[0].encode())])
    bad = keybroker(*args)
    assert bad.returncode == 1 and "RTMR3    1 events" in bad.stdout and "DIFFERS: the quote has" in bad.stdout
    assert "FAIL  event_log" in bad.stdout

    as_json = keybroker(*args, "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False
    (tmp_path / "table").write_bytes(eb.ccel_table(100))
    short = keybroker(*args, "--ccel-table", str(tmp_path / "table"))
    assert short.returncode == 1 and "longer than the CCEL table's log area" in short.stderr

    alone = keybroker("--event-log", str(tmp_path / "ccel"), "--event-log", str(tmp_path / "aael"))
    assert alone.returncode == 0 and alone.stdout.startswith("RTMR0    2 events")
    garbage = keybroker("--event-log", str(tmp_path / "quote"))
    assert garbage.returncode == 1 and "not start with a Spec ID event" in garbage.stderr
    assert "Traceback" not in garbage.stderr + short.stderr
