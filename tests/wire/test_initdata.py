"""Confidential Containers init-data: the TOML a guest may send with its attestation, read before any check."""

from __future__ import annotations

import hashlib
import time

import pytest

from keybroker.errors import EvidenceError
from keybroker.wire import initdata

DOCUMENT = 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = \'\'\'\n[token_configs.coco_as]\n' \
           'url = "http://127.0.0.1:8080"\n\'\'\'\n'


def test_a_document_and_its_digest():
    parsed = initdata.from_json({"format": "toml", "body": DOCUMENT})
    assert parsed.digest == hashlib.sha384(DOCUMENT.encode()).digest() and parsed.files == ("aa.toml",)


@pytest.mark.parametrize("deep", [
    "a" + ".a" * 5000 + " = 1\n",                         # one dotted key: memory quadratic in its parts
    "[" + "a" + ".a" * 5000 + "]\n" + "k = 1\n" * 100,    # a header: each line under it walks all its parts
    "x = {" + "a" + ".a" * 5000 + " = 1}\n",              # a dotted key in an inline table
    "a" + '."\u2028"' * 2000 + " = 1\n",                   # U+2028 ends no TOML line: the key is one line
])
def test_keys_too_deep_to_parse_cheaply_are_refused_before_parsing(deep):
    with pytest.raises(EvidenceError, match="more than 64 dots"):
        initdata.parse(DOCUMENT + deep)


@pytest.mark.parametrize("deep", [
    "x = {s = '''a'''', " + "a" + ".a" * 100 + " = 1}\n",   # a multi-line string's closer takes 2 more quotes
    'x = {s = """a\\"""", ' + "a" + ".a" * 100 + " = 1}\n",  # an escaped quote and a 4-quote closer
    "x = {s = 'a.b', " + "a" + ".a" * 100 + " = 1}\n",       # a key after a string on its line
    "s = '''\n" + "a" * 10 + "'''\n" + "a" + ".a" * 100 + " = 1\n",
])
def test_a_deep_key_does_not_hide_behind_a_string(deep):
    with pytest.raises(EvidenceError, match="more than 64 dots outside strings"):
        initdata.parse(DOCUMENT + deep)


def test_dots_in_strings_and_comments_are_not_keys():
    # A policy written on one line as an escaped string (as tomli_w writes it) holds hundreds of dots;
    # Trustee's own init-data example does. So may comments and literal strings.
    rego = "package agent_policy\\n" + "".join(f"allow_{i} if input.a.b.c.d.e.f.g.h\\n" for i in range(100))
    body = (DOCUMENT + f'"policy.rego" = "{rego}"\n' + "# " + "." * 200 + "\n"
            + "lit = '" + "." * 200 + "'\n" + 'ml = """\n' + "." * 200 + '\n"""\n')
    parsed = initdata.parse(body)
    assert set(parsed.files) == {"aa.toml", "policy.rego", "lit", "ml"}
    assert parsed.digest == hashlib.sha384(body.encode()).digest()


@pytest.mark.parametrize("unclosed", [
    '"' + '\\"' * 32768,              # a basic string never closed: each of its quotes opens one again
    '"""\n' + '\\"""\n' * 13107,     # a multi-line one: each line's quotes open one (after an unread "\")
])
def test_strings_left_open_are_read_once(unclosed):
    """Each quote of a string left open opened one more that scanned to the end again: 64 KiB took
    10 s (on the event loop for an attestation up to 32 KiB), 256 KiB minutes, before any check."""
    started = time.monotonic()
    with pytest.raises(EvidenceError, match="not TOML"):
        initdata.parse(unclosed)
    assert time.monotonic() - started < 1


def test_a_string_left_open_hides_no_key_before_it():
    with pytest.raises(EvidenceError, match="more than 64 dots"):
        initdata.parse("a" + ".a" * 100 + ' = "' + "x.y" * 10 + "\n")


@pytest.mark.parametrize("obj, message", [
    ({"format": "json", "body": DOCUMENT}, "init-data format 'json' is not supported"),
    ({"format": "toml"}, "init-data must be"),
    ({"format": "toml", "body": 'algorithm = "sha384"\n[data]\n'}, "needs a string 'version'"),
    ({"format": "toml", "body": 'version = 1\nalgorithm = "sha384"\n[data]\n'}, "needs a string 'version'"),
    ({"format": "toml", "body": 'version = "0.1.0"\nalgorithm = "md5"\n[data]\n'}, "algorithm 'md5' is not one of"),
    ({"format": "toml", "body": 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\nx = 1\n'}, "[data] table of strings"),
    ({"format": "toml", "body": 'version = "0.1.0"\nalgorithm = "sha384"\ndata = "x"\n'}, "[data] table of strings"),
    ({"format": "toml", "body": 'version = "\ud800"\n'}, "not valid Unicode"),
    ({"format": "toml", "body": DOCUMENT + "#" * initdata.BODY_MAX}, f"more than {initdata.BODY_MAX}"),
])
def test_each_part_of_the_grammar_is_checked_and_named(obj, message):
    """A guest sends the init-data: each check refuses with EvidenceError, none with a traceback."""
    with pytest.raises(EvidenceError) as info:
        initdata.from_json(obj)
    assert message in str(info.value)
