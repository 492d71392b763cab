"""``keybroker serve``: the supervisor, its pre-forked workers, and the HTTP limits they keep.

The supervisor (the process systemd starts) checks the configuration, loads the secrets,
opens the database (creating the schema, installing ``--policy``), binds the listening
socket, and forks ``workers`` processes (default: one per CPU) that accept on it. Workers
share the database (SQLite's locks or PostgreSQL's transactions serialise them, as they do
replicas), the token-signing key (an ephemeral one too: it is made before the fork), and
the metrics (prometheus-client's multiprocess files in a private folder; ``/metrics``
sums them). A worker that dies is replaced; a worker dies with its supervisor; SIGTERM or
SIGINT stops them all, each finishing the requests it holds.

Hostile clients meet these limits, per worker:

- a request head (target and headers) larger than ``HEAD_MAX`` bytes is refused (431); while
  a head is incomplete a connection holds at most ``HEAD_MAX`` plus one read (256 KiB);
- malformed HTTP (bad start lines, bad chunk sizes, conflicting lengths) is refused (400);
- a body larger than ``rcar.BODY_MAX`` (1 MiB; a resource: ``resource.VALUE_MAX``) is refused
  with 413 before it is read, from its Content-Length or as it arrives;
- a request must arrive whole (head and body) within ``REQUEST_TIMEOUT`` seconds of its first
  byte (of the connection, or of the end of the previous answer), else the connection is
  closed: slow senders (slowloris) hold a connection for that long at most;
- a client that leaves answers unread (the worker has more than a transport buffer of them
  to send) is disconnected after ``REQUEST_TIMEOUT`` seconds without reading; one that queues
  more than ``PIPELINE_MAX`` requests behind the one being answered, at once;
- an idle keep-alive connection is closed after ``KEEP_ALIVE`` seconds;
- a TLS handshake must end within ``REQUEST_TIMEOUT`` seconds of the connection (asyncio's
  default is 60 s, and until its handshake ends a connection is under none of these limits);
- a close must end within ``REQUEST_TIMEOUT`` seconds of the last answer, else the connection
  is reset: over TLS a close waits for the client's close_notify (asyncio: 30 s), and then for
  the client to read what is left; a request that did not arrive in time is not answered, and
  its connection is dropped without close_notify;
- a peer is the address of the connection: X-Forwarded-For and Forwarded are not believed,
  from loopback either (uvicorn's default), where a local process or a proxy that passes the
  client's header on would choose its own rate-limit bucket and audit record;
- beyond ``CONNECTIONS_MAX`` open connections, requests are answered 503 until some close;
  the server raises its open-file limit to the hard limit when it starts, so that connections
  waiting for their handshake or their deadline do not take the last descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from ..errors import ConfigError
from ..systemd import no_core_dumps, notify
from ..wire import rcar as p
from ..wire.transport import is_loopback
from . import secretfile
from .config import ServerConfig

log = logging.getLogger("keybroker.server")

HEAD_MAX = 16 * 1024
REQUEST_TIMEOUT = 10.0
KEEP_ALIVE = 5.0
CONNECTIONS_MAX = 1000
PIPELINE_MAX = 16  # requests a connection may queue (HTTP/1.1 pipelining) behind the one being answered
_PR_SET_PDEATHSIG = 1
_RESPAWN_PAUSE = 1.0


class _HeadTooLarge(Exception):
    pass


class _PipelineTooDeep(Exception):
    pass


def guarded_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools (llhttp) protocol with the limits above: the head's size, the deadline
    for a request to arrive whole, the one for answers to be read, and TCP_NODELAY."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpTools(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _unread: asyncio.TimerHandle | None = None  # armed while the client reads none of its answers
        _answering: Any = None  # the request being answered (uvicorn's RequestResponseCycle)
        _head = 0         # bytes of the current request's target and headers
        _raw = 0          # bytes received while a head is incomplete (httptools buffers a partial header)
        _in_head = True   # between requests or inside a head
        _begun = False    # a request began (or one ended) in the read being parsed
        _whole = False    # the current request has arrived whole
        _too_deep = False  # the client queued more than PIPELINE_MAX requests

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Answers go out as several writes: without this, Nagle's algorithm holds the last one
            # until the client's delayed ACK (40 ms). asyncio sets it only on sockets it made itself.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._reading_again()
            # uvicorn marks the last request parsed as disconnected, not the one being answered when
            # others queue behind it: that one's answer went on to a closed transport, which uvloop
            # refuses with an exception (a traceback in the log, and a 500 it could not send either).
            if self._answering is not None and not self._answering.response_complete:
                self._answering.disconnected = True
            super().connection_lost(exc)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._answering = cycle
            super()._start_asgi_task(cycle, app)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._unread is None:
                self._unread = self.loop.call_later(REQUEST_TIMEOUT, self._shed)

        def resume_writing(self) -> None:
            self._reading_again()
            super().resume_writing()

        def _reading_again(self) -> None:
            if self._unread is not None:
                self._unread.cancel()
                self._unread = None

        def data_received(self, data: bytes) -> None:
            self._begun = False
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():  # no whole head yet: httptools keeps it
                # A head that began in this read holds part of it (a read is at most 256 KiB); one
                # that began in an earlier read, all of it.
                self._raw = 0 if self._begun else self._raw + len(data)
                if self._raw > HEAD_MAX:
                    self._head = self._raw
                    self.send_400_response("")

        def on_headers_complete(self) -> None:
            self._in_head, self._raw = False, 0
            super().on_headers_complete()

        def on_message_begin(self) -> None:
            # Each queued request holds its parsed state: without a bound, one read of 256 KiB of
            # pipelined requests would hold thousands of them.
            if len(self.pipeline) >= PIPELINE_MAX:
                self._too_deep = True
                raise _PipelineTooDeep  # the parser stops; send_400_response resets the connection
            super().on_message_begin()
            self._head, self._whole, self._begun = 0, False, True

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_message_complete(self) -> None:
            self._whole, self._in_head, self._begun = True, True, True  # what follows in this read is a new head
            super().on_message_complete()

        def on_response_complete(self) -> None:
            # uvicorn now starts the next queued (pipelined) request, if any: one that arrived whole is
            # being answered, and no deadline runs while it is (its answer may take longer).
            queued = self.pipeline[-1][0] if self.pipeline and not self.transport.is_closing() else None
            super().on_response_complete()
            self._whole = queued is not None and not queued.more_body and not self.transport.is_closing()
            if self._whole:
                self._disarm()
            else:
                self._arm()  # a close begun with the answer (Connection: close) must end by then too

        def send_400_response(self, msg: str) -> None:
            if self._too_deep:
                self._shed()
                return
            if self._head <= HEAD_MAX:
                super().send_400_response(msg)
                return
            body = json.dumps(p.problem(p.HEADERS_TOO_LARGE, f"request head larger than {HEAD_MAX} bytes")).encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: application/problem+json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def _count(self, size: int) -> None:
            self._head += size
            if self._head > HEAD_MAX:
                raise _HeadTooLarge  # the parser stops; uvicorn answers through send_400_response

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(REQUEST_TIMEOUT, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _shed(self) -> None:
            """Drop a client that reads none of its answers: a reset, and what it did not read with it
            (a close would wait, in the kernel, for it to read them)."""
            self._unread = None
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def _too_slow(self) -> None:
            self._deadline = None
            if self._whole and not self.transport.is_closing():
                return  # a request is being answered
            if self.transport.get_write_buffer_size() or self.transport.is_closing():
                # A close still under way waits on the client: to read the answers it flushes first
                # (keep-alive's close too), or, over TLS, to confirm it (close_notify, asyncio's
                # 30 s), and one that confirmed but reads nothing holds it open for ever.
                self._shed()
            else:
                self.transport.abort()  # the request did not arrive in time: no answer (nor TLS close) is owed

    assert issubclass(httptools.HttpParserCallbackError, httptools.HttpParserError)
    return GuardedHttpTools


class GuardedLoop(uvloop.Loop):
    """The workers' event loop (uvicorn's ``loop``): uvloop's (libuv, in C: a release costs about a
    tenth less CPU than on asyncio's selector loop), where a server's TLS handshakes end within
    REQUEST_TIMEOUT, as the protocol's limits only start once the handshake is done."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", REQUEST_TIMEOUT)
        return await super().create_server(*args, **kwargs)


def _raise_file_limit() -> None:
    """Raise the soft limit of open files to the hard one (systemd's default soft limit, 1024, is
    for programs that still use select(); this one uses epoll)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run(config: ServerConfig) -> None:
    """Check the configuration, load the secrets, open the database, and serve until SIGTERM/SIGINT."""
    no_core_dumps()  # the KEKs, the token key and unsealed resources are in its memory
    _raise_file_limit()
    host = config.listen[0]
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not config.tls_cert and not is_loopback(host):
        raise ConfigError(f"refusing plain HTTP on {host}: give --tls-cert and --tls-key, or listen on loopback")
    if config.tls_cert and config.tls_key:  # the TLS stack reads it unchecked: held to the rules of secrets first
        secretfile.check(config.tls_key, "TLS private key", group_may_read=True)
        _check_tls(config.tls_cert, config.tls_key)
    metrics_dir = tempfile.mkdtemp(prefix="keybroker-metrics-")  # 0700; before prometheus-client is imported
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _supervise(config, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_tls(cert: Path, key: Path) -> None:
    """Refuse a TLS certificate and key that make no server (not PEM, not a pair, a key under a
    passphrase): each worker loads them, and failed to start, again and again, after READY=1."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except OSError as exc:  # ssl.SSLError among them
        raise ConfigError(f"the TLS certificate {cert} and private key {key} do not make a "
                          f"TLS server: {exc.strerror or exc}") from None


def _supervise(config: ServerConfig, metrics_dir: str) -> None:
    import uvicorn

    from .app import create_app, key_server

    host, port = config.listen
    kbs, admin_auth, limiter = key_server(config)
    app = create_app(kbs, admin_auth, limiter, secure_cookies=bool(config.tls_cert))
    server_config = uvicorn.Config(app, host=host, port=port, http=guarded_protocol(), ws="none",
                                   loop=f"{__name__}:{GuardedLoop.__name__}",
                                   ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
                                   ssl_keyfile=str(config.tls_key) if config.tls_key else None,
                                   timeout_keep_alive=int(KEEP_ALIVE), proxy_headers=False,
                                   limit_concurrency=CONNECTIONS_MAX, backlog=2048, log_level="info",
                                   access_log=False, server_header=False, date_header=False, lifespan="off")
    sock = server_config.bind_socket()
    sock.listen(server_config.backlog)  # connections queue from now on, before any worker accepts
    workers = config.workers or os.cpu_count() or 1
    kbs.store.close_connections()
    children: dict[int, int] = {}  # pid -> worker number

    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # received below, one at a time
    supervisor = os.getpid()

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent()
                if os.getppid() != supervisor:  # it died before the line above
                    os._exit(0)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
                uvicorn.Server(server_config).run(sockets=[sock])
            except BaseException:  # a worker never returns into the supervisor's code
                log.exception("worker %d failed", number)
                code = 1
            finally:
                os._exit(code)
        children[pid] = number

    for number in range(workers):
        spawn(number)
    log.info("serving on %s:%d with %d worker%s", host, port, workers, "s" if workers > 1 else "")
    notify("READY=1", f"STATUS=serving on {host}:{port} with {workers} workers")
    while signal.sigwaitinfo(watched).si_signo == signal.SIGCHLD:
        for pid, status in _reap():
            if pid not in children:
                continue
            number = children.pop(pid)
            log.error("worker %d (pid %d) ended (%s); starting another", number, pid,
                      f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                      else f"exit {os.WEXITSTATUS(status)}")
            _forget(pid, metrics_dir)
            time.sleep(_RESPAWN_PAUSE)
            spawn(number)
    notify("STOPPING=1")
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while children and time.monotonic() < deadline:
        for pid, _ in _reap():
            children.pop(pid, None)
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sock.close()


def _reap() -> list[tuple[int, int]]:
    """The (pid, status) of every child that ended, without waiting."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))


def _forget(pid: int, metrics_dir: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)

