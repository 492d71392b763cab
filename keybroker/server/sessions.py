"""An RCAR session as the key server stores it, and the sessions a worker stored lately."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Session:
    id: str
    tee: str
    nonce: str
    state: str
    expires: float
    tee_pubkey: dict[str, str] | None
    claims: dict[str, Any] | None


class SessionCache:
    """The sessions this process stored lately, by id: at most ``size``, and at most ``budget``
    characters of their claims and keys as stored (JSON), the oldest forgotten first. A session's
    claims may be megabytes (a TDX event log's events): a count alone would let a guest that
    attests again and again with long event logs fill the worker's memory."""

    def __init__(self, size: int = 4096, budget: int = 32 * 1024 * 1024) -> None:
        self.size, self.budget = size, budget
        self._sessions: OrderedDict[str, tuple[Session, int]] = OrderedDict()
        self._cost = 0
        self._lock = threading.Lock()

    def put(self, session: Session, cost: int = 0) -> None:
        """Remember ``session``, ``cost`` characters long as stored (one larger than the budget is not kept)."""
        with self._lock:
            _, old = self._sessions.pop(session.id, (None, 0))
            self._cost -= old
            if cost > self.budget:
                return
            self._sessions[session.id] = session, cost
            self._cost += cost
            while len(self._sessions) > self.size or self._cost > self.budget:
                self._cost -= self._sessions.popitem(last=False)[1][1]

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            found = self._sessions.get(session_id)
            return None if found is None else found[0]
