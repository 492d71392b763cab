"""Run a guest call in a forked child, so that what it does to its process's keyrings stays there.

``broker.obtain`` keeps attestation tokens in root's user keyring, which it reaches by linking it
into its process keyring, made on demand. pytest's process must have none: for a request_key from
a process with a process keyring, the kernel takes "no key" found there over the error of a
negative key found in its session keyring, and upcalls again, so a test of the negative cache
would see a new construction (see docs/guest.md). conftest checks after every test that pytest's
process has none.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_child(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a forked child: its result, or its exception raised here (rebuilt from its type,
    arguments and attributes: the project's errors take keyword arguments, which pickle cannot replay)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                outcome: tuple[Any, ...] = ("value", call(*args))
            except BaseException as exc:  # handed to the parent, which raises it
                outcome = ("error", type(exc), exc.args, vars(exc))
            with os.fdopen(write_end, "wb") as out:
                out.write(pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("the child ended without an answer")
    outcome = pickle.loads(data)
    if outcome[0] == "value":
        return outcome[1]
    _, kind, args, attributes = outcome
    error = kind.__new__(kind)
    BaseException.__init__(error, *args)
    error.__dict__.update(attributes)
    raise error
