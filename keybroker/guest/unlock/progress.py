"""Progress lines for the journal and the service status (never key material).

Under systemd, standard error goes to the journal (``JOURNAL_STREAM`` is set): each line
then carries a ``<N>`` syslog priority prefix. Status lines also go to the service manager
as ``STATUS=``, which ``systemctl status`` shows while the boot waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import systemd
from ...systemd import INFO, NOTICE, WARNING, Journal

__all__ = ["INFO", "NOTICE", "WARNING", "Reporter"]


@dataclass(frozen=True)
class Reporter:
    """Writes one line per event to the service's log and mirrors status lines to sd_notify."""

    journal: Journal = field(default_factory=lambda: Journal("keybroker", stream=True))

    def log(self, priority: int, message: str) -> None:
        self.journal.line(priority, message)

    def status(self, message: str, priority: int = INFO) -> None:
        self.log(priority, message)
        systemd.notify(f"STATUS={message}")

    def ready(self, message: str) -> None:
        self.log(INFO, message)
        systemd.notify("READY=1", f"STATUS={message}")
