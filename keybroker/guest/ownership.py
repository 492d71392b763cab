"""What root runs and reads must be root's: the handler, its interpreter, its code, its configuration.

The request-key handler runs as root for any local user's request. If a user could change
the handler script, the Python that runs it, the modules it imports or the client
configuration (the key server, the CA it trusts), every key request would run that user's
code or trust that user's server. A path is trusted when it and every directory above it
belong to root and are not writable by group or others; a directory writable by others is
accepted only when it is sticky and root's (``/tmp``: others cannot replace what root put
there). Symbolic links are followed as the kernel follows them, and each link and each target is
checked (``files.check_held`` walks the path; the key server holds its trust inputs to the same rule).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..files import check_held as check  # root's alone: the default owners
from ..files import check_tree

__all__ = ["check", "check_code", "check_config", "check_handler", "check_tree"]


def check_handler(config: Path, server_ca: Path | None = None, *, thorough: bool = False) -> None:
    """What one key request makes root run and read: the interpreter, the code it imports, the configuration."""
    check_code(thorough=thorough)
    check_config(config, server_ca)


def check_code(*, thorough: bool = False) -> None:
    """The interpreter and the code it imports: keybroker's own package file by file; the other import
    folders (site-packages, the standard library) as folders, or file by file when ``thorough``
    (at install time)."""
    check(Path(sys.executable), "interpreter")
    venv = _venv_config(Path(sys.executable))
    if venv is not None:
        check(venv, "interpreter configuration")
    check_tree(Path(__file__).resolve().parent.parent, "keybroker package")
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            (check_tree if thorough else check)(Path(entry), "import folder")


def _venv_config(executable: Path) -> Path | None:
    """The pyvenv.cfg the interpreter read as it started, as Python looks for it: beside the executable
    (the path it was started by, links not followed), else in the folder above. Its ``home`` says where
    the standard library comes from, imported before any check runs."""
    for folder in (executable.parent, executable.parent.parent):
        if os.path.lexists(folder / "pyvenv.cfg"):
            return folder / "pyvenv.cfg"
    return None


def check_config(config: Path, server_ca: Path | None = None) -> None:
    """The client configuration and the CA bundle it names."""
    check(config, "client configuration")
    if server_ca is not None:
        check(server_ca, "CA bundle")
