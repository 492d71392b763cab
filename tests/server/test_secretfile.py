"""Secret files (KEK, admin tokens, token key, TLS key): what is not a secret's file is refused, at once."""

from __future__ import annotations

import os

import pytest

from keybroker.errors import ConfigError
from keybroker.server import secretfile
from support.fifo import outcome_of_reading


@pytest.mark.parametrize("read", [lambda path: secretfile.read(path, "KEK file"),
                                  lambda path: secretfile.check(path, "KEK file")], ids=["read", "check"])
def test_a_fifo_is_refused_not_waited_on(read, tmp_path):
    # `--kek-file` naming a FIFO nobody writes to held `keybroker serve` (or any command) in open() forever.
    fifo = tmp_path / "kek"
    os.mkfifo(fifo, 0o600)
    outcome = outcome_of_reading(read, fifo)
    assert isinstance(outcome, ConfigError) and f"KEK file {fifo} is not a regular file" in str(outcome)
