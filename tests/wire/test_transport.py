"""The transport rule: plain HTTP only to loopback, and a server URL with no query or fragment."""

from __future__ import annotations

import pytest

from keybroker.wire.transport import server_url_problem


@pytest.mark.parametrize("url", ["https://kbs.example:8080", "https://kbs.example/base", "http://127.0.0.2:1",
                                 "http://[::1]:8080", "http://localhost:8080"])
def test_a_server_url_that_keeps_the_rule_has_no_problem(url):
    assert server_url_problem(url) is None


@pytest.mark.parametrize("url, problem", [
    ("http://localhost.example:8080", "plain http only for a loopback"),  # a name that starts like loopback
    ("http://127.0.0.1.example/", "plain http only for a loopback"),
    ("http://10.0.0.1:8080", "plain http only for a loopback"),
    ("https://kbs.example/?tenant=a", "must not carry a query or fragment"),
    ("https://kbs.example/#a", "must not carry a query or fragment"),
    ("https://kbs.example:99999", "has no valid port"),
    ("ftp://kbs.example", "must be an https:// URL"),
    ("https://[::1", "is not a URL"),
])
def test_a_server_url_that_breaks_the_rule_is_named(url, problem):
    assert problem in (server_url_problem(url) or "")
