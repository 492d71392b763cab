"""One way to fetch vendor collateral over HTTP (AMD's KDS, Intel's PCS or a PCCS): bounded and polite.

Nothing fetched is trusted for being fetched: the verifiers' checks under the pinned roots
decide. What this module guarantees is that a hostile report cannot make the key server
hammer a vendor service or tie up its threads:

- an answer larger than the caller's limit is refused;
- HTTP 429 and 503 are waited out (``Retry-After``, at most ``RETRY_AFTER_MAX`` each) within
  the fetch's time budget, and every fetch ends within ``BUDGET`` seconds: requests' timeout
  bounds each socket read, not the exchange, so a watchdog shuts the fetch's sockets at its
  deadline (a service that drips its headers, a chunk's size line or its body is cut off).
  Not under it: resolving the service's name, and connecting, where each address the name
  has is tried for up to the request's timeout;
- answers are asked for, and taken, uncompressed (no decompression to bound);
- a URL that failed is not asked again for a while: a 404 for ``FAILURE_TTL`` seconds,
  other failures for ``ERROR_TTL`` (a report with a random CHIP_ID costs one request, not
  one per attestation);
- at most ``CONCURRENCY`` fetches run at once in a process; others wait within the budget.

One :class:`Fetcher` per process (the key server's is shared by every request). Its
``cache_dir`` is where the KDS and PCS modules keep what they fetched. Its :meth:`offline`
view answers from what is remembered and raises :class:`WouldFetch` where it would go to
the network: the key server verifies on its event loop with that view, and on a thread,
online, only the evidence whose collateral is not at hand.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3

from ..errors import EvidenceError
from ..wire import decimal

TIMEOUT = 10.0          # seconds per HTTP request
BUDGET = 20.0           # seconds for one get(), retries and waits included
RETRY_AFTER_MAX = 5.0   # seconds: a verifier must not stall a key request for long
ATTEMPTS = 3
CHUNK = 64 * 1024       # bytes asked of one read of an answer's body
REQUEST_TIME_MIN = 1.0  # seconds: a request with less time than this left is not sent
CONCURRENCY = 4
FAILURE_TTL = 600.0     # seconds a 404 is remembered
ERROR_TTL = 60.0        # seconds another failure is remembered
FAILURES_MAX = 4096     # remembered failures, oldest forgotten first
STALE_RECHECK = 3600.0  # seconds what a service served already stale is used before it is asked again


def kept_lately(mtime: float) -> bool:
    """Whether an answer cached at ``mtime`` (its file's) was kept less than STALE_RECHECK seconds ago:
    one a service served already past its next update is not asked for on every verification. Kept
    "in the future" (the clock was stepped back since) counts only within STALE_RECHECK too."""
    return abs(time.time() - mtime) < STALE_RECHECK


_refresh_locks: dict[str, threading.Lock] = {}
_refresh_locks_guard = threading.Lock()


def refresh_lock(key: str) -> threading.Lock:
    """The lock that serialises this process's refreshes of one cached answer (``key``: its URL, or the
    folder it is kept in): without it, every attestation that finds the answer due fetches it again at
    the same moment. The keys are few (a kind and a pinned ARK's product; a platform type and CA named
    by certificates already checked), so the locks are kept."""
    with _refresh_locks_guard:
        return _refresh_locks.setdefault(key, threading.Lock())


class WouldFetch(Exception):
    """An offline :class:`Fetcher` was asked for something only the network has (not an
    EvidenceError: no verifier takes it for a verdict)."""


@dataclass(frozen=True)
class Answer:
    """A 200 answer. Its header names are lower-cased: HTTP names are case-insensitive, and
    HTTP/2 (a PCCS behind a gateway) sends them in lower case; look them up with :meth:`header`."""

    body: bytes
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        """The value of the header ``name``, whatever the case of either."""
        return self.headers.get(name.lower())


class Fetcher:
    def __init__(self, cache_dir: Path | None = None, *, budget: float = BUDGET,
                 concurrency: int = CONCURRENCY) -> None:
        self.cache_dir = cache_dir
        self.budget = budget
        self._slots = threading.BoundedSemaphore(concurrency)
        self._failures: OrderedDict[str, tuple[float, str, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self.online = True

    def offline(self) -> Fetcher:
        """This fetcher (its cache, remembered failures and limits) without the network."""
        view = copy.copy(self)
        view.online = False
        return view

    def get(self, url: str, *, service: str, limit: int, missing_ok: bool = False) -> Answer | None:
        """The 200 answer for ``url``; None for a 404 when ``missing_ok``; else EvidenceError."""
        remembered = self._remembered(url)
        if remembered is not None:
            reason, missing = remembered
            if missing and missing_ok:
                return None
            raise EvidenceError(f"{service}: {reason} (a recent failure; not asked again yet)")
        if not self.online:
            raise WouldFetch(url)
        deadline = time.monotonic() + self.budget
        if not self._slots.acquire(timeout=max(self.budget - REQUEST_TIME_MIN, 0)):
            raise EvidenceError(f"{service}: too many fetches in flight; {url} was not asked")
        try:
            return self._get(url, service, limit, missing_ok, deadline)
        finally:
            self._slots.release()

    def _get(self, url: str, service: str, limit: int, missing_ok: bool, deadline: float) -> Answer | None:
        for attempt in range(1, ATTEMPTS + 1):
            timeout = min(TIMEOUT, deadline - time.monotonic())
            if timeout < REQUEST_TIME_MIN:
                break
            try:
                with _Watchdog(deadline) as watchdog, requests.Session() as http:
                    http.mount("http://", _WatchedAdapter())
                    http.mount("https://", _WatchedAdapter())
                    with http.get(url, timeout=timeout, stream=True, allow_redirects=False,
                                  headers={"Accept-Encoding": "identity"}) as response:
                        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                        body = _read(response.raw, limit, deadline) if encoding == "identity" else b""
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                if watchdog.fired:
                    break
                raise self._fail(url, f"{service}: cannot fetch {url}: {exc}") from None
            if body is None or watchdog.fired:  # cut off: a body that ends with its connection is not whole
                break
            if encoding != "identity":
                raise self._fail(url, f"{service}: the answer for {url} is compressed ({encoding[:20]}), "
                                      "though it was asked for as is")
            if len(body) > limit:
                raise self._fail(url, f"{service}: the answer for {url} is larger than {limit} bytes")
            if response.status_code in (429, 503) and attempt < ATTEMPTS:
                pause = _retry_after(response.headers.get("Retry-After"), attempt)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
                continue
            if response.status_code == 404:
                reason = f"{service} has nothing at {url} (HTTP 404)"
                self._remember(url, reason, missing=True)
                if missing_ok:
                    return None
                raise EvidenceError(reason)
            if response.status_code != 200:
                raise self._fail(url, f"{service} answered HTTP {response.status_code} for {url}")
            return Answer(body, {name.lower(): value for name, value in response.headers.items()})
        raise self._fail(url, f"{service} gave no answer for {url} within {self.budget:g} s (busy or slow)")

    def refuse(self, url: str, reason: str) -> EvidenceError:
        """The error for an answer from ``url`` that came but cannot be used, remembered as a failure
        (a service that keeps answering so is not asked on every verification)."""
        return self._fail(url, reason)

    def _fail(self, url: str, reason: str) -> EvidenceError:
        self._remember(url, reason, missing=False)
        return EvidenceError(reason)

    def _remember(self, url: str, reason: str, *, missing: bool) -> None:
        until = time.monotonic() + (FAILURE_TTL if missing else ERROR_TTL)
        with self._lock:
            self._failures[url] = (until, reason, missing)
            self._failures.move_to_end(url)
            while len(self._failures) > FAILURES_MAX:
                self._failures.popitem(last=False)

    def _remembered(self, url: str) -> tuple[str, bool] | None:
        with self._lock:
            entry = self._failures.get(url)
            if entry is None:
                return None
            until, reason, missing = entry
            if until < time.monotonic():
                del self._failures[url]
                return None
            return reason, missing


def _read(raw: urllib3.BaseHTTPResponse, limit: int, deadline: float) -> bytes | None:
    """At most ``limit + 1`` bytes of the body, as sent; None when ``deadline`` passes first.

    ``read1`` returns what one socket read brings, so the deadline is checked between reads (a
    read blocked past it ends when the watchdog shuts the socket).
    """
    body = bytearray()
    while len(body) <= limit:
        if time.monotonic() >= deadline:
            return None
        chunk = raw.read1(CHUNK, decode_content=False)
        if not chunk:
            break
        body += chunk
    return bytes(body)


class _Watchdog:
    """Shuts the sockets one fetch opens (in this thread) when its deadline passes, so that a read
    blocked on a service that drips bytes ends then."""

    _current = threading.local()

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._over = False  # the fetch ended: its descriptors are closed, a late timer shuts nothing
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _Watchdog._current.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
        _Watchdog._current.watchdog = None
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            self._over = True

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        """Put the connection of ``sock``, just made by this thread, under its fetch's watchdog (if any).

        The watchdog keeps a descriptor of its own (a duplicate): TLS takes the connection over
        from ``sock`` (whose descriptor it detaches), and a shutdown through any descriptor ends
        the connection, handshake and tunnel included."""
        watchdog = getattr(cls._current, "watchdog", None)
        if watchdog is not None:
            with watchdog._lock:
                own = sock.dup()
                watchdog._sockets.append(own)
                if watchdog.fired:
                    _shut(own)

    def _fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.fired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _Watchdog.watch(sock)
        return sock


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _Watchdog.watch(sock)
        return sock


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, whose connections (to the service, or to a proxy) are watched."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def _retry_after(header: str | None, attempt: int) -> float:
    seconds = None if header is None else decimal(header.strip(), 6)
    if seconds is not None:
        return min(float(seconds), RETRY_AFTER_MAX)
    return min(0.5 * 2 ** attempt, RETRY_AFTER_MAX)
