"""Per-peer limits on unauthenticated work: what a client that proves nothing may cost the server.

A token bucket per peer address: every request that carries no credential (no session
cookie, no Bearer token), every ``/auth`` (which hands out a nonce), and every request
with a credential that is refused (invalid, not attested, a bad or too large body) takes a
token; a peer with an empty bucket is answered 429 at once, before its body is read,
credential or not. Tokens come back at ``rate`` per second up to ``burst``. A credential is
charged after its answer, when it proved nothing: many sent at once are let in while one
token is left, and each is charged, into debt, which the peer then waits out. An attested
guest fetching resources with its session or token takes no token, however often it asks,
even for resources that are missing or that the policy denies it.

A peer is an IPv4 address, or an IPv6 /64 network: one host is usually given a whole /64,
and could otherwise take a fresh bucket for every request. The table of peers is bounded
(the least recently seen are forgotten first), so that many addresses cannot grow it.
Behind a proxy every guest shares the proxy's address: raise the limits there, or set the
rate to 0 to turn the limiter off.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_RATE = 20.0   # tokens per second and peer
DEFAULT_BURST = 200   # tokens a peer can spend at once
PEERS_MAX = 65536


def peer_of(address: str) -> str:
    """The peer an address counts as: itself (IPv4, or what is no IP address), or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    limited_since: float | None = None


class RateLimiter:
    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, peers_max: int = PEERS_MAX) -> None:
        self.rate, self.burst, self.peers_max = rate, burst, peers_max
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, peer: str) -> float | None:
        """Take a token for ``peer``: None when it had one, else the seconds until it will."""
        return self._check(peer, take=True)

    def wait(self, peer: str) -> float | None:
        """Whether ``peer`` has a token left (None), without taking it; else the seconds until it will."""
        return self._check(peer, take=False)

    def charge(self, peer: str) -> None:
        """Take a token for work ``peer`` was let in for and that proved nothing (a refused credential),
        into debt if need be (at most a burst's worth): requests that were let in together, each
        while a token was left, are each paid for, and the peer waits for all of them."""
        if not self.enabled:
            return
        with self._lock:
            bucket = self._refill(peer_of(peer))
            bucket.tokens = max(bucket.tokens - 1, -float(self.burst))

    def _check(self, peer: str, *, take: bool) -> float | None:
        if not self.enabled:
            return None
        with self._lock:
            bucket = self._refill(peer_of(peer))
            if bucket.tokens >= 1:
                if take:
                    bucket.tokens -= 1
                bucket.limited_since = None
                return None
            return (1 - bucket.tokens) / self.rate

    def newly_limited(self, peer: str) -> bool:
        """True once each time ``peer`` starts being refused (for one log line, not one per request)."""
        with self._lock:
            bucket = self._buckets.get(peer_of(peer))
            if bucket is None or bucket.limited_since is not None:
                return False
            bucket.limited_since = time.monotonic()
            return True

    def _refill(self, peer: str) -> _Bucket:
        now = time.monotonic()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.peers_max:
                self._buckets.popitem(last=False)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            self._buckets.move_to_end(peer)
        return bucket
