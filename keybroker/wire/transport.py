"""The transport rule both sides keep: plain HTTP only to and on loopback; everything else is TLS."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a key server's base URL, or None.

    https://, or http:// to a loopback address; no query and no fragment.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # a "[" without its "]", or the reverse
        return f"is not a URL: {url[:200]!r}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"must be an https:// URL, got {url[:200]!r}"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return "may use plain http only for a loopback address; use https"
    if parts.query or parts.fragment:
        return "must not carry a query or fragment"
    try:
        parts.port  # noqa: B018  (parsed when read: a port past 65535 or not a number raises)
    except ValueError:
        return f"has no valid port: {parts.netloc[:100]!r}"
    return None
