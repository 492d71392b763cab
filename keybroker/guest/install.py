"""Install the request-key drop-in that routes ``keybroker:`` keys to the handler.

request-key(8) reads every ``*.conf`` in /etc/request-key.d (regular files only, symlinks
are ignored), each line ``op type description callout program args...`` without quoting;
the best match wins. keybroker claims the ``keybroker:`` prefix for ``user`` and ``logon``
keys: ``keybroker-handoff`` hands the construction to the agent, or runs the handler beside it,
in exec mode with only the key serial. The line carries the agent's share of the configured
deadline (half of it): install the drop-in again when ``[handler] deadline`` changes.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from ..errors import ConfigError
from . import ownership

CONF_DIR = Path("/etc/request-key.d")
CONF_NAME = "keybroker.conf"


def handoff_path() -> Path:
    """The keybroker-handoff script installed next to this Python (keybroker-request-key is beside it)."""
    return Path(sys.executable).parent / "keybroker-handoff"


def conf_text(handoff: Path, config: Path, deadline: float) -> str:
    for what, path in (("handoff", handoff), ("config", config)):
        if not path.is_absolute() or any(c.isspace() for c in str(path)) or "%" in str(path):
            raise ConfigError(f"the {what} path {str(path)!r} must be absolute, without spaces or '%' "
                              "(request-key.conf has no quoting)")
    share = int(deadline // 2)
    lines = ["# keybroker: attested key release (keybroker install-handler). Exec mode, serial only."]
    lines += [f"create\t{key_type}\tkeybroker:*\t*\t{handoff} --config {config} --agent-share {share} %k"
              for key_type in ("user", "logon")]
    return "\n".join(lines) + "\n"  # request-key 1.6.3 chops the last character of a file


def install(config: Path, conf_dir: Path = CONF_DIR, handoff: Path | None = None) -> Path:
    """Write the drop-in for the configuration ``config`` (which must load), after checking that what it
    makes root run and read is root's alone."""
    from .config import load

    handoff = handoff or handoff_path()
    for program in (handoff, handoff.parent / "keybroker-request-key"):
        if not os.access(program, os.X_OK):
            raise ConfigError(f"handler {program} is missing or not executable")
        ownership.check(program, "handler")
    cfg = load(config)
    ownership.check_handler(config, cfg.server_ca, thorough=True)
    text = conf_text(handoff, config.resolve(), cfg.deadline)
    # The folder and any missing parent 0755, not 0777 under umask 0, where anyone could swap the drop-in.
    old = os.umask(0o022)
    try:
        conf_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    ownership.check(conf_dir, "request-key.d folder")  # nor a folder (or link to one) another user can write
    target = conf_dir / CONF_NAME
    # A dot-file (request-key skips them) of a fresh name: nothing planted there is followed or reused.
    tmp = conf_dir / f".{CONF_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
