"""Progress lines for the journal and the service status (never key material).

Under systemd, standard error goes to the journal (``JOURNAL_STREAM`` is set): each line
then carries a ``<N>`` syslog priority prefix. Status lines also go to the service manager
as ``STATUS=``, which ``systemctl status`` shows while the boot waits.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field

from ... import systemd

ERROR, WARNING, NOTICE, INFO = 3, 4, 5, 6


@dataclass(frozen=True)
class Reporter:
    """Writes one line per event to standard error and mirrors status lines to sd_notify."""

    journal: bool = field(default_factory=lambda: "JOURNAL_STREAM" in os.environ)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def log(self, priority: int, message: str) -> None:
        line = " ".join(message.split())  # one line, whatever a peer or a file put in it
        with self.lock:
            print(f"<{priority}>{line}" if self.journal else line, file=sys.stderr, flush=True)

    def status(self, message: str, priority: int = INFO) -> None:
        self.log(priority, message)
        systemd.notify(f"STATUS={message}")

    def ready(self, message: str) -> None:
        self.log(INFO, message)
        systemd.notify("READY=1", f"STATUS={message}")
