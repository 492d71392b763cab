"""Root runs and reads only what is root's alone: the handler, its interpreter, its code, its configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keybroker.errors import UntrustedFile
from keybroker.guest import install, ownership

NOBODY = 65534
HANDLER = Path(sys.executable).parent / "keybroker-handoff"


@pytest.fixture
def folder(tmp_path):
    # tmp_path is root's, mode 0700, under the sticky /tmp: a trusted place to build untrusted things in.
    return tmp_path


def config_file(folder: Path, name: str = "client.toml") -> Path:
    path = folder / name
    path.write_text('[server]\nurl = "https://kbs.example"\n')
    path.chmod(0o644)
    return path


def test_roots_own_files_pass(folder):
    ownership.check(config_file(folder), "client configuration")
    ownership.check_handler(config_file(folder))


@pytest.mark.parametrize("spoil, named", [
    (lambda p: os.chown(p, NOBODY, -1), "belongs to uid 65534"),
    (lambda p: p.chmod(0o664), "writable by group or others (mode 0664)"),
    (lambda p: p.chmod(0o646), "writable by group or others (mode 0646)"),
    (lambda p: os.chown(p.parent, NOBODY, -1), "belongs to uid 65534"),
    (lambda p: p.parent.chmod(0o777), "writable by group or others (mode 0777)"),
])
def test_files_others_can_change_are_refused(folder, spoil, named):
    (folder / "etc").mkdir()
    path = config_file(folder / "etc")
    spoil(path)
    with pytest.raises(UntrustedFile, match=re.escape(named)):
        ownership.check(path, "client configuration")


def test_links_are_followed_and_each_step_checked(folder):
    theirs = folder / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, -1)
    target = config_file(folder, "real.toml")
    link = folder / "client.toml"
    link.symlink_to(target)
    ownership.check(link, "client configuration")  # root's link to root's file
    bad = config_file(theirs, "real.toml")
    os.chown(bad, 0, 0)
    link.unlink()
    link.symlink_to(bad)  # root's file, in a folder another user owns: they can swap it
    with pytest.raises(UntrustedFile, match=f"{theirs} belongs to uid 65534"):
        ownership.check(link, "client configuration")


def test_a_sticky_root_folder_is_fine_but_not_as_the_file_itself(folder):
    sticky = folder / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    ownership.check(config_file(sticky), "client configuration")  # others cannot replace root's file there
    with pytest.raises(UntrustedFile, match="mode 1777"):
        ownership.check(sticky, "import folder")


def test_install_refuses_a_configuration_or_handler_others_can_change(folder):
    config = config_file(folder)
    config.chmod(0o666)
    with pytest.raises(UntrustedFile, match="client configuration"):
        install.install(config, folder / "request-key.d", HANDLER)
    config.chmod(0o644)
    theirs = folder / "bin"
    theirs.mkdir()
    os.chown(theirs, NOBODY, -1)
    for name in ("keybroker-handoff", "keybroker-request-key"):
        (theirs / name).write_text("#!/bin/sh\n")
        (theirs / name).chmod(0o755)
    with pytest.raises(UntrustedFile, match="refusing handler"):
        install.install(config, folder / "request-key.d", theirs / "keybroker-handoff")
    # The handler the handoff runs, beside it, must be root's alone too.
    ours = folder / "ours"
    ours.mkdir()
    shutil.copy(HANDLER, ours)
    (ours / "keybroker-request-key").symlink_to(theirs / "keybroker-request-key")
    with pytest.raises(UntrustedFile, match=r"refusing handler .*keybroker-request-key"):
        install.install(config, folder / "request-key.d", ours / "keybroker-handoff")
    assert not (folder / "request-key.d" / "keybroker.conf").exists()
    assert install.install(config, folder / "request-key.d", HANDLER).exists()  # root's alone: installed


def test_the_command_says_it_in_one_line(folder):
    config = config_file(folder)
    config.chmod(0o664)
    out = subprocess.run([sys.executable, "-m", "keybroker", "install-handler", "--config", str(config),
                          "--conf-dir", str(folder / "request-key.d")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "chmod go-w" in out.stderr, out.stderr


def test_the_handler_refuses_a_configuration_others_can_change(tsm_sim, kbs, handler):
    root = tsm_sim("sev_guest")
    server = kbs()
    server.put("default/disk/root", b"k" * 32)
    config = handler(server.url, root)
    config.chmod(0o666)  # after installing: someone loosened it
    out = subprocess.run(["keyctl", "session", "-", "keyctl", "request2", "user", "keybroker:default/disk/root", "",
                          "@s"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Required key not available" in out.stderr
    assert server.requests_to("auth") == 0  # refused before anything was believed
    debug = subprocess.run([str(HANDLER.parent / "keybroker-request-key"), "--config", str(config), "--debug", "user",
                            "keybroker:default/disk/root", ""], capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1 and "writable by group or others (mode 0666)" in debug.stdout


def test_install_writes_through_no_planted_link(folder):
    conf_dir = folder / "request-key.d"
    conf_dir.mkdir()
    victim = folder / "victim"
    victim.write_text("precious\n")
    (conf_dir / ".keybroker.conf.tmp").symlink_to(victim)  # where a fixed temporary name would be written
    install.install(config_file(folder), conf_dir, HANDLER)
    assert victim.read_text() == "precious\n" and (conf_dir / "keybroker.conf").read_text().startswith("# keybroker")


@pytest.fixture
def planted(folder):
    """``own`` root's, ``evil`` another user's; ``own/cfgdir`` a root-owned link into ``evil``."""
    own, evil = folder / "own", folder / "evil"
    own.mkdir()
    evil.mkdir()
    (evil / "sub").mkdir()
    config_file(evil)  # where the kernel goes for own/cfgdir/../client.toml
    for path in (evil, evil / "sub", evil / "client.toml"):
        os.chown(path, NOBODY, -1)
    config_file(own)  # what a textual normalisation would look at instead
    (own / "cfgdir").symlink_to(evil / "sub")
    return own, evil


def test_dot_dot_after_a_link_is_the_parent_of_its_target(planted, monkeypatch):
    own, evil = planted
    assert (own / "cfgdir/../client.toml").samefile(evil / "client.toml")  # what the kernel opens
    with pytest.raises(UntrustedFile, match=f"{evil} belongs to uid 65534"):
        ownership.check(own / "cfgdir/../client.toml", "client configuration")
    (own / "client2.toml").symlink_to("cfgdir/../client.toml")
    with pytest.raises(UntrustedFile, match=f"{evil} belongs to uid 65534"):
        ownership.check(own / "client2.toml", "client configuration")
    monkeypatch.chdir(own)  # a relative path goes the same way
    with pytest.raises(UntrustedFile, match=f"{evil} belongs to uid 65534"):
        ownership.check(Path("cfgdir/../client.toml"), "client configuration")
    # Without a link, .. is as written; a link within root's folders is fine.
    (own / "sub").mkdir()
    ownership.check(own / "sub/../client.toml", "client configuration")
    (own / "mine").symlink_to(".")
    ownership.check(own / "mine/mine/../own/client.toml", "client configuration")


def test_a_loop_of_links_is_refused(folder):
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    with pytest.raises(UntrustedFile, match="more than 40 symbolic links"):
        ownership.check(folder / "a", "client configuration")


def test_a_tree_checks_where_its_links_lead(planted):
    own, evil = planted
    package = own / "pkg"
    (package / "mod").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod" / "helper.py").write_text("")
    ownership.check_tree(package, "keybroker package")
    (package / "lib").symlink_to("mod")  # a link within the tree, as a venv's lib64 -> lib: fine
    (package / "python").symlink_to(sys.executable)
    ownership.check_tree(package, "keybroker package")
    (evil / "evil.py").write_text("")
    os.chown(evil / "evil.py", NOBODY, -1)
    (package / "mod" / "evil.py").symlink_to(evil / "evil.py")  # root's link to a file another user owns
    with pytest.raises(UntrustedFile, match=f"{evil} belongs to uid 65534"):
        ownership.check_tree(package, "keybroker package")
    (package / "mod" / "evil.py").unlink()
    theirs = own / "theirs"
    theirs.mkdir()
    (theirs / "helper.py").write_text("")
    os.chown(theirs / "helper.py", NOBODY, -1)
    (package / "more").symlink_to(theirs)  # a root-owned folder, by a link, holding another user's file
    with pytest.raises(UntrustedFile, match=re.escape("more/helper.py belongs to uid 65534")):
        ownership.check_tree(package, "keybroker package")
    (package / "more").unlink()
    (package / "mod" / "loop").symlink_to("..")  # a cycle is walked once
    ownership.check_tree(package, "keybroker package")


def test_install_makes_its_folder_root_s_alone_whatever_the_umask(folder):
    """Its missing parents too: made 0777 under umask 0, they were then refused by its own check."""
    conf_dir = folder / "etc" / "request-key.d"
    old = os.umask(0)
    try:
        install.install(config_file(folder), conf_dir, HANDLER)
    finally:
        os.umask(old)
    assert conf_dir.stat().st_mode & 0o022 == 0  # others cannot swap the drop-in for one that runs their program
    assert (conf_dir / "keybroker.conf").stat().st_mode & 0o022 == 0


@pytest.mark.parametrize("spoil, named", [
    (lambda d: os.chown(d, NOBODY, -1), "belongs to uid 65534"),
    (lambda d: d.chmod(0o777), "writable by group or others (mode 0777)"),
    (lambda d: d.chmod(0o1777), "writable by group or others (mode 1777)"),
])
def test_install_refuses_a_folder_others_can_write(folder, spoil, named):
    conf_dir = folder / "request-key.d"
    conf_dir.mkdir()
    spoil(conf_dir)
    with pytest.raises(UntrustedFile, match=re.escape(named)):
        install.install(config_file(folder), conf_dir, HANDLER)
    assert not (conf_dir / "keybroker.conf").exists()


def test_install_refuses_a_link_to_a_folder_others_can_write(folder):
    theirs = folder / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, -1)
    (folder / "request-key.d").symlink_to(theirs)
    with pytest.raises(UntrustedFile, match=f"{theirs} belongs to uid 65534"):
        install.install(config_file(folder), folder / "request-key.d", HANDLER)
    assert not (theirs / "keybroker.conf").exists()


def test_the_interpreter_s_venv_configuration_must_be_root_s_alone(folder, monkeypatch):
    # pyvenv.cfg's home names the standard library the interpreter imports as it starts (encodings,
    # site): whoever may rewrite it runs code as root in every handler, before any check.
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n")
    cfg.chmod(0o644)
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    ownership.check_code()
    cfg.chmod(0o666)
    with pytest.raises(UntrustedFile, match=r"interpreter configuration .*pyvenv\.cfg is writable by group or others"):
        ownership.check_code()
