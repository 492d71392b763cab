"""The README stays a short front door, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(document: Path):
    text = document.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)}
            if anchor not in headings:
                broken.append(target)
    assert not broken


def test_every_document_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in DOCUMENTS[1:] if f"docs/{p.name}" not in readme] == []


def _check_names(folder: Path) -> set[str]:
    """The names of the checks the verifier modules in ``folder`` record (``checks.passed("name"``,
    ``failed``, ``skipped``, ``require(condition, "name"``, ``check_freshness(..., name="name")``)."""
    import ast

    names = set()
    for module in folder.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute | ast.Name):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            at = {"passed": 0, "failed": 0, "skipped": 0, "require": 1}.get(called)
            args = [*node.args, *(k.value for k in node.keywords if k.arg == "name")]
            if at is not None and len(node.args) > at:
                args = [node.args[at]]
            elif called != "check_freshness":
                continue
            names |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and re.fullmatch(r"[a-z][a-z0-9_]*", a.value)}
    return names


@pytest.mark.parametrize("provider, heading", [("snp", "**AMD SEV-SNP**"), ("tdx", "**Intel TDX**"),
                                               ("cca", "**Arm CCA**"), ("sev", "**AMD SEV / SEV-ES**")])
def test_every_check_a_verifier_records_is_in_its_section_of_verifier_md(provider: str, heading: str):
    """An operator reads verifier.md to learn what a PASS proves: a check the verifier records that
    its section does not name (TDX's qe_pinned was missing) is one they cannot judge."""
    text = (REPO / "docs" / "verifier.md").read_text()
    starts = sorted(text.index(h) for h in ("**AMD SEV-SNP**", "**Intel TDX**", "**Arm CCA**", "**AMD SEV / SEV-ES**"))
    start = text.index(heading)
    section = text[start:next((s for s in starts if s > start), len(text))]
    names = _check_names(REPO / "keybroker" / "verifier" / provider)
    assert names, f"no checks found in keybroker/verifier/{provider}"
    assert sorted(n for n in names if f"`{n}`" not in section) == []
    assert sorted(n for n in _check_names(REPO / "keybroker" / "verifier") if f"`{n}`" not in text) == []


def test_no_documented_command_writes_a_secret_before_restricting_it():
    """`head -c 32 /dev/urandom > kek && chmod 600 kek` leaves the KEK readable by any local user
    (umask 022: 0644) until the chmod, long enough for one watching /etc/keybroker with inotify:
    secrets are made under umask 077, in the README, the docs, the units and the errors' advice."""
    places = [*DOCUMENTS, *sorted((REPO / "systemd").glob("*.service")), *sorted((REPO / "keybroker").rglob("*.py"))]
    written_then_chmod = re.compile(r">\s*(\S+)\s*(?:&&|;)\s*chmod\s+[0-7]*600\b")
    assert [f"{p.relative_to(REPO)}: {m[0]}" for p in places for m in written_then_chmod.finditer(p.read_text())] == []
    readme = (REPO / "README.md").read_text()
    assert "(umask 077; head -c 32 /dev/urandom > /etc/keybroker/kek)" in readme


def test_server_md_names_every_suffix_a_trust_roots_folder_is_read_for():
    """A folder's file of a suffix docs/server.md did not name was read all the same, and one that is
    not an anchor stops the server: a PEM root saved as root.cert is read as AMD's legacy SEV format."""
    from keybroker.verifier.trust import ANCHOR_SUFFIXES

    text = (REPO / "docs" / "server.md").read_text()
    assert [s for s in ANCHOR_SUFFIXES if f"`*{s}`" not in text] == []


def test_documented_commands_that_need_the_kek_on_a_database_give_it():
    """`policy put policy.json --db URL` in docs/policy.md's first steps failed with 'no key-encryption
    key' (a stored policy carries a MAC under the KEK): each such command shows --kek-file."""
    needs_kek = re.compile(r"keybroker (?:policy (?:put|rm)|resource (?:put|get)|rotate-kek)\b[^\n`#]*--db\b[^\n`#]*")
    missing = [f"{p.name}: {m[0]}" for p in DOCUMENTS for m in needs_kek.finditer(p.read_text().replace("\\\n", " "))
               if "--kek-file" not in m[0]]
    assert missing == []


def test_policy_md_names_every_claim_that_pins_a_measurement():
    """The claims whose pinning silences the warning about rules that release to any guest."""
    from keybroker.server.policy import MEASUREMENT_CLAIMS

    text = (REPO / "docs" / "policy.md").read_text()
    paragraph = text[text.index("A rule that pins no measurement"):].split("\n\n")[0]
    assert sorted(c for c in MEASUREMENT_CLAIMS if f"`{c}`" not in paragraph) == []
