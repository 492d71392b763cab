"""``keybroker serve``'s numbers are held to the same bounds from its flags as from its configuration file."""

from __future__ import annotations

import pytest

from keybroker.errors import ConfigError
from keybroker.server import config


@pytest.mark.parametrize("name, value", [("workers", -1), ("rate_burst", 0), ("rate_limit", -1.0),
                                         ("rate_limit", float("nan")), ("rate_limit", float("inf")),
                                         ("rate_burst", 10**360), ("rate_limit", 1e300), ("workers", 10**6)])
def test_a_flag_out_of_bounds_is_refused_as_the_files_key_is(name, value, tmp_path):
    """--workers -1 started no worker at all (the supervisor said READY=1, 'serving ... with -1 worker'
    and answered nothing), and --rate-limit nan turned the limiter off (every comparison with nan is
    false): the file refused the first and now refuses both. A burst past a float's range passed both,
    and the limiter then failed every request (OverflowError)."""
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be"):
        config.load(None, {name: value})
    path = tmp_path / "server.toml"
    path.write_text(f"{name.replace('_', '-')} = {str(value).lower()}\n")
    with pytest.raises(ConfigError, match=f"{name.replace('_', '-')} must be"):
        config.load(path, {})


def test_numbers_in_bounds_are_taken_from_flags_over_the_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("workers = 3\nrate-limit = 0\nrate-burst = 5\n")
    assert (config.load(path, {}).workers, config.load(path, {}).rate_limit) == (3, 0.0)
    loaded = config.load(path, {"workers": 0, "rate_limit": 2.5, "rate_burst": None})
    assert (loaded.workers, loaded.rate_limit, loaded.rate_burst) == (0, 2.5, 5)



@pytest.mark.parametrize("text, message", [("workers = " + "9" * 5000, "holds a value TOML cannot read"),
                                           ("x = " + "[" * 5000 + "]" * 5000, "nests arrays or tables too deeply")])
def test_a_value_tomllib_cannot_read_is_a_config_error(text, message, tmp_path):
    """tomllib raises a plain ValueError for an integer past 4300 digits and RecursionError for deep
    nesting: serve --config ended in a traceback, where a file's problems are errors that name it."""
    path = tmp_path / "server.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        config.load(path, {})


@pytest.mark.parametrize("line", ['kek-file = "kek\\u0000"', 'certs = ["certs\\u0000"]', 'db = "sqlite:///x\\u0000"',
                                  'name = "kbs\\u0000"', 'listen = "127.0.0.1\\u0000:8080"'])
def test_a_nul_in_a_string_is_a_config_error_naming_the_key(line, tmp_path):
    """TOML spells U+0000 as \\u0000, which no path, URL or name holds: serve --config ended in a traceback
    (ValueError: embedded null byte, from the first open of the path) instead of naming the key."""
    path = tmp_path / "server.toml"
    path.write_text(line + "\n")
    key = line.split(" ")[0]
    with pytest.raises(ConfigError, match=f"{path}: {key} must not hold a NUL character"):
        config.load(path, {})
