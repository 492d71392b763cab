"""The ``keybroker`` command line: every command takes its options and positionals in any order."""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from keybroker import cli
from keybroker.cli import args
from support import VECTORS
from support.servers import write_secret

SAMPLES = {Path: "/tmp/x", int: "1", float: "1.5", args.hex_bytes: "00ff", args.rfc3339: "2025-01-01T00:00:00Z",
           args.listen: "127.0.0.1:1", args.audit_head: "1:" + "ab" * 32}


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, child in action.choices.items():
            yield from leaf_commands(child, (*path, name))


def sample(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is None or action.type is str:
        return "default/disk/root" if action.dest == "path" else "text"
    return SAMPLES[action.type]


def arguments(parser: argparse.ArgumentParser) -> tuple[list[str], list[list[str]]]:
    """Sample positionals, and every option with a sample value (each a group of strings)."""
    positionals, options = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:
            positionals.append(sample(action))
        elif action.nargs == 0:
            options.append([action.option_strings[0]])
        else:
            count = action.nargs if isinstance(action.nargs, int) else 1
            options.append([action.option_strings[0], *[sample(action)] * count])
    return positionals, options


COMMANDS = [(path, parser) for path, parser in leaf_commands(cli.build_parser()) if arguments(parser)[0]]


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_options_and_positionals_in_any_order(path, parser):
    positionals, options = arguments(parser)
    flat = [s for group in options for s in group]
    half = len(options) // 2
    orders = [[*positionals, *flat], [*flat, *positionals],
              [*[s for g in options[:half] for s in g], *positionals, *[s for g in options[half:] for s in g]]]
    parsed = [vars(cli.build_parser().parse_args([*path, *argv])) for argv in orders]
    assert parsed[0] == parsed[1] == parsed[2]


def test_commands_with_positionals_are_covered():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"resource put", "resource get", "resource rm", "policy check", "policy put", "verify", "tsm-sim",
            "place-key"} <= names


@pytest.mark.parametrize("argv", [
    ["verify", "{missing}"],
    ["verify", "{folder}"],
    ["verify", "--event-log", "{missing}"],
    ["verify", "--event-log", "{folder}"],
    ["tsm-sim", "{folder}/mnt", "--provider", "sev_guest", "--init-data", "{missing}"],
    ["resource", "put", "default/disk/root", "--file", "{missing}", "--db", "sqlite:///{folder}/kbs.db"],
    ["policy", "check", "{missing}", "{missing}", "--resource", "default/disk/root"],
])
def test_files_that_cannot_be_read_are_named_not_tracebacks(argv, tmp_path, capsys):
    missing = tmp_path / "absent"
    status = cli.main([arg.format(missing=missing, folder=tmp_path) for arg in argv])
    err = capsys.readouterr().err
    assert status in (1, 2) and "Traceback" not in err
    assert str(missing if "{missing}" in argv else tmp_path) in err, err


INIT_DATA = b'version = "0.1.0"\r\nalgorithm = "sha384"\r\n[data]\r\n"aa.toml" = "x"\r\n'


def test_init_data_is_hashed_as_the_bytes_of_its_file(tmp_path):
    # The host hashed the file as it is: CRLF line ends are part of the digest it bound at launch.
    path = tmp_path / "init-data.toml"
    path.write_bytes(INIT_DATA)
    parsed = cli.build_parser().parse_args(["verify", str(tmp_path / "evidence"), "--init-data", str(path)])
    assert args.verification_context(parsed).init_data == hashlib.sha384(INIT_DATA).digest()


@pytest.mark.parametrize("command", [["verify", str(VECTORS / "snp" / "virtee-sev" / "report.bin")],
                                     ["tsm-sim", "{folder}/mnt", "--provider", "sev_guest"]])
def test_init_data_that_is_not_text_is_named_not_a_traceback(command, tmp_path, capsys):
    path = tmp_path / "init-data.toml"
    path.write_bytes(b"\xff" + INIT_DATA)
    status = cli.main([arg.format(folder=tmp_path) for arg in command] + ["--init-data", str(path)])
    err = capsys.readouterr().err
    assert status in (1, 2) and "Traceback" not in err and f"init-data {path} is not UTF-8" in err, err


def _memory_limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # so that the unbounded read ends in MemoryError


@pytest.mark.parametrize("source", ["--file", "stdin"])
def test_a_resource_value_is_read_no_further_than_a_resource_may_be(source, tmp_path):
    kek = write_secret(tmp_path / "kek", os.urandom(32))
    file = ["--file", "/dev/zero"] if source == "--file" else []
    argv = [sys.executable, "-m", "keybroker", "resource", "put", "default/key/a", "--db",
            f"sqlite:///{tmp_path}/kbs.db", "--kek-file", str(kek), *file]
    with open("/dev/zero", "rb") as zero:
        out = subprocess.run(argv, stdin=zero, capture_output=True, text=True, timeout=60, preexec_fn=_memory_limited)
    said = "/dev/zero is larger than 32767 bytes" if source == "--file" else "standard input holds more than 32767"
    assert out.returncode == 1 and said in out.stderr, out.stderr[-500:]


@pytest.mark.parametrize("command", [["policy", "put", "/dev/zero", "--db", "sqlite:///{tmp}/kbs.db", "--kek-file",
                                      "{tmp}/kek"],
                                     ["policy", "check", "/dev/zero", str(VECTORS / "snp/virtee-sev/report.bin"),
                                      "--resource", "default/key/a"],
                                     ["serve", "--policy", "/dev/zero", "--db", "sqlite:///{tmp}/kbs.db", "--kek-file",
                                      "{tmp}/kek", "--listen", "127.0.0.1:1"],
                                     ["serve", "--config", "/dev/zero"]])
def test_a_policy_or_configuration_file_is_read_no_further_than_one_may_be(command, tmp_path):
    """/dev/zero as a policy or the server's configuration grew until memory ran out (MemoryError). The
    server now refuses it before a read: everyone may write /dev/zero (mode 0666), and whoever may change
    its policy or configuration would decide its releases."""
    write_secret(tmp_path / "kek", os.urandom(32))
    argv = [sys.executable, "-m", "keybroker", *(arg.format(tmp=tmp_path) for arg in command)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=_memory_limited)
    said = "/dev/zero is writable by group or others (mode 0666)" if command[0] == "serve" else \
        "/dev/zero is larger than 1048576 bytes"
    assert out.returncode == 1 and said in out.stderr, out.stderr[-500:]


def test_policy_check_refuses_a_resource_name_the_server_would(tmp_path, capsys):
    """The key server answers 400 for a name outside the grammar and asks no policy: neither does check."""
    policy = tmp_path / "policy.json"
    policy.write_text('{"rules": []}')
    status = cli.main(["policy", "check", str(policy), str(VECTORS / "snp/virtee-sev/report.bin"),
                       "--resource", "a/b"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and "a/b" in err, err
