"""Confidential Containers init-data: the TOML a guest may send with its attestation, read before any check."""

from __future__ import annotations

import hashlib

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
