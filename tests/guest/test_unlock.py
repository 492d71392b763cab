"""Disk unlock at boot: the key-file socket, the password agent, place-key, the units, the initramfs.

A LUKS2 image in a file is formatted with a key the key server releases through the kernel
keyring; the services then hand that key to clients that behave exactly as systemd's do, and
``cryptsetup open --test-passphrase`` checks it. Prompts live in a temporary ask directory
(or, for the real systemd-ask-password, a temporary directory mounted over
/run/systemd/ask-password in a private mount namespace).
"""

from __future__ import annotations

import array
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from keybroker.errors import ConfigError, KeyringError, UnlockRefused
from keybroker.guest import config, keyring
from keybroker.guest.retry import Backoff
from keybroker.guest.unlock import keyfile
from keybroker.guest.unlock.askpass import Ask, cunescape
from keybroker.guest.unlock.keyfile import volume_of_peer
from keybroker.guest.unlock.keys import KeySource
from keybroker.guest.unlock.progress import Reporter
from keybroker.guest.unlock.retry import Retry
from support import REPO
from support.keyctl import forget_in_user_keyring

UNITS = ("keybroker-keyfile.socket", "keybroker-keyfile.service", "keybroker-askpass.path",
         "keybroker-askpass.service", "keybroker-unlock@.service")
SYSTEMD_CRYPTSETUP = Path("/usr/lib/systemd/systemd-cryptsetup")


def wait_for(what: str, predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


# -- the pieces that parse hostile input -------------------------------------------------

@pytest.mark.parametrize("address, volume", [
    (b"\0d7067f78d9827418/cryptsetup/myvol", "myvol"),
    (b"\0" + b"a" * 64 + b"/cryptsetup/data.1_x-y", "data.1_x-y"),
])
def test_peer_addresses_name_the_volume(address, volume):
    assert volume_of_peer(address) == volume


@pytest.mark.parametrize("address, reason", [
    ("", "no abstract address"),
    ("/run/some/path", "no abstract address"),
    (b"\0d7067f78d9827418/cryptsetup-tpm2/data", "cryptsetup-tpm2 variant"),
    (b"\0d7067f78d9827418/cryptsetup/../etc", "is not"),
    (b"\0d7067f78d9827418/cryptsetup/a/b", "is not"),
    (b"\0/cryptsetup/data", "is not"),
    (b"\0d7067f78d9827418/cryptsetup/" + b"v" * 65, "is not"),
    (b"d7067f78d9827418/cryptsetup/data", "is not"),
])
def test_other_peer_addresses_are_refused(address, reason):
    with pytest.raises(UnlockRefused, match=reason):
        volume_of_peer(address)


def test_a_socket_path_the_server_cannot_use_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "sock").mkdir()
    for path, reason in [(tmp_path / "file/cs.sock", "cannot create"), (tmp_path / "sock", "is not a socket"),
                         (Path("/proc/cs.sock"), "cannot listen")]:
        with pytest.raises(ConfigError, match=reason):
            keyfile.bind(path)


def test_cunescape_undoes_systemd_cescape():
    assert cunescape(r"/dev/disk/by-label/my\\x20disk") == r"/dev/disk/by-label/my\x20disk"
    assert cunescape(r"/dev/a\"b\'c\td\303\251") == "/dev/a\"b'c\td\u00e9"
    for bad in (r"/dev/x\q", r"/dev/x\000", "/dev/x\\"):
        with pytest.raises(UnlockRefused, match="bad escape"):
            cunescape(bad)


def ask_text(socket_path: str, device: str = "/dev/vdb", **fields: str) -> str:
    lines = {"PID": str(os.getpid()), "Socket": socket_path, "AcceptCached": "0", "Echo": "0",
             "NotAfter": str(time.monotonic_ns() // 1000 + 60_000_000), "Silent": "0",
             "Message": "Please enter passphrase for disk data:", "Id": f"cryptsetup:{device}"}
    lines.update(fields)
    return "[Ask]\n" + "".join(f"{k}={v}\n" for k, v in lines.items() if v is not None)


def test_ask_files_are_parsed_strictly(tmp_path):
    path = tmp_path / "ask.Ab12Cd"
    ask = Ask.parse(path, ask_text(str(tmp_path / "sck.0123abcd"), device=r"/dev/disk/by-id/a\\x2db"))
    assert ask.device() == r"/dev/disk/by-id/a\x2db" and ask.pid == os.getpid() and not ask.expired()
    assert Ask.parse(path, ask_text(str(tmp_path / "sck.1"), Id="cryptsetup-verification:/dev/vdb")).device() is None
    assert Ask.parse(path, ask_text(str(tmp_path / "sck.1"), NotAfter="1")).expired()
    for text, reason in [
        (ask_text(str(tmp_path / "sck.1"), Socket=None), "no Socket="),
        (ask_text("/run/elsewhere/sck.1"), "is not a sck.\\* socket in"),
        (ask_text(str(tmp_path / "sck.1/../x")), "is not a sck.\\* socket in"),
        (ask_text(str(tmp_path / "sck.1"), PID="-1"), "PID='-1' is not a number"),
        (ask_text(str(tmp_path / "sck.1"), PID="²"), "PID='²' is not a number"),  # isdigit() says it is
        (ask_text(str(tmp_path / "sck.1"), NotAfter="١٢"), "NotAfter='١٢' is not a number"),
        (ask_text(str(tmp_path / "sck.1"), NotAfter="soon"), "NotAfter='soon'"),
        (ask_text(str(tmp_path / "sck.1")) + "PID=2\n", "PID= is given twice"),
        (ask_text(str(tmp_path / "sck.1")) + "garbage\n", "is not Key=Value"),
        ("Socket=x\n", "no \\[Ask\\] section"),
    ]:
        with pytest.raises(UnlockRefused, match=reason):
            Ask.parse(path, text)
    with pytest.raises(UnlockRefused, match="not an absolute path"):
        Ask.parse(path, ask_text(str(tmp_path / "sck.1"), device="vdb")).device()


def test_a_message_cannot_end_its_line_where_systemd_does_not(tmp_path):
    # systemd writes Message= as given (systemd-cryptsetup puts the GPT partition name in it, which
    # may hold any printable UTF-8) and ends a line only at \n, \r or NUL: U+2028, U+0085 or \x1c
    # inside it must not start a line that names another device or hides the real Id= in a section.
    for brk in ("\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"):
        message = f"Please enter passphrase for disk x{brk}Id=cryptsetup:/dev/vdb{brk}[X]{brk}# (data):"
        text = ask_text(str(tmp_path / "sck.1"), device="/dev/other", Message=message)
        assert Ask.parse(tmp_path / "ask.Ab12Cd", text).device() == "/dev/other", repr(brk)


def test_volume_tables_in_the_client_config(tmp_path):
    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "https://kbs.example"\n'
                    '[volumes.data]\nresource = "default/luks/data"\ndevice = "/dev/vdb"\n'
                    '[volumes.root]\nresource = "default/luks/root"\nkey_type = "user"\ndeadline = 30\n')
    cfg = config.load(path)
    data, root = cfg.volume("data"), cfg.volume("root")
    assert data and root and cfg.volume("absent") is None
    assert (data.description, data.device, data.key_type, data.deadline) == \
        ("keybroker:default/luks/data", "/dev/vdb", "logon", 120)
    assert (root.key_type, root.deadline, root.device) == ("user", 30, None)


@pytest.mark.parametrize("tables, message", [
    ('[volumes.data]\nresource = "default/luks/data"\nkeyfile = "/x"\n', "unknown key 'volumes.data.keyfile'"),
    ('[volumes.data]\ndevice = "/dev/vdb"\n', "missing required key 'volumes.data.resource'"),
    ('[volumes.data]\nresource = "default/../data"\n', "'volumes.data.resource'"),
    ('[volumes."my vol"]\nresource = "a/b/c"\n', "volume name 'my vol' must be"),
    ('[volumes.data]\nresource = "a/b/c"\ndevice = "vdb"\n', "'volumes.data.device' must be an absolute path"),
    ('[volumes.data]\nresource = "a/b/c"\nkey_type = "trusted"\n', "'volumes.data.key_type' must be one of"),
    ('[volumes.data]\nresource = "a/b/c"\ndeadline = 0\n', "between 1 and 3600"),
    ('[volumes.a]\nresource = "a/b/c"\ndevice = "/dev/vdb"\n[volumes.b]\nresource = "a/b/d"\ndevice = "/dev/vdb"\n',
     "mapped by more than one volume"),
    ('[volumes]\ndata = "default/luks/data"\n', "[volumes.data] must be a table"),
])
def test_volume_errors_name_the_key_and_the_file(tmp_path, tables, message):
    path = tmp_path / "client.toml"
    path.write_text('[server]\nurl = "https://kbs.example"\n' + tables)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


# -- a key server, a handler, a LUKS2 image --------------------------------------------------

@dataclass(frozen=True)
class Disk:
    server: object  # conftest.KeyServerProcess
    config: Path
    image: Path
    volume: str
    resource: str

    def releases(self) -> int:
        """How often the key server has released the resource (formatting the image took one)."""
        return self.server.log().count(f"path={self.resource} result=released")  # type: ignore[attr-defined]


def luks_format_with_released_key(image: Path, resource: str) -> None:
    """Format a LUKS2 image with the key the key server releases, straight from the keyring."""
    subprocess.run(["truncate", "-s", "20M", str(image)], check=True)
    script = (f'keyctl pipe $(keyctl request2 user keybroker:{resource} "" @s) | cryptsetup luksFormat '
              f"--type luks2 --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file - {image}")
    out = subprocess.run(["keyctl", "session", "-", "sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def opens(image: Path, key: bytes) -> bool:
    out = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(image)],
                         input=key, capture_output=True, timeout=60)
    return out.returncode == 0


@pytest.fixture
def disk(tsm_sim, kbs, handler, tmp_path) -> Disk:
    if not shutil.which("cryptsetup"):
        pytest.skip("needs cryptsetup")
    tsm_root = tsm_sim("sev_guest")  # first: it makes the simulated roots the key server trusts
    server = kbs()
    resource = f"default/luks/{secrets.token_hex(4)}"
    # A passphrase without NUL bytes and short enough for the password-agent protocol.
    server.put(resource, secrets.token_urlsafe(48).encode())
    volume = f"kb{secrets.token_hex(3)}"
    image = tmp_path / "disk.img"
    cfg = handler(server.url, tsm_root, extra=f'[volumes.{volume}]\nresource = "{resource}"\n'
                                                           f'device = "{image}"\ndeadline = 60\n')
    luks_format_with_released_key(image, resource)
    return Disk(server, cfg, image, volume, resource)


@dataclass
class Service:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def services(tmp_path):
    """Factory: run ``python -m keybroker ARGS`` in the background; stopped after the test."""
    started: list[Service] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Service:
        log_path = tmp_path / f"service{len(started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "keybroker", *args], stdout=log, stderr=log,
                                    env={**os.environ, **(env or {})})
        started.append(Service(proc, log_path))
        return started[-1]

    yield start
    for service in started:
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
            try:
                service.proc.wait(10)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()


class NotifySocket:
    """What a service manager's NOTIFY_SOCKET receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def statuses(self) -> list[str]:
        return [line[7:] for m in list(self.messages) for line in m.split("\n") if line.startswith("STATUS=")]


@pytest.fixture
def notify(tmp_path):
    receiver = NotifySocket(tmp_path / "notify")
    yield receiver
    receiver.sock.close()


def read_key_file(path: Path, volume: str, variant: str = "cryptsetup", bind: bool = True) -> bytes:
    """Read a key file exactly as systemd-cryptsetup does: bind, connect, SHUT_WR, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        if bind:
            sock.bind(f"\0{secrets.token_hex(8)}/{variant}/{volume}".encode())
        sock.settimeout(120)
        sock.connect(str(path))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def keyfile_server(services, disk: Disk, tmp_path: Path,  # type: ignore[no-untyped-def]
                   env: dict[str, str] | None = None):
    path = tmp_path / "cs.sock"
    service = services("keyfile-server", "--config", str(disk.config), "--socket", str(path), env=env)
    wait_for("the key-file socket", lambda: path.exists() or service.proc.poll() is not None)
    assert service.proc.poll() is None, service.log()
    return service, path


# -- the key-file socket ---------------------------------------------------------------------

def test_keyfile_socket_hands_systemd_cryptsetup_the_key(disk, services, notify, tmp_path):
    service, path = keyfile_server(services, disk, tmp_path, env={"NOTIFY_SOCKET": str(notify.path)})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    key = read_key_file(path, disk.volume)
    assert opens(disk.image, key) and not opens(disk.image, key[:-1] + b"!")
    assert read_key_file(path, disk.volume) == key  # a retry, or a second volume: from the keyring
    assert disk.releases() == 2, disk.server.log()
    wait_for("READY=1", lambda: any("READY=1" in m for m in notify.messages))
    assert key.decode() not in service.log() + "".join(notify.messages)

    if SYSTEMD_CRYPTSETUP.exists():  # the real client, with its own bind address
        out = subprocess.run([str(SYSTEMD_CRYPTSETUP), "attach", disk.volume, str(disk.image), str(path),
                              "luks,headless,tries=1"], capture_output=True, text=True, timeout=60)
        try:
            assert "Failed to read key file" not in out.stderr and "Key data incorrect" not in out.stderr, out.stderr
            wait_for("the server's note", lambda: service.log().count(f"volume {disk.volume}: key file served") == 3)
        finally:
            if out.returncode == 0:  # device-mapper is available here: detach what it attached
                subprocess.run([str(SYSTEMD_CRYPTSETUP), "detach", disk.volume], check=False, timeout=60)


def test_keyfile_server_takes_the_socket_systemd_passes(disk, tmp_path):
    if not shutil.which("systemd-socket-activate"):
        pytest.skip("needs systemd-socket-activate")
    path, unused = tmp_path / "activated.sock", tmp_path / "unused.sock"
    with open(tmp_path / "activated.log", "w") as log:
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(path), sys.executable, "-m", "keybroker",
                                 "keyfile-server", "--config", str(disk.config), "--socket", str(unused)],
                                stdout=log, stderr=log)
    try:
        wait_for("the activation socket", path.exists)
        assert opens(disk.image, read_key_file(path, disk.volume))
        assert not unused.exists() and "key files on the activating socket" in (tmp_path / "activated.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_keyfile_socket_gives_unknown_volumes_and_peers_nothing(disk, services, tmp_path):
    service, path = keyfile_server(services, disk, tmp_path)
    assert read_key_file(path, "unmapped") == b""
    assert read_key_file(path, disk.volume, variant="cryptsetup-tpm2") == b""
    assert read_key_file(path, disk.volume, bind=False) == b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a path-bound peer
        sock.bind(str(tmp_path / "peer.sock"))
        sock.connect(str(path))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""
    log = service.log()
    assert "volume 'unmapped' is not mapped" in log and "cryptsetup-tpm2 variant" in log
    assert log.count("no abstract address") == 2 and log.count("closing without data") == 4
    assert disk.releases() == 1  # only the image's: nothing was released for them


def test_keyfile_server_survives_clients_that_hang_up(tsm_sim, kbs, handler, services, tmp_path):
    root = tsm_sim("sev_guest", "slow=1")  # each attestation takes a second
    server = kbs()
    key = secrets.token_bytes(64)
    server.put("default/luks/hangup", key)
    cfg = handler(server.url, root, extra='[volumes.data]\nresource = "default/luks/hangup"\n')
    path = tmp_path / "cs.sock"
    service = services("keyfile-server", "--config", str(cfg), "--socket", str(path))
    wait_for("the key-file socket", path.exists)

    def client(*, address: bool = True, leave_after: float = 0.0) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            if address:
                sock.bind(f"\0{secrets.token_hex(8)}/cryptsetup/data".encode())
            sock.connect(str(path))
            sock.shutdown(socket.SHUT_WR)
            time.sleep(leave_after)

    client(leave_after=0.3)  # gone while the key is being obtained: the server writes into a closed socket
    wait_for("the write that failed", lambda: "cannot write the key file: [Errno 32] Broken pipe" in service.log())
    for i in range(300):
        client(address=False)  # before a full request
        client(leave_after=i % 10 / 500)  # after one, leaving at different moments of the answer
    wait_for("every client handled", lambda: service.log().count("closing without data") >= 300 and sum(
        service.log().count(end) for end in ("key file served", "cannot write the key file", "request went away"))
        >= 301)
    assert service.proc.poll() is None, service.log()[-2000:]
    assert read_key_file(path, "data") == key


def test_a_key_server_that_comes_up_late_is_retried(disk, services, notify, tmp_path):
    disk.server.stop()
    service, path = keyfile_server(services, disk, tmp_path, env={"NOTIFY_SOCKET": str(notify.path),
                                                                   "JOURNAL_STREAM": "8:1234"})
    received: list[bytes] = []
    client = threading.Thread(target=lambda: received.append(read_key_file(path, disk.volume)))
    client.start()
    wait_for("a failed attempt", lambda: "attempt 1:" in service.log(), timeout=60)
    disk.server.start()
    client.join(120)
    assert received and opens(disk.image, received[0])
    waiting = f"volume {disk.volume}: waiting for key server {disk.server.url}, attempt 1: Connection refused"
    assert any(status.startswith(waiting) for status in notify.statuses()), notify.statuses()
    assert any("key obtained at attempt" in status for status in notify.statuses())
    assert f"<5>{waiting}" in service.log()  # a notice in the journal


def test_giving_up_closes_without_data_so_the_prompt_takes_over(disk, services, tmp_path):
    disk.server.stop()
    text = disk.config.read_text().replace("deadline = 60", "deadline = 3")
    disk.config.write_text(text)
    service, path = keyfile_server(services, disk, tmp_path)
    start = time.monotonic()
    assert read_key_file(path, disk.volume) == b""
    assert time.monotonic() - start < 30
    assert "giving up after" in service.log() and "the passphrase prompt takes over" in service.log()

    out = subprocess.run([sys.executable, "-m", "keybroker", "place-key", "--config", str(disk.config),
                          disk.volume], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "giving up after" in out.stderr and "Connection refused" in out.stderr


def test_a_refused_key_is_not_retried(disk, services, tmp_path):
    text = disk.config.read_text().replace(disk.resource, "default/luks/absent")
    disk.config.write_text(text)
    try:
        out = subprocess.run([sys.executable, "-m", "keybroker", "place-key", "--config", str(disk.config),
                              disk.volume], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "the key was refused (Required key not available); not retrying" in out.stderr
        assert "attempt" not in out.stderr
    finally:  # the refusal is cached as a negative key in root's user keyring
        forget_in_user_keyring("logon", "keybroker:default/luks/absent")


def test_an_evidence_source_that_comes_up_late_is_retried(tsm_sim, kbs, handler, tmp_path):
    # At boot the guest driver (sev-guest, tdx-guest) and the configfs-tsm module it pulls in may load
    # after the unlock starts: the handler then fails with ENOENT (no tsm/report yet) or ENXIO (no
    # provider registered yet), which a moment later would not happen.
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/luks/late-tsm", secrets.token_bytes(32))
    late = tmp_path / "config/tsm/report"
    cfg = handler(server.url, late, extra='[volumes.late]\nresource = "default/luks/late-tsm"\n'
                                          'key_type = "user"\ndeadline = 60\n')
    proc = subprocess.Popen([sys.executable, "-m", "keybroker", "place-key", "--config", str(cfg), "late"],
                            stderr=subprocess.PIPE, text=True)
    try:
        said = []  # until place-key has been refused for want of the interface (not a fixed wait: it may start slowly)
        while not said or "No such file or directory" not in said[-1]:
            line = proc.stderr.readline()
            assert line, f"place-key ended before it was refused: {''.join(said)}"
            said.append(line)
        late.parent.mkdir(parents=True)
        late.symlink_to(root)  # the module is loaded
        _, rest = proc.communicate(timeout=60)
        err = "".join(said) + rest
        assert proc.returncode == 0 and "waiting for key server" in err and "is in the user keyring" in rest, err
    finally:
        proc.kill()
        proc.wait()
        forget_in_user_keyring("user", "keybroker:default/luks/late-tsm")


@pytest.mark.parametrize("code", [errno.ENXIO, errno.ENODEV])
def test_a_guest_driver_not_loaded_yet_is_retried(code):
    failures = [KeyringError("request_key", code)]

    def attempt() -> int:
        if failures:
            raise failures.pop()
        return 42

    retry = Retry("volume data", "https://kbs.example", 10, Reporter(), backoff=Backoff(first=0.01))
    assert retry.run(attempt) == 42


def test_transient_failures_leave_no_negative_key_behind(disk):
    volume = config.load(disk.config).volume(disk.volume)
    session = keyring.join_session_keyring(None)
    disk.server.stop()

    def cached() -> list[int]:
        serials = array.array("i", keyring.read(session))
        return [serial for serial in serials if keyring.describe(serial).description == volume.description]

    with pytest.raises(KeyringError) as info:  # a plain request leaves a negative key (5 s)
        keyring.request_key("user", volume.description, "", session)
    assert info.value.errno == errno.ECONNREFUSED and len(cached()) == 1
    source = KeySource(session)
    source.forget("user", volume.description)
    assert cached() == []
    with pytest.raises(KeyringError):  # KeySource drops it by itself
        source.request(volume, "user")
    assert cached() == []
    failed = time.monotonic()
    disk.server.start()
    serial = source.request(volume, "user")  # a real upcall, not the cached failure
    assert time.monotonic() - failed < 5 and opens(disk.image, keyring.read(serial))


# -- place-key: keys for dm-crypt and the LUKS2 keyring token ---------------------------------

def test_place_key_feeds_dm_crypt_and_luks2_keyring_tokens(disk):
    subprocess.run(["cryptsetup", "token", "add", "--key-description", f"keybroker:{disk.resource}",
                    "--key-slot", "0", str(disk.image)], check=True, timeout=60)
    text = disk.config.read_text().replace("deadline = 60", 'deadline = 60\nkey_type = "user"')
    disk.config.write_text(text + f'[volumes.{disk.volume}-dm]\nresource = "{disk.resource}"\nkey_type = "logon"\n')
    place = f"{sys.executable} -m keybroker place-key --config {disk.config}"
    # As systemd-cryptsetup@.service (KeyringMode=shared): the session keyring links root's user keyring.
    script = (f"keyctl link @u @s; {place} {disk.volume} && {place} {disk.volume}-dm && "
              f"keyctl search @u user keybroker:{disk.resource} && keyctl search @u logon keybroker:{disk.resource} "
              f"&& cryptsetup open --test-passphrase --token-only {disk.image} && echo TOKEN-OPENED; "
              f"keyctl read $(keyctl search @u logon keybroker:{disk.resource})")
    try:
        out = subprocess.run(["keyctl", "session", "-", "sh", "-c", script], capture_output=True, text=True,
                             timeout=120)
        assert "TOKEN-OPENED" in out.stdout, out.stdout + out.stderr
        assert "is in the user keyring" in out.stderr and "Operation not supported" in out.stderr  # logon: unreadable
        assert disk.releases() == 3  # the image's, then one per key type
    finally:
        for key_type in ("user", "logon"):  # out of root's user keyring, which outlives the test
            forget_in_user_keyring(key_type, f"keybroker:{disk.resource}")


def test_place_key_works_from_a_session_that_does_not_reach_roots_user_keyring(tsm_sim, kbs, handler):
    # su or sudo without pam_keyinit keep the caller's session keyring, which links the
    # caller's user keyring, not root's: the key under construction in root's was then not possessed,
    # and the handler could not restrict its permissions (EACCES, "not retrying").
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/luks/by-hand", secrets.token_bytes(32))
    cfg = handler(server.url, root, extra='[volumes.hand]\nresource = "default/luks/by-hand"\nkey_type = "user"\n')
    try:
        out = subprocess.run(["keyctl", "session", "-", sys.executable, "-m", "keybroker", "place-key", "--config",
                              str(cfg), "hand"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "is in the user keyring" in out.stderr, out.stderr
        keyring.search(keyring.USER_KEYRING, "user", "keybroker:default/luks/by-hand")
    finally:
        forget_in_user_keyring("user", "keybroker:default/luks/by-hand")


# -- the password agent ----------------------------------------------------------------------

class Prompt:
    """A password request made as systemd makes one: a datagram socket, then an ask file."""

    def __init__(self, ask_dir: Path, device: str, **fields: str) -> None:
        self.socket_path = ask_dir / f"sck.{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.socket_path))
        finally:
            os.umask(old)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.path = ask_dir / f"ask.{secrets.token_urlsafe(4).replace('-', 'x')}"
        tmp = ask_dir / f".tmp.{self.path.name}"
        tmp.write_text(ask_text(str(self.socket_path), device, **fields))
        tmp.chmod(0o644)
        tmp.rename(self.path)

    def reply(self) -> tuple[bytes, int] | None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except BlockingIOError:
            return None
        uid = next(struct.unpack("3i", d)[1] for level, kind, d in ancillary
                   if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
        return data, uid

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.sock.close()


def test_askpass_agent_answers_only_live_prompts_for_mapped_devices(disk, services, tmp_path):
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # The askers it answers end before it may (as systemd-cryptsetup does once its volume is open).
    askers = [subprocess.Popen(["sleep", "120"]) for _ in range(2)]
    prompts = {
        "mapped": Prompt(ask_dir, str(disk.image), PID=str(askers[0].pid)),
        "unknown": Prompt(ask_dir, "/dev/not-mapped"),
        "expired": Prompt(ask_dir, str(disk.image), NotAfter=str(time.monotonic_ns() // 1000 - 1)),
        "dead": Prompt(ask_dir, str(disk.image), PID=str(dead.pid)),
        "verification": Prompt(ask_dir, str(disk.image), Id=f"cryptsetup-verification:{disk.image}"),
        "no-socket": Prompt(ask_dir, str(disk.image), Socket=None),
    }
    try:
        agent = services("askpass-agent", "--config", str(disk.config), "--ask-dir", str(ask_dir), "--linger", "1")
        data, uid = wait_for("the answer", prompts["mapped"].reply, timeout=60)
        assert uid == 0 and data[:1] == b"+" and opens(disk.image, data[1:])
        wait_for("the agent's notes", lambda: "answered" in agent.log())
        log = agent.log()
        for name, reason in [("unknown", "no volume maps '/dev/not-mapped'"), ("expired", "NotAfter has passed"),
                             ("dead", f"its PID {dead.pid} is gone"), ("verification", "not a cryptsetup prompt"),
                             ("no-socket", "no Socket=")]:
            assert f"ignoring {prompts[name].path.name}: {reason}" in log, log
            assert prompts[name].reply() is None
        # A prompt that comes while the agent runs, from another systemd-cryptsetup (the same one asking
        # again would mean the key was refused).
        late = Prompt(ask_dir, str(disk.image), PID=str(askers[1].pid))
        prompts["late"] = late
        data, _ = wait_for("the second answer", late.reply, timeout=60)
        assert opens(disk.image, data[1:])
        assert disk.releases() == 2  # the image's, then one: the second answer came from the keyring
    finally:
        for prompt in prompts.values():
            prompt.close()
        for asker in askers:
            asker.kill()
            asker.wait()
    assert agent.proc.wait(30) == 0  # the directory stayed empty: the agent leaves
    assert "no prompts left" in agent.log() and data[1:].decode() not in agent.log()


def test_askpass_agent_survives_prompts_that_go_away(disk, services, tmp_path):
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    # From another asker than the prompts below: an asker answered once is left to the console after.
    first = Prompt(ask_dir, str(disk.image), PID=str(os.getppid()))
    agent = services("askpass-agent", "--config", str(disk.config), "--ask-dir", str(ask_dir), "--linger", "30")
    try:
        wait_for("the first answer", first.reply, timeout=60)  # the key is in the agent's keyring now
        for i in range(300):
            # Before a full request: an ask file cut short, then withdrawn.
            cut = ask_dir / f"ask.cut{i}"
            cut.write_text(ask_text(str(ask_dir / "sck.none"), str(disk.image))[:40])
            cut.unlink()
            # A full request whose asker goes away before the answer: its socket is closed. From another
            # asker than the live prompt's: one the agent answered before it went (a busy machine
            # may pause this loop there) leaves that asker's later prompts to the console.
            gone = Prompt(ask_dir, str(disk.image), PID="1")
            gone.sock.close()
            gone.path.unlink()
            if i % 2:
                gone.socket_path.unlink()
        live = Prompt(ask_dir, str(disk.image))
        data, _ = wait_for("an answer after the hang-ups", live.reply, timeout=60)
        assert opens(disk.image, data[1:])
        assert agent.proc.poll() is None, agent.log()[-2000:]
    finally:
        for path in ask_dir.iterdir():
            path.unlink()
        first.sock.close()


def test_askpass_agent_leaves_the_retries_of_a_refused_key_to_the_console(disk, services, tmp_path):
    # systemd-cryptsetup asks again (tries=, 3 by default) when the answer opened no key slot: answering
    # each try with the same key would use them all up before anyone could type the passphrase.
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = services("askpass-agent", "--config", str(disk.config), "--ask-dir", str(ask_dir), "--linger", "30")
    first = Prompt(ask_dir, str(disk.image))
    try:
        wait_for("the first answer", first.reply, timeout=60)
        first.close()  # as systemd-cryptsetup does, before it tries the key
        retry = Prompt(ask_dir, str(disk.image))  # the same process asks again: the key was not taken
        other = Prompt(ask_dir, str(disk.image), PID=str(os.getppid()))  # another asker still gets an answer
        try:
            wait_for("the other answer", other.reply, timeout=60)
            wait_for("the agent's note", lambda: f"leaving {retry.path.name} to the console prompt" in agent.log())
            time.sleep(1)
            assert retry.reply() is None, agent.log()
        finally:
            retry.close()
            other.close()
    finally:
        first.close()
    assert f"PID {os.getpid()} asks again" in agent.log()


def test_askpass_agent_outlives_a_try_longer_than_its_linger(disk, services, tmp_path):
    # A try that opens no slot can take longer than the linger (a PBKDF run per key slot): an agent
    # that left meanwhile, started again by the .path unit, would answer the retry with the same key.
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    asker = subprocess.Popen(["sleep", "120"])
    agent = services("askpass-agent", "--config", str(disk.config), "--ask-dir", str(ask_dir), "--linger", "0.5")
    first = Prompt(ask_dir, str(disk.image), PID=str(asker.pid))
    try:
        wait_for("the first answer", first.reply, timeout=60)
        first.close()  # the directory is empty while the asker tries the key
        time.sleep(2.5)
        assert agent.proc.poll() is None, agent.log()
        retry = Prompt(ask_dir, str(disk.image), PID=str(asker.pid))
        try:
            wait_for("the agent's note", lambda: f"leaving {retry.path.name} to the console prompt" in agent.log())
            assert retry.reply() is None
        finally:
            retry.close()
        asker.kill()
        asker.wait()
        assert agent.proc.wait(30) == 0  # the asker is gone: the agent leaves
    finally:
        first.close()
        asker.kill()
        asker.wait()


def test_askpass_agent_answers_the_real_systemd_ask_password(disk, tmp_path):
    if not (shutil.which("unshare") and shutil.which("systemd-ask-password")
            and os.path.isdir("/run/systemd/ask-password")):
        pytest.skip("needs unshare, systemd-ask-password and /run/systemd/ask-password")
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    # A private mount namespace: the machine's own /run/systemd/ask-password stays untouched.
    script = (f"mount --bind {ask_dir} /run/systemd/ask-password || exit 1\n"
              f"systemd-ask-password --no-tty --timeout=60 --id=cryptsetup:{disk.image} "
              f"'Please enter passphrase for disk {disk.volume}:' & asker=$!\n"
              f"{sys.executable} -m keybroker askpass-agent --config {disk.config} --linger 1 "
              f"2>{tmp_path}/agent.log &\n"
              "wait $asker; status=$?; wait; exit $status\n")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr + (tmp_path / "agent.log").read_bytes()
    assert opens(disk.image, out.stdout.rstrip(b"\n"))
    assert "answered" in (tmp_path / "agent.log").read_text() and list(ask_dir.iterdir()) == []


# -- the units and the initramfs -------------------------------------------------------------

def test_units_pass_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze")
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, unit_dir)
    stub = root / "usr/local/bin/keybroker"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    # The unit systemd generates from the README's crypttab line, to check it against ours.
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("data  UUID=0b9e4f27-7c4e-4a55-9a8c-3a1e0c9d2f11  /run/keybroker/cryptsetup.sock  luks\n")
    generator = Path("/usr/lib/systemd/system-generators/systemd-cryptsetup-generator")
    if generator.exists():
        generated_dir = tmp_path / "generated"
        generated_dir.mkdir()
        subprocess.run([str(generator), *[str(generated_dir)] * 3], check=True, timeout=30,
                       env={**os.environ, "SYSTEMD_CRYPTTAB": str(crypttab)})
        generated = (generated_dir / "systemd-cryptsetup@data.service").read_text()
        assert "After=cryptsetup-pre.target" in generated and "KeyringMode=shared" in generated
        assert "/run/keybroker/cryptsetup.sock" in generated
    enable = subprocess.run(["systemctl", f"--root={root}", "enable", "keybroker-keyfile.socket",
                             "keybroker-askpass.path", "keybroker-unlock@data.service"],
                            capture_output=True, text=True, timeout=30)
    assert enable.returncode == 0, enable.stderr
    for link in ("sockets.target.wants/keybroker-keyfile.socket", "cryptsetup.target.wants/keybroker-askpass.path",
                 "systemd-cryptsetup@data.service.wants/keybroker-unlock@data.service"):
        assert (unit_dir / link).is_symlink(), link
    names = [*UNITS[:4], "keybroker-unlock@data.service"]
    out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", *names],
                         capture_output=True, text=True, timeout=60, cwd=unit_dir)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_the_documented_enable_places_keys_for_volume_names_with_a_dash(tmp_path):
    # Fedora and RHEL name crypttab volumes luks-<uuid>: the generator's unit is then
    # systemd-cryptsetup@luks\x2d<uuid>.service, and %I of keybroker-unlock@luks-<uuid> is luks/<uuid>.
    generator = Path("/usr/lib/systemd/system-generators/systemd-cryptsetup-generator")
    if not (generator.exists() and shutil.which("systemctl") and shutil.which("systemd-escape")):
        pytest.skip("needs systemctl, systemd-escape and systemd-cryptsetup-generator")
    volume = "luks-0b9e4f27-7c4e-4a55-9a8c-3a1e0c9d2f11"
    crypttab, generated = tmp_path / "crypttab", tmp_path / "generated"
    crypttab.write_text(f"{volume}  UUID=0b9e4f27-7c4e-4a55-9a8c-3a1e0c9d2f11  none  luks\n")
    generated.mkdir()
    subprocess.run([str(generator), *[str(generated)] * 3], check=True, timeout=30,
                   env={**os.environ, "SYSTEMD_CRYPTTAB": str(crypttab)})
    cryptsetup_unit = next(p.name for p in generated.glob("systemd-cryptsetup@*.service"))
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(REPO / "systemd/keybroker-unlock@.service", unit_dir)
    doc = (REPO / "docs/disk-unlock.md").read_text()
    command = re.search(r"`(systemctl enable [^`]*keybroker-unlock@[^`]*)`", doc)
    assert command, "docs/disk-unlock.md shows no systemctl enable for keybroker-unlock@"
    script = command.group(1).replace("systemctl enable", f"systemctl --root={root} enable").replace("data", volume)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    links = list(unit_dir.glob("*.wants/keybroker-unlock@*"))
    assert [link.parent.name for link in links] == [f"{cryptsetup_unit}.wants"], (script, links)
    instance = links[0].name.removeprefix("keybroker-unlock@").removesuffix(".service")
    unescaped = subprocess.run(["systemd-escape", "--unescape", instance], capture_output=True, text=True)
    assert unescaped.stdout.strip() == volume  # %I: what place-key is given


def test_dracut_module_installs_the_drivers_evidence_comes_through():
    # SEV and SEV-ES guests ([aeb]) reach the evidence broker over vsock: without the vsock modules in
    # the image, socket(AF_VSOCK) fails (EAFNOSUPPORT) and the root volume goes to the prompt.
    script = (f"source {REPO / 'systemd/dracut/91keybroker/module-setup.sh'}\n"
              'instmods() { printf "%s\\n" "$@"; }\ninstallkernel\n')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    modules = set(out.stdout.split())
    assert {"tsm", "sev-guest", "tdx-guest", "vsock", "vmw_vsock_virtio_transport"} <= modules, out


def test_dracut_module_builds_an_initramfs_with_the_pieces(handler, tmp_path):
    if not (shutil.which("dracut") and shutil.which("lsinitrd") and shutil.which("cpio")):
        pytest.skip("needs dracut (dracut-core, dracut-network)")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    cfg = handler("http://127.0.0.1:9", tmp_path / "tsm",
                  extra='[volumes.root]\nresource = "default/luks/root"\n')
    cfg.write_text(cfg.read_text().replace("[tsm]", f'ca = "{ca}"\n[tsm]'))
    # dracut with its own modules plus ours, from a private base directory.
    base = tmp_path / "dracut"
    (base / "modules.d").mkdir(parents=True)
    for entry in Path("/usr/lib/dracut").iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for module in Path("/usr/lib/dracut/modules.d").iterdir():
        (base / "modules.d" / module.name).symlink_to(module)
    (base / "modules.d/91keybroker").symlink_to(REPO / "systemd/dracut/91keybroker")
    # The units, enabled as a user would on the host.
    root = tmp_path / "root"
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, unit_dir)
    subprocess.run(["systemctl", f"--root={root}", "enable", "keybroker-keyfile.socket", "keybroker-askpass.path",
                    "keybroker-unlock@root.service"], check=True, capture_output=True, timeout=30)
    bin_dir = Path(sys.executable).parent
    conf = tmp_path / "dracut.conf"
    conf.write_text(f"keybroker_bin={bin_dir / 'keybroker'}\nkeybroker_config={cfg}\nkeybroker_unitdir={unit_dir}\n")
    (tmp_path / "conf.d").mkdir()
    image = tmp_path / "initrd.img"
    out = subprocess.run(["dracut", "--no-kernel", "--no-hostonly", "--no-early-microcode", "--no-compress",
                          "--conf", str(conf), "--confdir", str(tmp_path / "conf.d"), "--tmpdir", str(tmp_path),
                          "-m", "keybroker", "--kver", os.uname().release, "-f", str(image)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "dracutbasedir": str(base)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stderr, out.stderr
    assert "keybroker: volumes root are mapped: asking for the network" in out.stderr

    listing = subprocess.run(["lsinitrd", str(image)], capture_output=True, timeout=120).stdout.decode(errors="replace")
    paths = {line.split()[8].split(" -> ")[0] for line in listing.splitlines() if len(line.split()) >= 9}
    site = Path(next(p for p in sys.path if p.endswith("site-packages"))).relative_to("/")
    expected = ["usr/sbin/request-key", "usr/bin/keyctl", "etc/request-key.d/keybroker.conf",
                str((bin_dir / "keybroker-handoff").relative_to("/")),
                str((bin_dir / "keybroker-request-key").relative_to("/")),
                str((bin_dir / "keybroker").relative_to("/")),
                str(cfg.relative_to("/")), str(ca.relative_to("/")),
                str(Path(os.path.realpath(sys.executable)).relative_to("/")),
                str(site / "requests/__init__.py"), str(site / "jwcrypto/jwe.py"), str(site / "inotify_simple.py"),
                str(site / "certifi/cacert.pem"),
                str((REPO / "keybroker/guest/unlock/keyfile.py").relative_to("/")),
                *(f"usr/lib/systemd/system/{unit}" for unit in UNITS),
                "etc/systemd/system/sockets.target.wants/keybroker-keyfile.socket",
                "etc/systemd/system/cryptsetup.target.wants/keybroker-askpass.path",
                "etc/systemd/system/systemd-cryptsetup@root.service.wants/keybroker-unlock@root.service",
                "etc/cmdline.d/91keybroker.conf"]
    missing = [path for path in expected if path not in paths]
    assert not missing, missing

    # Unpacked, the image's Python runs keybroker: every boot-path module imports.
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with open(image, "rb") as f:
        subprocess.run(["cpio", "-id", "--quiet"], stdin=f, cwd=unpacked, check=True, timeout=120)
    assert (unpacked / "etc/cmdline.d/91keybroker.conf").read_text() == "rd.neednet=1\n"
    check = ("import keybroker.guest.handler, keybroker.guest.broker, keybroker.guest.unlock.keyfile, "
             "keybroker.guest.unlock.askpass, "
             "keybroker.guest.unlock.place, requests, jwcrypto.jwe, inotify_simple; "
             "from keybroker.guest import config; print(config.load(%r).volume('root').description)" % str(cfg))
    python = (bin_dir / "keybroker").read_text().splitlines()[0].removeprefix("#!").strip()  # as the units run it
    out = subprocess.run(["chroot", str(unpacked), python, "-c", check], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout == "keybroker:default/luks/root\n", out.stderr
