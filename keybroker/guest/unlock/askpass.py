"""A systemd password agent for disk prompts: ``keybroker askpass-agent``.

systemd-cryptsetup asks for a passphrase by writing ``/run/systemd/ask-password/ask.<random>``
(an ini file, section ``[Ask]``: ``Socket=``, ``PID=``, ``NotAfter=`` in microseconds of
CLOCK_MONOTONIC, ``Id=cryptsetup:<C-escaped source device>``...) next to an AF_UNIX
datagram socket ``sck.<random>``; every agent may answer with one datagram ``+<password>``
and the first answer wins (https://systemd.io/PASSWORD_AGENTS/). The console prompt is
such an agent too, so this one never holds anything back: it answers only prompts whose
device a ``[volumes.<name>]`` table maps, only while the prompt is live (the file exists,
``NotAfter`` has not passed, ``PID`` runs), never answers "cancel", and leaves a prompt
to the console when the key cannot be obtained in time, or when the process it answered
asks again for the same device: systemd-cryptsetup asks once per try (``tries=``, 3 by
default) when the answer opened no key slot, and the same key would use up every try.

Files and sockets are hostile input: an ask file must be a regular file of at most 16 KiB
owned by root (or this agent's user) with a well-formed ``[Ask]`` section, and its socket
a root-owned socket named ``sck.*`` in the watched directory. The agent watches with
inotify and exits once the directory has stayed empty for ``linger`` seconds and no asker
it answered still runs (the ``.path`` unit starts it again with ``DirectoryNotEmpty=``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from inotify_simple import INotify, flags

from ...errors import ConfigError, KeyringError, UnlockGaveUp, UnlockRefused
from ...systemd import SUN_PATH_MAX, no_core_dumps
from ...wire import decimal
from .. import keyring
from ..config import ClientConfig, Volume
from .keys import KeySource
from .progress import INFO, WARNING, Reporter
from .retry import Retry, failure

DEFAULT_ASK_DIR = Path("/run/systemd/ask-password")
ASK_MAX = 16 * 1024
REPLY_MAX = 2048  # systemd reads replies into a LINE_MAX buffer: "+" and at most 2047 bytes
PID_MAX = 1 << 22
ID_MAX = 4096
_ASK_NAME = re.compile(r"ask\.[A-Za-z0-9_-]{1,64}")
_SOCKET_NAME = re.compile(r"sck\.[A-Za-z0-9_-]{1,64}")
_LINE_END = re.compile(r"\r\n|[\n\r\0]")
_ESCAPES = {ord(k): v for k, v in {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
                                   "\\": 92, '"': 34, "'": 39}.items()}


def cunescape(text: str) -> str:
    """Undo systemd's cescape(): backslash letters and quotes, ``\\NNN`` octal for other bytes."""
    raw, out, i = text.encode("utf-8"), bytearray(), 0
    while i < len(raw):
        if raw[i] != 0x5C:
            out.append(raw[i])
            i += 1
        elif i + 1 < len(raw) and raw[i + 1] in _ESCAPES:
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
        elif re.fullmatch(rb"[0-3][0-7][0-7]", raw[i + 1:i + 4]) and raw[i + 1:i + 4] != b"000":
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            raise UnlockRefused(f"bad escape at character {i} of {text[:80]!r}")
    return os.fsdecode(bytes(out))


def _parse_sections(text: str) -> dict[str, str]:
    """The ``[Ask]`` section's ``Key=Value`` lines; other sections and comments are skipped.

    Lines end where systemd's parser ends them, at ``\\n``, ``\\r`` or NUL only: ``splitlines()``
    would also end one inside a ``Message=`` (a GPT partition name) at U+2028, U+0085 or ``\\x1c``.
    """
    section, fields = None, {}
    for number, line in enumerate(_LINE_END.split(text), 1):
        line = line.strip(" \t")
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if line[-1] != "]":
                raise UnlockRefused(f"line {number} is not a [section] header")
            section = line[1:-1]
            continue
        if section != "Ask":
            continue
        key, sep, value = line.partition("=")
        key = key.strip(" \t")
        if not sep or not key:
            raise UnlockRefused(f"line {number} is not Key=Value")
        if key in fields:
            raise UnlockRefused(f"{key}= is given twice")
        fields[key] = value.strip(" \t")
    if section is None:
        raise UnlockRefused("no [Ask] section")
    return fields


def _number(fields: dict[str, str], key: str, limit: int) -> int:
    value = fields.get(key, "0")
    number = decimal(value)
    if number is None or number >= limit:
        raise UnlockRefused(f"{key}={value[:32]!r} is not a number below {limit}")
    return number


@dataclass(frozen=True)
class Ask:
    """One password request."""

    path: Path
    socket: Path
    id: str
    pid: int = 0  # 0: unknown
    not_after: int = 0  # microseconds on CLOCK_MONOTONIC; 0: no limit

    @classmethod
    def parse(cls, path: Path, text: str) -> Ask:
        fields = _parse_sections(text)
        sock = fields.get("Socket", "")
        if not sock:
            raise UnlockRefused("no Socket=")
        socket_path = Path(sock)
        if (socket_path.parent != path.parent or not _SOCKET_NAME.fullmatch(socket_path.name)
                or len(os.fsencode(sock)) > SUN_PATH_MAX):
            raise UnlockRefused(f"Socket={sock[:120]!r} is not a sck.* socket in {path.parent}")
        ask_id = fields.get("Id", "")
        if len(ask_id) > ID_MAX:
            raise UnlockRefused(f"Id= is longer than {ID_MAX} characters")
        return cls(path, socket_path, ask_id, _number(fields, "PID", PID_MAX), _number(fields, "NotAfter", 1 << 63))

    def device(self) -> str | None:
        """The source device of a ``cryptsetup:`` prompt; ``None`` for any other prompt."""
        if not self.id.startswith("cryptsetup:"):
            return None
        device = cunescape(self.id[len("cryptsetup:"):])
        if not device.startswith("/") or "\0" in device:
            raise UnlockRefused(f"device {device[:120]!r} is not an absolute path")
        return device

    def expired(self) -> bool:
        return self.not_after > 0 and time.monotonic_ns() // 1000 > self.not_after

    def seconds_left(self) -> float | None:
        return None if not self.not_after else self.not_after / 1e6 - time.monotonic()

    def querier_gone(self) -> bool:
        return _process_gone(self.pid)

    def withdrawn(self) -> bool:
        return not os.path.lexists(self.path) or self.expired() or self.querier_gone()


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (0, unknown: never)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def read_ask(path: Path) -> Ask:
    """Read and check one ``ask.*`` file; UnlockRefused says why it is not a request to answer."""
    if not _ASK_NAME.fullmatch(path.name):
        raise UnlockRefused("not an ask.* file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _trusted_owner(st):
            raise UnlockRefused(f"not a regular file owned by root (uid {st.st_uid})")
        data = f.read(ASK_MAX + 1)
    if len(data) > ASK_MAX:
        raise UnlockRefused(f"larger than {ASK_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnlockRefused("not UTF-8") from None
    return Ask.parse(path, text)


def send_reply(ask: Ask, key: bytearray) -> None:
    """One datagram ``+<key>`` to the prompt's socket."""
    if b"\0" in key:
        raise UnlockRefused("the key contains NUL bytes, which the password-agent protocol cannot carry "
                            "(use the key-file socket)")
    if len(key) >= REPLY_MAX:
        raise UnlockRefused(f"the key is {len(key)} bytes; password agents can answer at most {REPLY_MAX - 1} "
                            "(use the key-file socket)")
    st = os.lstat(ask.socket)
    if not stat.S_ISSOCK(st.st_mode) or not _trusted_owner(st):
        raise UnlockRefused(f"{ask.socket} is not a socket owned by root")
    reply = bytearray(b"+") + key
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(reply, str(ask.socket))
    finally:
        reply[:] = bytes(len(reply))


@dataclass(frozen=True)
class PasswordAgent:
    config: ClientConfig
    ask_dir: Path
    source: KeySource
    reporter: Reporter
    seen: set[str] = field(default_factory=set)
    workers: dict[str, threading.Thread] = field(default_factory=dict)
    answered: set[tuple[str, int]] = field(default_factory=set)  # (volume, PID of the asker)

    def watch(self, linger: float) -> int:
        """Answer prompts until the directory has been empty for ``linger`` seconds (and no answered asker runs)."""
        with INotify() as inotify:
            inotify.add_watch(self.ask_dir, flags.CLOSE_WRITE | flags.MOVED_TO | flags.DELETE | flags.MOVED_FROM
                              | flags.ONLYDIR)
            names = ", ".join(f"{v.name} ({v.device})" for v in self.config.volumes if v.device) or "none"
            self.reporter.ready(f"password agent watching {self.ask_dir} for volumes: {names}")
            empty_since = None
            while True:
                if self.scan():
                    empty_since = None
                elif empty_since is None:
                    empty_since = time.monotonic()
                elif time.monotonic() - empty_since >= linger and not self._answered_running():
                    self.reporter.status(f"no prompts left in {self.ask_dir}; exiting")
                    return 0
                for event in inotify.read(timeout=500):
                    if event.mask & (flags.CLOSE_WRITE | flags.MOVED_TO) and not self._busy(event.name):
                        self.seen.discard(event.name)  # rewritten: look again

    def scan(self) -> bool:
        """Consider every new ask file; whether the directory holds anything at all."""
        try:
            entries = set(os.listdir(self.ask_dir))
        except FileNotFoundError:
            entries = set()  # removed: nothing left to answer
        for name in sorted(entries - self.seen):
            if name.startswith("ask."):
                self.consider(self.ask_dir / name)
        self.seen.intersection_update(entries)
        self.seen.update(name for name in entries if name.startswith("ask."))
        for name in [name for name, worker in self.workers.items() if not worker.is_alive()]:
            del self.workers[name]
        return bool(entries)

    def _answered_running(self) -> bool:
        """Whether an asker this agent answered still runs: it asks again when the key opened no key
        slot (a try can outlast ``linger``), and an agent started afresh would answer it again."""
        for volume, pid in list(self.answered):
            if _process_gone(pid):
                self.answered.discard((volume, pid))
        return any(pid for _, pid in self.answered)

    def _busy(self, name: str) -> bool:
        worker = self.workers.get(name)
        return worker is not None and worker.is_alive()

    def consider(self, path: Path) -> None:
        try:
            ask = read_ask(path)
            device = ask.device()
        except FileNotFoundError:
            return
        except (UnlockRefused, OSError) as exc:
            self.reporter.log(WARNING, f"password agent: ignoring {path.name}: {exc}")
            return
        if device is None:
            self.reporter.log(INFO, f"password agent: ignoring {path.name}: not a cryptsetup prompt ({ask.id[:80]!r})")
            return
        volume = self.volume_for(device)
        if volume is None:
            self.reporter.log(INFO, f"password agent: ignoring {path.name}: no volume maps {device!r}")
        elif ask.expired():
            self.reporter.log(INFO, f"password agent: ignoring {path.name}: NotAfter has passed")
        elif ask.querier_gone():
            self.reporter.log(INFO, f"password agent: ignoring {path.name}: its PID {ask.pid} is gone")
        elif (volume.name, ask.pid) in self.answered:
            self.reporter.status(f"volume {volume.name}: PID {ask.pid} asks again after an answer, so the key "
                                 f"opened no key slot; leaving {path.name} to the console prompt", WARNING)
        else:
            worker = threading.Thread(target=self.answer, args=(ask, volume), daemon=True)
            self.workers[path.name] = worker
            worker.start()

    def volume_for(self, device: str) -> Volume | None:
        """The volume whose ``device`` is this path, or the same device node by another name."""
        for volume in self.config.volumes:
            if volume.device == device:
                return volume
        for volume in self.config.volumes:
            try:
                if volume.device and os.path.samefile(volume.device, device):
                    return volume
            except OSError:
                continue
        return None

    def answer(self, ask: Ask, volume: Volume) -> None:
        left = ask.seconds_left()
        deadline = volume.deadline if left is None else min(volume.deadline, left)
        retry = Retry(f"volume {volume.name}", self.config.server_url, deadline, self.reporter, gone=ask.withdrawn)
        try:
            key = self.source.read(retry.run(lambda: self.source.request(volume, "user")))
        except (UnlockGaveUp, KeyringError) as exc:
            reason = failure(f"volume {volume.name}", exc)
            self.reporter.status(f"{reason}; leaving {ask.path.name} to the console prompt", WARNING)
            return
        try:
            if ask.withdrawn():
                self.reporter.log(INFO, f"volume {volume.name}: {ask.path.name} went away before the key came")
                return
            # Noted before the reply: the asker may try the key and ask again before this thread runs on.
            self.answered.add((volume.name, ask.pid))
            send_reply(ask, key)
            self.reporter.status(f"volume {volume.name}: answered {ask.path.name}")
        except (UnlockRefused, OSError) as exc:
            self.answered.discard((volume.name, ask.pid))
            self.reporter.log(WARNING, f"volume {volume.name}: cannot answer {ask.path.name}: {exc}")
        finally:
            key[:] = bytes(len(key))


def run(config: ClientConfig, ask_dir: Path, linger: float, reporter: Reporter) -> int:
    """Watch ``ask_dir`` until it stays empty; keys live in a session keyring of the agent's own."""
    no_core_dumps()
    ask_dir = Path(os.path.abspath(ask_dir))
    if not ask_dir.is_dir():
        raise ConfigError(f"the ask-password directory {ask_dir} does not exist")
    agent = PasswordAgent(config, ask_dir, KeySource(keyring.join_session_keyring(None)), reporter)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return agent.watch(linger)
