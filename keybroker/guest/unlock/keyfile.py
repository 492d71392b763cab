"""The crypttab key file as an AF_UNIX socket: ``keybroker keyfile-server``.

systemd-cryptsetup (systemd >= 248) reads a crypttab key file that is a socket by
connecting to it: ``socket(AF_UNIX, SOCK_STREAM)``, bind to the abstract address
``"\\0<random>/cryptsetup/<volume>"``, connect, ``shutdown(SHUT_WR)``, read until EOF. The
server takes the volume from the peer's address, obtains the volume's key (a ``user`` key
in the server's own session keyring, so that a second volume with the same resource or a
retry reuses it), writes it and closes::

    # /etc/crypttab
    data  UUID=...  /run/keybroker/cryptsetup.sock  luks

An address outside that grammar, a token variant (``/cryptsetup-pkcs11/``, ``-fido2/``,
``-tpm2/``: those ask for an encrypted key, which keybroker does not serve), an unknown
volume or a peer that is neither root nor this server's user get the connection closed
without data. So does a volume whose key could not be obtained before its deadline:
systemd-cryptsetup then reads an empty key, which opens no key slot, and falls back to
the passphrase prompt.
"""

from __future__ import annotations

import errno as E
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, KeyringError, UnlockGaveUp, UnlockRefused
from ...systemd import SUN_PATH_MAX, listen_fds, no_core_dumps
from .. import keyring
from ..config import ClientConfig, Volume
from .keys import KeySource
from .progress import WARNING, Reporter
from .retry import Retry, failure

DEFAULT_SOCKET = Path("/run/keybroker/cryptsetup.sock")
MAX_CLIENTS = 64
SEND_TIMEOUT = 10.0
_PEER = re.compile(rb"\0([A-Za-z0-9]{1,64})/(cryptsetup[a-z0-9-]{0,16})/([A-Za-z0-9_.-]{1,64})")


def volume_of_peer(address: object) -> str:
    """The volume named by a systemd-cryptsetup bind address; UnlockRefused otherwise."""
    if not isinstance(address, bytes) or not address:
        raise UnlockRefused("the peer has no abstract address (not systemd-cryptsetup)")
    match = _PEER.fullmatch(address)
    if not match:
        shown = address[:80].decode("ascii", "backslashreplace")
        raise UnlockRefused(f"peer address {shown!r} is not \\0<random>/cryptsetup/<volume>")
    kind, volume = match.group(2).decode(), match.group(3).decode()
    if kind != "cryptsetup":
        raise UnlockRefused(f"peer asks for the {kind} variant of volume {volume!r} (an encrypted key); "
                            "keybroker serves plain keys only")
    return volume


def peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of ``conn`` (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return int(pid), int(uid)


def _peer_gone(conn: socket.socket) -> bool:
    """The client closed its end entirely (after its SHUT_WR we only see POLLIN/POLLRDHUP)."""
    poller = select.poll()
    poller.register(conn, select.POLLHUP)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


@dataclass(frozen=True)
class KeyFileServer:
    config: ClientConfig
    source: KeySource
    reporter: Reporter
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_CLIENTS))

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            if not self.slots.acquire(blocking=False):
                self.reporter.log(WARNING, f"key file: more than {MAX_CLIENTS} clients at once; closing one")
                conn.close()
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle(conn)
        finally:
            self.slots.release()

    def handle(self, conn: socket.socket) -> None:
        try:
            volume = self._volume(conn)
        except UnlockRefused as exc:
            self.reporter.log(WARNING, f"key file: {exc}; closing without data")
            return
        retry = Retry(f"volume {volume.name}", self.config.server_url, volume.deadline, self.reporter,
                      gone=lambda: _peer_gone(conn))
        try:
            key = self.source.read(retry.run(lambda: self.source.request(volume, "user")))
        except (UnlockGaveUp, KeyringError) as exc:
            reason = failure(f"volume {volume.name}", exc)
            self.reporter.status(f"{reason}; closing the key file without data: the passphrase prompt takes over",
                                 WARNING)
            return
        try:
            conn.settimeout(SEND_TIMEOUT)
            conn.sendall(key)
            self.reporter.status(f"volume {volume.name}: key file served ({len(key)} bytes)")
        except OSError as exc:
            self.reporter.log(WARNING, f"volume {volume.name}: cannot write the key file: {exc}")
        finally:
            key[:] = bytes(len(key))

    def _volume(self, conn: socket.socket) -> Volume:
        _, uid = peer(conn)
        if uid not in (0, os.geteuid()):
            raise UnlockRefused(f"peer uid {uid} is neither root nor this server's user")
        name = volume_of_peer(conn.getpeername())
        volume = self.config.volume(name)
        if volume is None:
            raise UnlockRefused(f"volume {name!r} is not mapped in {self.config.path}")
        return volume


def bind(path: Path) -> socket.socket:
    """A listening socket at ``path`` (mode 0600), replacing only a stale socket left there."""
    if len(os.fsencode(path)) > SUN_PATH_MAX or not path.is_absolute():
        raise ConfigError(f"socket path {str(path)[:120]!r} must be absolute and at most {SUN_PATH_MAX} bytes")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(f"cannot create the socket {path}: {exc.strerror}") from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) != E.ECONNREFUSED:
                raise ConfigError(f"{path} is in use by another server")
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
        listener.listen(16)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return listener


def run(config: ClientConfig, socket_path: Path, reporter: Reporter) -> int:
    """Serve until SIGTERM, on the socket systemd passed or on ``socket_path``.

    Released keys live in a session keyring of the server's own, and die with it.
    """
    no_core_dumps()
    source = KeySource(keyring.join_session_keyring(None))
    activated = listen_fds()
    if len(activated) > 1:
        raise ConfigError(f"socket activation passed {len(activated)} sockets; the key-file server takes one")
    listener = activated[0] if activated else bind(socket_path)
    if (listener.family, listener.type) != (socket.AF_UNIX, socket.SOCK_STREAM):
        raise ConfigError("the activating socket must be an AF_UNIX stream socket (ListenStream=)")
    where = "the activating socket" if activated else str(socket_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        names = ", ".join(volume.name for volume in config.volumes) or "none (add [volumes.<name>])"
        reporter.ready(f"key files on {where} for volumes: {names}")
        KeyFileServer(config, source, reporter).serve(listener)
    finally:
        listener.close()
        if not activated:
            socket_path.unlink(missing_ok=True)
    return 0
