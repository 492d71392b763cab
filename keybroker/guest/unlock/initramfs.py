"""What an initramfs needs to run keybroker: ``python -m keybroker.guest.unlock.initramfs CONFIG...``.

dracut's keybroker module (``systemd/dracut/91keybroker/module-setup.sh``) runs this with the
interpreter of the installed ``keybroker`` command. It loads each client configuration, so
that a broken one fails the image build instead of the boot, and prints one line per item::

    file <absolute path>    a file to copy into the image (dracut adds the ELF libraries it needs)
    volume <name>           a volume the configuration maps (the module then asks for the network)

The files: the interpreter (and its venv's ``pyvenv.cfg``), the standard library without
the parts a boot never uses, keybroker's package, the whole top-level packages (so that
their lazy imports work too) of every third-party module the handler and the unlock
commands import, the ``.pth`` files that set up the environment, each configuration and its
CA bundle.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import sysconfig
from pathlib import Path

from ...errors import ConfigError
from .. import config

BOOT_MODULES = ("keybroker.cli", "keybroker.guest.handler", "keybroker.guest.broker", "keybroker.guest.unlock.keyfile",
                "keybroker.guest.unlock.askpass", "keybroker.guest.unlock.place", "keybroker.guest.unlock.initramfs")
STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                         "distutils", "site-packages", "dist-packages"})
#: Files no boot loads: optimised bytecode (only for python -O), Tk, the interpreter's own tests.
FILE_SKIP = re.compile(r".*\.opt-[12]\.pyc|_tkinter\..*|_test.*|_ctypes_test\..*|_xxtestfuzz\..*|xxlimited.*")


def _tree(root: Path, skip: frozenset[str] = frozenset()) -> set[Path]:
    files: set[Path] = set()
    for folder, dirs, names in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in skip and not d.startswith("config-")]
        files.update(Path(folder) / name for name in names if not FILE_SKIP.fullmatch(name))
    return files


def _module_files(module: object) -> set[Path]:
    """A top-level module's file, or its package's whole tree."""
    paths = getattr(module, "__path__", None)
    if paths:
        return set().union(*(_tree(Path(p)) for p in paths if os.path.isdir(p)))
    file = getattr(module, "__file__", None)
    if not file:
        return set()
    path = Path(file)
    return {path, *path.parent.glob(f"__pycache__/{path.stem}.*.pyc")}


def python_files() -> set[Path]:
    """The interpreter, its standard library and every package the boot path imports."""
    for name in BOOT_MODULES:
        importlib.import_module(name)
    executable = Path(sys.executable)
    files = {executable, Path(os.path.realpath(executable))}
    if sys.prefix != sys.base_prefix:
        files.add(Path(sys.prefix) / "pyvenv.cfg")
    files |= _tree(Path(sysconfig.get_path("stdlib")), STDLIB_SKIP)
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        files |= _tree(Path(dynload))
    site = {Path(p) for p in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}}
    for folder in site:
        files.update(folder.glob("*.pth"))
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or not file:
            continue
        if name == "keybroker" or any(Path(file).is_relative_to(folder) for folder in site):
            files |= _module_files(module)
    return files


def listing(config_paths: list[Path]) -> list[str]:
    files: set[Path] = set()
    volumes: list[str] = []
    for path in config_paths:
        cfg = config.load(path)
        files.add(Path(os.path.abspath(path)))
        if cfg.server_ca:
            files.add(cfg.server_ca)
        volumes += [volume.name for volume in cfg.volumes if volume.name not in volumes]
    files |= python_files()
    lines = [f"file {path}" for path in sorted(files) if "\n" not in str(path)]
    return lines + [f"volume {name}" for name in volumes]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m keybroker.guest.unlock.initramfs CONFIG...", file=sys.stderr)
        return 2
    try:
        print("\n".join(listing([Path(arg) for arg in args])))
    except ConfigError as exc:
        print(f"keybroker initramfs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
