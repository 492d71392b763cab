"""Secret files (KEK, admin tokens, token key, TLS key): what is not a secret's file is refused, at once."""

from __future__ import annotations

import os
import threading

import pytest

from keybroker.errors import ConfigError
from keybroker.server import secretfile


@pytest.mark.parametrize("read", [lambda path: secretfile.read(path, "KEK file"),
                                  lambda path: secretfile.check(path, "KEK file")], ids=["read", "check"])
def test_a_fifo_is_refused_not_waited_on(read, tmp_path):
    # `--kek-file` naming a FIFO nobody writes to held `keybroker serve` (or any command) in open() forever.
    fifo = tmp_path / "kek"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read(fifo)
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # release it, so that nothing is left behind
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("opening a FIFO as a secret file waited for a writer")
    assert isinstance(outcome[0], ConfigError) and f"KEK file {fifo} is not a regular file" in str(outcome[0])
